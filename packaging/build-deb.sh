#!/bin/sh
# Build the Debian package: dist/switch-agent_<version>_all.deb.
#
# The repository root is not a Debian source tree: this lays one out under
# build/deb/ (the upstream files plus packaging/debian as debian/), builds it
# with dpkg-buildpackage (debhelper, dh-python, pybuild's pyproject plugin;
# the host unit tests run against Debian's own python3-* libraries unless
# DEB_BUILD_OPTIONS=nocheck), copies the .deb to dist/ and runs lintian on it.
#
# Idempotent: missing build dependencies are installed with apt-get (needs
# root); a second run rebuilds from scratch in build/deb/.
# Usage: sh packaging/build-deb.sh          exit 1 if lintian reports an error
set -eu

REPO=$(cd "$(dirname "$0")/.." && pwd)
say() { printf 'build-deb: %s\n' "$*"; }
die() { printf 'build-deb: ERROR: %s\n' "$*" >&2; exit 1; }

command -v dpkg-query >/dev/null 2>&1 || die "not a Debian system (no dpkg-query)"

# --- 1. build dependencies ---------------------------------------------------
# dpkg-dev and build-essential: dpkg-buildpackage itself; the rest is
# debian/control's Build-Depends (kept in step by dpkg-checkbuilddeps below).
PKGS="build-essential dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all
      python3-setuptools python3-aiofiles python3-crc32c python3-hypothesis python3-numpy
      python3-pytest python3-pyudev lintian"
MISSING=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || MISSING="$MISSING $p"
done
if [ -n "$MISSING" ]; then
    [ "$(id -u)" = 0 ] || die "missing build dependencies (run as root to install them):$MISSING"
    say "installing:$MISSING"
    # An empty package list (a fresh container) needs one update first.
    if ! apt-get install -y -qq --no-install-recommends $MISSING >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $MISSING >/dev/null
    fi
fi

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
(cd "$REPO" && tar -cf - --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' \
    --exclude=packaging/debian pyproject.toml README.md agent protocol packaging tests docs) |
    tar -C "$TREE" -xf -
cp -r "$REPO/packaging/debian" "$TREE/debian"

# --- 3. build --------------------------------------------------------------------
say "building switch-agent $VERSION in $TREE"
# Debian's own interpreter and tools only (not a pyenv or venv python on PATH).
(cd "$TREE" && export PATH=/usr/sbin:/usr/bin:/sbin:/bin &&
    dpkg-checkbuilddeps && dpkg-buildpackage -b -us -uc) > "$BUILD/build.log" 2>&1 ||
    { tail -40 "$BUILD/build.log" >&2; die "dpkg-buildpackage failed (whole log: $BUILD/build.log)"; }
grep -E '^[0-9]+ passed' "$BUILD/build.log" | sed 's/^/build-deb: unit tests in the build: /' || true

DEB=switch-agent_${VERSION}_all.deb
mkdir -p "$REPO/dist"
cp "$BUILD/$DEB" "$REPO/dist/$DEB"
say "wrote dist/$DEB"

# --- 4. lintian (default level: errors and warnings) -----------------------------
say "lintian dist/$DEB:"
lintian "$REPO/dist/$DEB" 2>&1 | grep -v '^running with root privileges' || true
lintian --fail-on error "$REPO/dist/$DEB" >/dev/null 2>&1 || die "lintian reports errors"
say "lintian: no errors"
