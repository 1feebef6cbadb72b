"""The agent end to end on the real kernel: daemon before login, routed LUN, 0 forwarded I/O.

Runs inside the VM rig with the array up but not logged in:

    python -m tests.vm.run --members 3 --no-login -- \
        python -m pytest -q -s -p no:cacheprovider tests/guest/test_agent.py

The tests run in file order and share one daemon and one LUN.
"""

from __future__ import annotations

import json
import mmap
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent import control as agent_control
from tests.guest.agentlib import (MIB, RESULTS, SOCKET, AgentDaemon, agent_cli, array, array_info,
                                  forwarded_share, install_udev_rule, quiesce, login_and_wait_routed, our_devices,
                                  our_uuids, random_io, remove_our_devices, skip_unless_emulated_array_rig, status,
                                  wait_for)

pytestmark = pytest.mark.guest

ROUTE_GOAL_S = 10.0


@pytest.fixture(scope="module")
def daemon():
    skip_unless_emulated_array_rig()
    install_udev_rule()
    agent = AgentDaemon()
    yield agent
    assert agent.stop() == 0
    assert our_devices(), "the routed device outlives the daemon"
    remove_our_devices()  # so the rig can flush multipath and log out


@pytest.fixture(scope="module")
def routed(daemon) -> dict:
    """Log in to every member with the daemon already running; the LUN must get routed.

    The time it takes is measured and recorded (docs/benchmarks.md: goal 10 s
    under TCG), not asserted: under TCG it scales with whatever else the
    host's two cores are doing (21.7 s was seen with another VM build beside it).
    """
    assert status() == [], "nothing is logged in yet, so the daemon knows no LUN"
    record, elapsed = login_and_wait_routed(timeout_s=120)
    print(f"\nrouted {elapsed:.1f} s after the last login (goal {ROUTE_GOAL_S} s under TCG)")
    (RESULTS / "agent-route-time.txt").write_text(f"{elapsed:.2f}\n")
    return record


def test_the_lun_is_routed_with_every_member(routed):
    info = array_info()
    assert routed["wwid"] == info["wwid"]
    assert len(routed["members"]) == len(info["members"])
    assert all(m["paths"] and all(p["state"] == "active" for p in m["paths"]) for m in routed["members"])
    assert sum(m["pages"] for m in routed["members"]) == routed["pages"]
    assert Path(routed["device"]).exists()
    assert Path(f"/dev/switch-agent/{Path(routed['device']).name}").resolve() == Path(routed["device"]).resolve()
    uuids = our_uuids()
    assert sorted(u.split("-")[1] for u in uuids.values()) == ["leg"] * len(info["members"]) + ["sw", "top"]
    # Legs and switch are hidden from other udev rules (libdm's DM_UDEV_DISABLE_OTHER_RULES_FLAG);
    # the agent does not wait for udev on them, so let udev finish first.
    subprocess.run(["udevadm", "settle", "--timeout=60"], check=True)
    for name, uuid in uuids.items():
        props = subprocess.run(["udevadm", "info", "--query=property", f"/dev/mapper/{name}"],
                               capture_output=True, text=True).stdout
        hidden = "DM_UDEV_DISABLE_OTHER_RULES_FLAG=1" in props
        assert hidden == (not uuid.startswith("SWAGENT-top-")), (name, props)


def test_io_through_the_routed_device_is_never_forwarded(routed):
    info = array_info()
    page_bytes, pages = info["page_size_bytes"], info["total_pages"]
    quiesce()
    array("stats", reset=True)
    random_io(info["multipath_map"], page_bytes, pages, seed=2)
    base_direct, base_forwarded = forwarded_share(array("stats", reset=True))
    random_io(routed["device"], page_bytes, pages, seed=3)
    direct, forwarded = forwarded_share(array("stats", reset=True))
    base_share = base_forwarded / (base_direct + base_forwarded)
    print(f"\n| workload (64 MiB written + read, O_DIRECT) | direct bytes | forwarded bytes | forwarded |\n"
          f"|---|---|---|---|\n"
          f"| multipathd's map, no agent | {base_direct} | {base_forwarded} | {base_share:.1%} |\n"
          f"| switch-agent routed device | {direct} | {forwarded} | {forwarded / (direct + forwarded):.1%} |")
    (RESULTS / "agent-io.json").write_text(json.dumps(
        {"baseline": [base_direct, base_forwarded], "routed": [direct, forwarded]}))
    assert direct >= 2 * 64 * MIB
    assert forwarded == 0
    members = len(info["members"])
    assert abs(base_share - (members - 1) / members) < 0.2


