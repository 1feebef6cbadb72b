#!/bin/sh
# Install the Debian packages named as arguments that are not installed yet.
# Used by packaging/build-deb.sh and tests/debian-versions.sh; a run with all
# of them installed only checks (no root needed then).
# Usage: sh packaging/apt-ensure.sh PACKAGE...
set -eu

MISSING=""
for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || MISSING="$MISSING $p"
done
[ -n "$MISSING" ] || exit 0
if [ "$(id -u)" != 0 ]; then
    printf 'apt-ensure: ERROR: missing Debian packages (run as root to install them):%s\n' "$MISSING" >&2
    exit 1
fi
printf 'apt-ensure: installing:%s\n' "$MISSING"
export DEBIAN_FRONTEND=noninteractive
# An empty package list (a fresh container) needs one update first.
if ! apt-get install -y -qq --no-install-recommends $MISSING >/dev/null 2>&1; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $MISSING >/dev/null
fi
