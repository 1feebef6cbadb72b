#!/bin/sh
# The host unit tests against Debian 12's own libraries: python3-numpy,
# python3-crc32c, python3-aiofiles, python3-pyudev and python3-prometheus-client as the Debian package
# depends on them, under Debian's /usr/bin/python3.
#
# A venv (.venv-debian) made with --system-site-packages sees Debian's
# dist-packages; only the test tools (pytest, hypothesis) come from PyPI.
# The script checks that each library really is Debian's copy, and that
# pyproject.toml's floors accept it (pip would install nothing else), before
# it runs the tests, so a PyPI wheel cannot stand in for it.
# Idempotent; installs the Debian packages if missing (needs root).
# Usage: sh tests/debian-versions.sh [pytest args]
set -eu

REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=$REPO/.venv-debian
die() { printf 'debian-versions: ERROR: %s\n' "$*" >&2; exit 1; }

# gcc and python3-dev: the dm-switch encoder's C core is built in place for Debian's python3.
PKGS="python3 python3-venv python3-setuptools python3-numpy python3-crc32c python3-aiofiles python3-pyudev
      python3-prometheus-client gcc python3-dev"
sh "$REPO/packaging/apt-ensure.sh" $PKGS

if [ ! -x "$VENV/bin/python" ]; then
    /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
# The test extra of pyproject.toml (neither pulls in a library checked below).
"$VENV/bin/python" -c 'import pytest, hypothesis' 2>/dev/null ||
    "$VENV/bin/pip" install -q "pytest>=8" "hypothesis>=6.100"

"$VENV/bin/python" - <<'PY' || die "a library is not Debian's own copy (see above)"
import importlib, importlib.metadata, subprocess, sys
bad = False
for module, deb in (("numpy", "python3-numpy"), ("crc32c", "python3-crc32c"),
                    ("aiofiles", "python3-aiofiles"), ("pyudev", "python3-pyudev"),
                    ("prometheus_client", "python3-prometheus-client")):
    where = importlib.import_module(module).__file__
    version = importlib.metadata.version(module)
    debver = subprocess.run(["dpkg-query", "-W", "-f=${Version}", deb], capture_output=True, text=True).stdout
    ours = where.startswith("/usr/lib/python3/dist-packages/")
    bad |= not ours
    print(f"debian-versions: {module} {version} ({deb} {debver}) from {where}" + ("" if ours else "  <- NOT Debian's"))
sys.exit(1 if bad else 0)
PY

# pyproject.toml's floors accept these versions: pip would add nothing but
# switch-agent itself (too high a floor shows as "Would install numpy-...").
WOULD=$("$VENV/bin/pip" install --dry-run --no-build-isolation "$REPO" 2>/dev/null | grep '^Would install') ||
    die "pip install --dry-run $REPO failed"
printf 'debian-versions: pip: %s\n' "$WOULD"
printf '%s\n' "$WOULD" | grep -Eq '^Would install switch-agent-[^ ]+$' ||
    die "pyproject.toml's floors reject Debian's libraries"

cd "$REPO"
# The tests import protocol/ from this tree: its compiled core, built by Debian's python3 and setuptools.
"$VENV/bin/python" setup.py -q build_ext --inplace >/dev/null || die "building protocol/_dmswitch_encode.c failed"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/unit "$@"