def test_locate_agrees_with_the_array(routed):
    info = array("info")
    rng = random.Random(4)
    for _ in range(100):
        offset = rng.randrange(info["size_bytes"])
        where = agent_control.request(SOCKET, {"command": "locate", "lun": routed["wwid"], "offset": offset})
        owner = array("owner", offset=offset)
        assert where["member"] == owner["name"], (offset, where, owner)


def test_locate_cli(routed):
    out = agent_cli("locate", routed["wwid"], "0", "--json")
    assert json.loads(out.stdout)["page"] == 0


def test_refresh_applies_page_moves(routed):
    info = array("info")
    array("move", fraction=0.3)
    result = agent_cli("refresh", routed["wwid"], "--json")
    record = json.loads(result.stdout)
    assert record["state"] == "routed" and record["generation"] == array("info")["generation"]
    quiesce()
    array("stats", reset=True)
    random_io(routed["device"], info["page_size_bytes"], info["total_pages"], seed=5)
    direct, forwarded = forwarded_share(array("stats", reset=True))
    assert direct > 0 and forwarded == 0


def refresh(wwid: str) -> dict:
    """`refresh` over the socket (a CLI process per call costs seconds under TCG)."""
    return agent_control.request(SOCKET, {"command": "refresh", "lun": wwid}, timeout_s=120)


@pytest.mark.parametrize("kind", ["bad-crc", "truncated", "entry-out-of-range"])
def test_a_corrupt_map_leaves_routing_as_it_was(routed, kind):
    array("move", fraction=0.1)
    generation = array("info")["generation"]
    wait_for(lambda: status()[0]["generation"] == generation, 30, "the daemon to apply the move")
    before = our_devices()
    # Many bad answers: multipathd's path checker meets the move's unit attentions on the other
    # paths and the daemon looks again on its own, so it may take some of them before `refresh` does;
    # and since protocol 1.2 one look may take three (the changes-since question, then the whole
    # map's header and entries as the fallback). 6 ran out before `refresh` on 6.12 (2026-12-06).
    array("corrupt-next-map", kind=kind, count=18)
    result = agent_cli("refresh", routed["wwid"], check=False)
    assert result.returncode == 1 and "GET PAGE MAP" in result.stderr, result.stderr
    record = status()[0]
    assert record["state"] == "routed" and "GET PAGE MAP" in record["last_error"]
    assert our_devices() == before  # same devices, same tables: nothing half-built, nothing torn down
    for _attempt in range(24):  # the array answers properly again once the bad answers are used up
        try:
            refresh(routed["wwid"])
            break
        except agent_control.ControlError:
            continue
    else:
        raise AssertionError("refresh kept failing after the corruption ran out")
    assert status()[0]["generation"] == array("info")["generation"]


def test_generation_churn_during_a_fetch_is_absorbed(routed):
    array("move", fraction=0.1)
    array("corrupt-next-map", kind="generation-churn", count=1)
    record = refresh(routed["wwid"])
    assert record["state"] == "routed" and record["generation"] == array("info")["generation"]


def test_page_moves_are_picked_up_without_being_asked(routed):
    """Under I/O, the paths' unit attentions bring a move in with no refresh and no poll."""
    info = array("info")
    array("move", fraction=0.2)
    moved = time.monotonic()
    fd = os.open(routed["device"], os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 4096)
    try:
        page = 0
        while status()[0]["generation"] != array("info")["generation"]:
            assert time.monotonic() - moved < 30, "the daemon did not notice the move"
            # Reads on every page reach every member, and so every path's unit attention.
            os.preadv(fd, [buf], page * info["page_size_bytes"])
            page = (page + 1) % info["total_pages"]
    finally:
        os.close(fd)
    print(f"\nmove applied {time.monotonic() - moved:.1f} s after the array's change")


