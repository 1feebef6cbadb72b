#!/bin/sh
# The demo: set up this machine, boot the real-kernel VM with a 3-member
# emulated array, run switch-agent, and show each member's direct and
# forwarded I/O for the same workload without and with the agent.
set -eu
cd "$(dirname "$0")/.."
sh tests/vm/setup.sh
exec .venv/bin/python -m tests.vm.run --members 3 --layout striped --no-login -- python -m tests.guest.demo
