#!/bin/sh
# Build the Debian package: dist/switch-agent_<version>_<arch>.deb (amd64 here:
# the dm-switch encoder's core is compiled, protocol/_dmswitch_encode.c).
#
# The repository root is not a Debian source tree: this lays one out under
# build/deb/ (the upstream files plus packaging/debian as debian/), builds it
# with dpkg-buildpackage (debhelper, dh-python, pybuild's pyproject plugin;
# the host unit tests run against Debian's own python3-* libraries unless
# DEB_BUILD_OPTIONS=nocheck), copies the .deb to dist/ and runs lintian on it.
#
# Idempotent: missing build dependencies are installed with apt-get (needs
# root); a second run rebuilds from scratch in build/deb/.
# Usage: sh packaging/build-deb.sh [--check-install]
#   exit 1 if the build fails or lintian reports an error.
#   --check-install: then install the .deb with apt into a fresh Debian 12
#   root (mmdebstrap, ~1 min, needs root): its dependencies resolve from
#   Debian alone, the files land where they belong, the command runs, and a
#   purge removes the conffile.
set -eu

CHECK_INSTALL=no
case "${1:-}" in
    --check-install) CHECK_INSTALL=yes ;;
    "") ;;
    *) printf 'usage: sh packaging/build-deb.sh [--check-install]\n' >&2; exit 2 ;;
esac

REPO=$(cd "$(dirname "$0")/.." && pwd)
say() { printf 'build-deb: %s\n' "$*"; }
die() { printf 'build-deb: ERROR: %s\n' "$*" >&2; exit 1; }

command -v dpkg-query >/dev/null 2>&1 || die "not a Debian system (no dpkg-query)"

# --- 1. build dependencies ---------------------------------------------------
# dpkg-dev and build-essential: dpkg-buildpackage itself; the rest is
# debian/control's Build-Depends (kept in step by dpkg-checkbuilddeps below).
PKGS="build-essential dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all-dev
      python3-setuptools python3-aiofiles python3-crc32c python3-hypothesis python3-numpy
      python3-pytest python3-pyudev python3-prometheus-client lintian"
sh "$REPO/packaging/apt-ensure.sh" $PKGS

# --- 2. the source tree --------------------------------------------------------
VERSION=$(python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
    "$REPO/pyproject.toml")
DEBVERSION=$(dpkg-parsechangelog -l "$REPO/packaging/debian/changelog" -S Version)
[ "$DEBVERSION" = "$VERSION" ] || die "packaging/debian/changelog is at $DEBVERSION, pyproject.toml at $VERSION: add a changelog entry (dch -c packaging/debian/changelog -v $VERSION)"

