#!/bin/sh
# Set up a Debian 12 machine (as root) for the real-kernel VM rig (tests/vm).
#
# Idempotent: a second run only checks and skips.  It
#   1. installs the Debian packages the rig needs (QEMU, the stock Debian
#      kernel that the VM boots, and the guest-side userland: open-iscsi,
#      multipath-tools, sg3-utils, ...), without starting any of their
#      services on this host;
#   2. creates <repo>/.venv if missing and installs the project into it
#      with the test, emulator (rtslib-fb), vm (virtme-ng) and bench (py-spy) extras;
#   3. with --kernels: fetches the other guest kernels (Debian 11's 5.10,
#      12-backports' 6.12, 12's 6.1 PREEMPT_RT) into a cache directory
#      (tests/vm/guest_kernels.py): unpacked, not installed, so /boot, the
#      host's boot configuration, its apt sources and the rig's default
#      kernel stay as they are.
#
# Usage: sh tests/vm/setup.sh [--kernels]   (env SWITCH_AGENT_VENV=DIR overrides the venv)
set -eu

KERNELS=no
for arg in "$@"; do
    case $arg in
        --kernels) KERNELS=yes ;;
        *) printf 'usage: sh tests/vm/setup.sh [--kernels]\n' >&2; exit 2 ;;
    esac
done

REPO=$(cd "$(dirname "$0")/../.." && pwd)
VENV=${SWITCH_AGENT_VENV:-$REPO/.venv}
START=$(date +%s)

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: ERROR: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (it installs Debian packages)"
command -v dpkg-query >/dev/null 2>&1 || die "not a Debian system (no dpkg-query)"

# --- 1. Debian packages -------------------------------------------------------
# qemu-system-x86, linux-image-amd64: the VM and the kernel it boots (the
#   host's own kernel has no device-mapper, configfs or modules).
# busybox-static, file, util-linux-extra: what virtme-ng expects on the host.
# The rest is the guest-side userland (the guest sees the host's root file
#   system read-only): iSCSI initiator, multipathd, dmsetup, SCSI tools, fio;
#   prometheus-node-exporter and tmux for the metrics test (tests/guest/test_metrics.py),
#   and prometheus for its promtool, which checks packaging/prometheus/ on the host.
# gcc, python3-dev: the editable install compiles the encoder's C core.
# mmdebstrap: the systemd guest's own Debian root (tests/vm/system/build-image.sh).
PKGS="gcc python3-dev qemu-system-x86 linux-image-amd64 busybox-static file util-linux-extra
      open-iscsi multipath-tools dmsetup sg3-utils libiscsi-bin fio kmod
      iproute2 udev procps prometheus prometheus-node-exporter tmux mmdebstrap"

if [ ! -x "$VENV/bin/python" ]; then
    PY=$(command -v python3 || true)
    [ -n "$PY" ] || PKGS="$PKGS python3 python3-venv"
    if [ -n "$PY" ] && ! "$PY" -c 'import ensurepip, venv' 2>/dev/null; then
        PKGS="$PKGS python3-venv"
    fi
fi

missing=""
for p in $PKGS; do
    st=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [ "$st" = "install ok installed" ] || missing="$missing $p"
done

if [ -z "$missing" ]; then
    say "Debian packages: all present, nothing to install"