def test_a_member_logged_out_and_back(routed):
    """All of one member's sessions go: I/O goes on through the others; back: routed directly again.

    Before the grow test: multipathd refuses to re-add a path whose size differs from its map's
    ("device size mismatch") until someone runs `multipathd resize map`.
    """
    info = array_info()
    member = info["members"][1]
    array_cli("logout", "--member", str(member["number"]))
    random_io(routed["device"], info["page_size_bytes"], info["total_pages"], total_bytes=8 * MIB, seed=8)
    wait_for(lambda: not _member_paths(member["member_id"]), 60, "the daemon to drop the member's paths")
    array_cli("login", "--member", str(member["number"]))
    wait_for(lambda: _member_paths(member["member_id"]) and status()[0]["state"] == "routed", 60,
             "the member's paths to come back")
    quiesce()
    array("stats", reset=True)
    random_io(routed["device"], info["page_size_bytes"], info["total_pages"], total_bytes=16 * MIB, seed=9)
    direct, forwarded = forwarded_share(array("stats", reset=True))
    assert direct > 0 and forwarded == 0


def _member_paths(member_id: int) -> list:
    record = status()[0]
    return next((m["paths"] for m in record["members"] if m["member_id"] == member_id), [])


def array_cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "tests.array", *args], check=True, timeout=300)


def test_growing_the_volume_grows_the_routed_device(routed):
    info = array("info")
    old_size = info["size_bytes"]
    new_size = old_size + 16 * info["page_size_bytes"]
    device = routed["device"]
    array("resize", size=new_size)
    # The capacity unit attention reaches a path with its next command: send one.
    random_io(device, info["page_size_bytes"], info["total_pages"], total_bytes=MIB, seed=7)
    wait_for(lambda: _size_bytes(device) == new_size and status()[0]["state"] == "routed", 60,
             "the routed device to grow")
    quiesce()  # udev's probes of the resized disks
    array("stats", reset=True)
    pages = new_size // info["page_size_bytes"]
    random_io(device, info["page_size_bytes"], pages, total_bytes=16 * MIB, seed=6)
    direct, forwarded = forwarded_share(array("stats", reset=True))
    assert direct > 0 and forwarded == 0
    assert len(our_uuids()) == len(info["members"]) + 2  # the old epoch's switch and legs are gone


def path_states(status: str) -> dict[str, tuple[str, int]]:
    """major:minor -> (A or F, fail count), from the words of a multipath target's `dmsetup status`.

    Read word by word, independently of the agent's parser (protocol/multipath.py)."""
    words = status.split()
    return {w: (words[i + 1], int(words[i + 2])) for i, w in enumerate(words[:-2])
            if ":" in w and words[i + 1] in ("A", "F") and words[i + 2].isdigit()}


def leg_path_states(leg: str) -> dict[str, tuple[str, int]]:
    """`dmsetup status` of a leg (dmsetup: an independent reader), as path_states()."""
    return path_states(subprocess.run(["dmsetup", "status", leg], capture_output=True, text=True,
                                      check=True).stdout)


def test_a_failed_leg_path_is_reinstated(routed):
    """dm-multipath fails a path on an I/O error and never brings it back; the agent does."""
    leg = next(n for n, u in our_uuids().items() if u.startswith("SWAGENT-leg-"))
    dev, (state, fails) = next(iter(leg_path_states(leg).items()))
    assert state == "A"
    subprocess.run(["dmsetup", "message", leg, "0", f"fail_path {dev}"], check=True)
    failed = time.monotonic()
    # The path's fail count proves it failed: the agent may reinstate it (within
    # a second) before a second `dmsetup status` could see "F" (seen on 5.10).
    wait_for(lambda: leg_path_states(leg)[dev] == ("A", fails + 1), 30,
             f"{dev} to be failed once (fail count {fails} -> {fails + 1}) and reinstated in {leg}")
    print(f"\n{dev} reinstated in {leg} at most {time.monotonic() - failed:.1f} s after it failed")


def _size_bytes(device: str) -> int:
    fd = os.open(device, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def test_status_cli_reads_like_multipath(routed):
    out = agent_cli("status").stdout
    assert routed["wwid"] in out and "routed" in out and "member" in out
