#!/bin/sh
# The project's whole test run, as the README gives it and CI runs it:
#   1. set up this machine (Debian packages, the venv, and unless --host-only
#      the other guest kernels: 5.10, 6.12, 6.1-rt) -- idempotent;
#   2. the type checker, then host unit tests (pure logic, fakes for the kernel);
#   3. guest tests: each boots a stock Debian kernel under QEMU and runs the
#      real LIO target, open-iscsi, multipathd, udev and dm-switch; all of
#      them on Debian 12's 6.1, the agent end to end also on 5.10 and 6.12;
#      and the systemd-booted Debian 12 host of issue #16 (the .deb installed
#      with apt, the README's install steps, a reboot).
# Usage: sh tests/run.sh [--host-only]
set -eu
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--host-only" ]; then
    sh tests/vm/setup.sh
else
    sh tests/vm/setup.sh --kernels
fi
PY=.venv/bin/python

if [ "${1:-}" != "--host-only" ]; then
    # The systemd guest's Debian root (mmdebstrap, 1-3 min, cached by its inputs) builds beside
    # the host tests; its guest test waits for it (a lock in the cache) instead of building again.
    IMAGE_LOG=$(mktemp -t switch-agent-system-image.XXXXXX)
    "$PY" -m tests.vm.system_vm image > "$IMAGE_LOG" 2>&1 &
    IMAGE_PID=$!
fi

echo "== type check (mypy --strict on agent/ and protocol/, the fakes against their protocols)"
"$PY" -m mypy
echo "== host unit tests"
"$PY" -m pytest -q tests/unit
echo "== host tests of the VM rig itself (no VM)"
"$PY" -m pytest -q -m "not guest" tests/vm tests/guest

if [ "${1:-}" = "--host-only" ]; then
    echo "== guest tests skipped (--host-only)"
    exit 0
fi

echo "== guest tests (real kernel under QEMU)"
# The image build's own failure is told here; the systemd guest's test would only say it has none.
if ! wait "$IMAGE_PID"; then
    echo "the systemd guest's image did not build:"; tail -n 40 "$IMAGE_LOG"
    exit 1
fi
"$PY" -m pytest -q --durations=0 -m guest tests/vm