else
    say "Debian packages missing:$missing"
    export DEBIAN_FRONTEND=noninteractive
    # The VM boots the kernel image directly (virtme-ng builds its own tiny
    # initramfs), so skip generating Debian's initramfs: it only costs time.
    export INITRD=No

    # Keep services from starting on this host while their packages install
    # (iscsid, multipathd, udev...).  Any policy-rc.d already there is put
    # back afterwards.
    POLICY=/usr/sbin/policy-rc.d
    BACKUP=$POLICY.switch-agent-setup.bak
    [ ! -e "$BACKUP" ] || mv -f "$BACKUP" "$POLICY"   # left over from an interrupted run
    restore_policy() {
        if [ -e "$BACKUP" ]; then mv -f "$BACKUP" "$POLICY"; else rm -f "$POLICY"; fi
    }
    [ ! -e "$POLICY" ] || mv -f "$POLICY" "$BACKUP"
    printf '#!/bin/sh\n# temporary, from switch-agent tests/vm/setup.sh\nexit 101\n' > "$POLICY"
    chmod 755 "$POLICY"
    trap restore_policy EXIT INT TERM

    # apt-get update only when needed: no package lists yet, lists older than
    # a day, or an install that fails on the lists we have.
    lists_fresh=no
    if ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1 &&
       [ -n "$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mmin -1440 2>/dev/null | head -n1)" ]; then
        lists_fresh=yes
    fi
    if [ "$lists_fresh" = no ]; then
        say "apt-get update (package lists missing or older than a day)"
        apt-get update -q
    fi
    say "apt-get install --no-install-recommends$missing"
    # shellcheck disable=SC2086
    if ! apt-get install -y -q --no-install-recommends $missing; then
        [ "$lists_fresh" = yes ] || die "apt-get install failed"
        say "install failed on the current lists: apt-get update and retry"
        apt-get update -q
        # shellcheck disable=SC2086
        apt-get install -y -q --no-install-recommends $missing
    fi
    restore_policy
    trap - EXIT INT TERM
    say "Debian packages installed"
fi

# The kernel the VM boots by default (the one linux-image-amd64 depends on,
# as tests/vm/guest_kernels.py pins it), and the modules the rig loads in it.
KVER=$(dpkg-query -W -f='${Depends}' linux-image-amd64 | sed -n 's/^linux-image-\([^ ,]*\).*/\1/p')
KERNEL=/boot/vmlinuz-$KVER
[ -f "$KERNEL" ] || die "no $KERNEL after installing linux-image-amd64"
for m in dm-switch dm-multipath target_core_user iscsi_target_mod iscsi_tcp; do
    modinfo -k "$KVER" -n "$m" >/dev/null 2>&1 || die "kernel $KVER has no module $m"
done
say "guest kernel: $KERNEL (modules dm-switch, dm-multipath, target_core_user, iscsi_target_mod, iscsi_tcp present)"

# --- 2. Python virtualenv ---------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
    PY=$(command -v python3) || die "no python3"
    "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "$PY is older than 3.11"
    say "creating venv $VENV with $PY"
    "$PY" -m venv "$VENV"
else
    say "venv $VENV exists"
fi

# Re-run pip only when the build inputs (pyproject.toml, setup.py, the encoder's
# C core) changed since the last successful run, or when something the rig
# needs is missing. The editable install builds the C core in place
# (protocol/_dmswitch_encode.*.so); a changed .c needs that build again.
STAMP="$VENV/.switch-agent-setup-stamp"
WANT=$(cat "$REPO/pyproject.toml" "$REPO/setup.py" "$REPO/protocol/_dmswitch_encode.c" | cksum)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] &&
   "$VENV/bin/python" -c 'import rtslib_fb, pytest, hypothesis, agent, protocol._dmswitch_encode' 2>/dev/null &&
   [ -x "$VENV/bin/vng" ]; then
    say "python packages: up to date (pyproject.toml unchanged), nothing to install"
else
    say "pip install -e '.[test,emulator,vm,bench]' into $VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$REPO[test,emulator,vm,bench]"
    printf '%s\n' "$WANT" > "$STAMP"
    say "python packages installed"
fi
say "vng: $("$VENV/bin/vng" --version 2>&1 | head -n1)"

# --- 3. the other guest kernels -----------------------------------------------------
if [ "$KERNELS" = yes ]; then
    (cd "$REPO" && "$VENV/bin/python" -m tests.vm.guest_kernels fetch) ||
        die "fetching the guest kernels failed (see above)"
fi

say "done in $(( $(date +%s) - START )) s"
