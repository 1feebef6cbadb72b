"""The agent against LIO's own REPORT REFERRALS: I/O to each segment arrives on its optimized port group only.

Runs inside the VM rig with LIO's fileio LUN, one ALUA port group per port
and an lba_map (tests/array/lio_referrals.py), four ports logged in:

    python -m tests.vm.run --array lio-referrals --members 4 --size 512M \\
        --lba-map striped:32M -- python -m pytest -q -s tests/guest/test_referrals.py

One boot covers several layouts: the tests run in file order, each case
taking LIO down and up again with its own port groups and lba_map (the
first case uses what the rig set up). Per case: sg_referrals (sg3_utils, an
independent reader) must list the segments as written; the agent routes
the LUN; then, through one open file descriptor on the routed device (a
close would make udev probe the device and add reads), 2 MiB are written
and read back at the start of every segment, and LIO's per-port counters
(scsi_tgt_port write_mbytes/read_mbytes of each TPG's LUN 0) must have
moved on the segment's optimized port only. Segments without an optimized
group, and LBAs outside every segment, must land on exactly one port.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import subprocess

import pytest

from tests.array import initiator, lio_referrals
from tests.array.lio_referrals import BLOCK_BYTES, IQN, Segment
from tests.guest.agentlib import (MIB, RESULTS, AgentDaemon, agent_cli, install_udev_rule, remove_our_devices,
                                  status, wait_for)

# rtslib warns that LIO's dbroot cannot change once a backstore exists; nothing is saved there.
pytestmark = [pytest.mark.guest, pytest.mark.filterwarnings("ignore:Cannot set dbroot:UserWarning")]

if os.environ.get("SWITCH_AGENT_ARRAY_KIND") != "lio-referrals":
    pytest.skip("needs the rig's --array lio-referrals", allow_module_level=True)

SIZE = int(os.environ.get("SWITCH_AGENT_SIZE", str(512 * MIB)))
IO_BYTES = 2 * MIB
LIO_ARRAY = '\narrays = [ { vendor = "LIO-ORG", product = "FILEIO", map_source = "referrals" } ]\n'

# (name, port groups, lba_map spec); the first is what the rig's wrapper sets up.
CASES = [
    ("4 groups striped", 4, os.environ.get("SWITCH_AGENT_LBA_MAP", "striped:32M")),
    ("3 groups striped, short last segment", 3, "striped:48M"),
    ("4 groups uneven, a don't-care segment, uncovered tail", 4,
     "24M:2,8M:4,40M:-,16M:1,56M:3,8M:2,32M:4,64M:1,16M:3"),
]


def bring_up(groups: int, spec: str) -> None:
    """LIO down and up again with `groups` ports and `spec`, logged in, multipathd's map complete."""
    remove_our_devices()
    lio_referrals.down()
    lio_referrals.up(groups, SIZE, spec)
    lio_referrals.login()
    wait_for(lambda: mpath_paths() == groups, 90, f"multipathd's map over {groups} paths")
    subprocess.run(["udevadm", "settle", "--timeout=60"], check=False)


def mpath_paths() -> int:
    wwid = lio_referrals._wwid()
    name = initiator.multipath_map(wwid) if wwid else None
    if not name:
        return 0
    out = subprocess.run(["dmsetup", "status", name], capture_output=True, text=True).stdout
    return len(re.findall(r"\b\d+:\d+ A\b", out))


def sg_referrals_segments(device: str) -> list[tuple[int, int, dict[int, str]]]:
    """(first LBA, last LBA, {port group: state}) per descriptor, as sg_referrals prints them.

    --maxlen: sg_referrals' default allocation is 256 bytes, which cuts LIO's
    answer short past 7-8 segments (it then says "bad user data segment
    referral descriptor").
    """
    out = subprocess.run(["sg_referrals", "--maxlen=4096", device], capture_output=True, text=True, check=True)
    assert "bad" not in out.stderr, out.stderr
    segments: list = []
    for line in out.stdout.splitlines():
        if m := re.search(r"user data segment: first lba (\d+), last lba (\d+)", line):
            segments.append((int(m.group(1)), int(m.group(2)), {}))
        elif m := re.search(r"port group ([0-9a-f]+) state \((.+)\)", line):  # the group in hex
            segments[-1][2][int(m.group(1), 16)] = m.group(2)
    return segments


def a_path() -> str:
    return "/dev/" + initiator.sessions(IQN)[0].devices[0]


