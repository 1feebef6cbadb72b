"""Routing stays right through change, under continuous verified I/O (issue "routing stays right").

Runs inside the VM rig with the array up but not logged in:

    python -m tests.vm.run --members 3 --no-login -- \
        python -m pytest -p no:cacheprovider -v -s tests/guest/test_change.py

Each scenario changes the array while tests/guest/verified_io.py writes and
checks blocks through the routed device, then asserts: no I/O error, no
verify failure, and forwarded I/O back to 0 once the agent has converged.
The convergence time is printed and recorded, not asserted (TCG timing).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.array import control as array_control
from tests.guest.agentlib import (RESULTS, AgentDaemon, array, array_info, forwarded_share, install_udev_rule,
                                  login_and_wait_routed, our_uuids, quiesce, remove_our_devices, status,
                                  wait_for)
from tests.guest.verified_io import VerifiedIo

pytestmark = pytest.mark.guest

CONVERGENCE: dict[str, float] = {}


@pytest.fixture(scope="module")
def routed():
    if os.geteuid() != 0 or not Path("/dev/mapper/control").exists():
        pytest.skip("needs root and device-mapper (runs in the VM rig)")
    if not array_control.server_running(array_control.run_dir()):
        pytest.skip("no emulated array is up (runs in the VM rig)")
    install_udev_rule()
    agent = AgentDaemon(poll_interval_s=2.0)
    record, _ = login_and_wait_routed(timeout_s=120)
    yield record
    (RESULTS / "convergence.json").write_text(json.dumps(CONVERGENCE, indent=2))
    assert agent.stop() == 0
    remove_our_devices()


def array_cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "tests.array", *args], check=True, timeout=300,
                   stdout=subprocess.DEVNULL)


def converged(name: str, changed_at: float, timeout_s: float = 60.0) -> float:
    """Wait until the agent holds the array's generation and a quiet window forwards nothing."""
    def ok():
        if status()[0]["generation"] != array("info")["generation"] or status()[0]["state"] != "routed":
            return False
        array("stats", reset=True)
        time.sleep(0.5)  # a measurement window for the running writer, not synchronisation
        return forwarded_share(array("stats"))[1] == 0

    wait_for(ok, timeout_s, f"{name}: forwarded I/O back to 0")
    seconds = time.monotonic() - changed_at
    CONVERGENCE[name] = round(seconds, 1)
    print(f"\n{name}: converged {seconds:.1f} s after the array's change")
    return seconds


def run_scenario(routed: dict, name: str, change) -> None:
    info = array_info()
    quiesce()
    with VerifiedIo(routed["device"], info["size_bytes"], seed=hash(name) & 0xFFFF) as io:
        io.wait_for_writes(50)
        changed_at = time.monotonic()
        change(info)
        converged(name, changed_at)
        io.wait_for_writes(50)
    io.verify_all()
    assert io.io_errors == [] and io.verify_failures == [], (io.io_errors[:5], io.verify_failures[:5])


def test_pages_moved(routed):
    run_scenario(routed, "10% of pages moved", lambda info: array("move", fraction=0.1))


def test_member_added_and_pages_moved_to_it(routed):
    def change(info):
        new = array("add-member")
        array_cli("login", "--member", str(new["number"]))
        array("move", fraction=0.25)

    run_scenario(routed, "member added, pages moved to it", change)
    assert len(status()[0]["members"]) == len(array("info")["members"])


def test_member_removed(routed):
    def change(info):
        array_cli("remove-member", str(info["members"][-1]["number"]))

    run_scenario(routed, "member removed", change)
    assert len(our_uuids()) == len(array("info")["members"]) + 2