BUILD=$REPO/build/deb
TREE=$BUILD/switch-agent-$VERSION
rm -rf "$BUILD"
mkdir -p "$TREE"
# What the package and its tests are made of; caches and local venvs stay out.
# An editable install's in-place build of the C core (*.so) stays out too: the package builds its own.
(cd "$REPO" && tar -cf - --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' --exclude='*.so' \
    --exclude=packaging/debian pyproject.toml setup.py README.md agent protocol packaging tests docs) |
    tar -C "$TREE" -xf -
cp -r "$REPO/packaging/debian" "$TREE/debian"

# --- 3. build --------------------------------------------------------------------
say "building switch-agent $VERSION in $TREE"
# Debian's own interpreter and tools only (not a pyenv or venv python on PATH).
(cd "$TREE" && export PATH=/usr/sbin:/usr/bin:/sbin:/bin &&
    dpkg-checkbuilddeps && dpkg-buildpackage -b -us -uc) > "$BUILD/build.log" 2>&1 ||
    { tail -40 "$BUILD/build.log" >&2; die "dpkg-buildpackage failed (whole log: $BUILD/build.log)"; }
grep -E '^[0-9]+ passed' "$BUILD/build.log" | sed 's/^/build-deb: unit tests in the build: /' || true

DEB=switch-agent_${VERSION}_$(dpkg --print-architecture).deb
mkdir -p "$REPO/dist"
cp "$BUILD/$DEB" "$REPO/dist/$DEB"
say "wrote dist/$DEB"

# --- 4. lintian (default level: errors and warnings) -----------------------------
say "lintian dist/$DEB:"
lintian "$REPO/dist/$DEB" 2>&1 | grep -v '^running with root privileges' || true
lintian --fail-on error "$REPO/dist/$DEB" >/dev/null 2>&1 || die "lintian reports errors"
say "lintian: no errors"

[ "$CHECK_INSTALL" = yes ] || exit 0

# --- 5. install into a throw-away Debian 12 root ---------------------------------
[ "$(id -u)" = 0 ] || die "--check-install needs root (mmdebstrap --mode=root)"
sh "$REPO/packaging/apt-ensure.sh" mmdebstrap
# This machine's own Debian sources if it has them, else mmdebstrap's default mirror.
SOURCES=/etc/apt/sources.list.d/debian.sources
[ -f "$SOURCES" ] || SOURCES=""
cat > "$BUILD/check-in-root.sh" <<'CHECK'
set -eu
fail() { printf 'check-install: FAILED: %s\n' "$*" >&2; exit 1; }
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "/tmp/$1" >/dev/null 2>&1 ||
    fail "apt-get install ./$1"
printf 'check-install: %s\n' "$(dpkg-query -W -f='installed ${Package} ${Version}, Depends: ${Depends}' switch-agent)"
for f in /usr/bin/switch-agent /lib/systemd/system/switch-agent.service /lib/systemd/system/switch-agent.socket \
         /lib/udev/rules.d/90-switch-agent.rules \
         /etc/switch-agent/switch-agent.toml /usr/share/man/man8/switch-agent.8.gz \
         /usr/share/man/man5/switch-agent.toml.5.gz; do
    [ -f "$f" ] || fail "$f is missing"
done
dpkg-query -W -f='${Conffiles}' switch-agent | grep -q ' /etc/switch-agent/switch-agent.toml ' ||
    fail "/etc/switch-agent/switch-agent.toml is not a conffile"
! ls /etc/systemd/system/*.wants/switch-agent.* >/dev/null 2>&1 || fail "a unit was enabled on install"
switch-agent --help >/dev/null || fail "switch-agent --help"
python3 -c 'import agent.daemon, agent.system, agent.orchestrator, agent.kernel.udev, protocol.pagemap, protocol._dmswitch_encode' ||
    fail "the daemon's modules (or the compiled encoder) do not import"
# Reads the conffile, finds no daemon: exit status 3.
rc=0; switch-agent status >/dev/null 2>&1 || rc=$?
[ "$rc" = 3 ] || fail "switch-agent status exited $rc, not 3 (no daemon)"
DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq switch-agent >/dev/null 2>&1 || fail "apt-get purge"
[ ! -e /etc/switch-agent/switch-agent.toml ] && [ ! -e /usr/bin/switch-agent ] || fail "purge left files"
echo "check-install: ok (files in place, conffile, unit not enabled, --help, status exit 3, purge clean)"
CHECK
say "installing dist/$DEB into a fresh bookworm root (mmdebstrap)"
if mmdebstrap --variant=apt --mode=root --quiet \
        --customize-hook="copy-in $REPO/dist/$DEB $BUILD/check-in-root.sh /tmp" \
        --customize-hook="chroot \"\$1\" sh /tmp/check-in-root.sh $DEB" \
        bookworm /dev/null $SOURCES > "$BUILD/check-install.log" 2>&1; then
    grep '^check-install:' "$BUILD/check-install.log"
else
    grep -E '^check-install:|^E:' "$BUILD/check-install.log" >&2 || tail -20 "$BUILD/check-install.log" >&2
    die "the package does not install and work in a fresh Debian 12 root (log: $BUILD/check-install.log)"
fi