def run_case(groups: int, spec: str, record: dict) -> None:
    segments = lio_referrals.parse_spec(spec, groups, SIZE)
    # LIO answers what was written (sg3_utils decodes it, not our codec).
    listed = sg_referrals_segments(a_path())
    assert [(f, l) for f, l, _ in listed] == [(s.first_lba, s.last_lba) for s in segments], listed
    for (_, _, states), s in zip(listed, segments):
        optimized = {g for g, state in states.items() if state == "active/optimized"}
        assert optimized == ({s.optimized} if s.optimized else set()), states

    install_udev_rule()
    agent = AgentDaemon(extra_config=LIO_ARRAY)
    try:
        expected_members = len({s.optimized for s in segments if s.optimized})

        def routed():
            return next((r for r in status() if r["state"] == "routed" and len(r["members"]) == expected_members
                         and all(m["paths"] for m in r["members"])), None)
        lun = wait_for(routed, 120, "the LIO LUN to be routed with a path to every optimized port group")
        assert lun["map_source"] == "referrals"
        assert {m["member_id"] for m in lun["members"]} == {s.optimized for s in segments if s.optimized}
        record.update(region_bytes=lun["page_size_bytes"], regions=lun["pages"],
                      dont_care_regions=lun["unallocated_pages"])
        per_segment = check_io(lun["device"], segments, groups)
        tail = segments[-1].last_lba + 1
        if tail * BLOCK_BYTES < SIZE:  # LBAs in no segment: don't care, but one port only
            per_segment += check_io(lun["device"], [Segment(tail, SIZE // BLOCK_BYTES - 1, None)], groups)
        record["segments"] = per_segment
    finally:
        assert agent.stop() == 0


def check_io(device: str, segments: list[Segment], groups: int) -> list[dict]:
    """Write+read IO_BYTES at each segment's start through one descriptor; check the port counters."""
    seen = []
    fd = os.open(device, os.O_RDWR | os.O_DIRECT)
    buf, back = mmap.mmap(-1, IO_BYTES), mmap.mmap(-1, IO_BYTES)
    try:
        for k, s in enumerate(segments):
            offset = s.first_lba * BLOCK_BYTES
            data = os.urandom(IO_BYTES)
            before = lio_referrals.port_stats()
            buf[:] = data
            assert os.pwritev(fd, [buf], offset) == IO_BYTES
            assert os.preadv(fd, [back], offset) == IO_BYTES
            assert back[:] == data, f"segment {k}: read back different data"
            after = lio_referrals.port_stats()
            delta = {g: {c: after[g][c] - before[g][c] for c in after[g]} for g in after}
            seen.append({"segment": k, "first_lba": s.first_lba, "optimized": s.optimized, "delta": delta})
            written = {g for g in delta if delta[g]["write_mbytes"]}
            read = {g for g in delta if delta[g]["read_mbytes"]}
            if s.optimized is not None:
                g = s.optimized
                assert written == {g} and delta[g]["write_mbytes"] == IO_BYTES // MIB, (k, s, delta)
                assert read == {g} and delta[g]["read_mbytes"] >= IO_BYTES // MIB, (k, s, delta)
            else:
                assert len(written) == 1 and len(read) == 1 and written == read, (k, s, delta)
    finally:
        os.close(fd)
    subprocess.run(["udevadm", "settle", "--timeout=60"], check=False)
    return seen


@pytest.fixture(scope="module")
def records():
    found: dict = {}
    yield found
    (RESULTS / "referrals-cases.json").write_text(json.dumps(found, indent=1) + "\n")


@pytest.mark.parametrize("case", range(len(CASES)), ids=[c[0] for c in CASES])
def test_each_segment_lands_on_its_optimized_port_group(case, records):
    name, groups, spec = CASES[case]
    if case > 0 or lio_referrals._state()["spec"] != spec or lio_referrals._state()["members"] != groups:
        bring_up(groups, spec)
    records[name] = {"groups": groups, "spec": spec}
    run_case(groups, spec, records[name])


def test_a_layout_change_is_picked_up_by_refresh(records):
    """Rewrite the lba_map under a routed LUN: refresh must fetch it and move the regions."""
    groups, spec = 4, "16M:3,16M:1,16M:4,16M:2"
    install_udev_rule()
    before_spec = lio_referrals._state()["spec"]
    assert lio_referrals._state()["members"] == groups, "runs after a 4-group case"
    agent = AgentDaemon(extra_config=LIO_ARRAY)
    try:
        lun = wait_for(lambda: next((r for r in status() if r["state"] == "routed"), None), 120, "routed")
        generation = lun["generation"]
        segments = lio_referrals.set_map(spec)
        refreshed = json.loads(agent_cli("refresh", lun["wwid"], "--json").stdout)
        assert refreshed["generation"] != generation, "the digest of the new REPORT REFERRALS differs"
        assert {m["member_id"] for m in refreshed["members"]} == {1, 2, 3, 4}
        records["refresh"] = {"from": before_spec, "to": spec,
                              "segments": check_io(refreshed["device"], segments, groups)}
    finally:
        assert agent.stop() == 0
        remove_our_devices()
