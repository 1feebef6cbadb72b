"""Guest checks of the emulated array: identity per path, page map over SG_IO, baseline I/O, bad input.

Runs inside the VM rig, after `python -m tests.array up` and `login` and
once multipathd has its map:

    python -m tests.vm.run --members 3 --size 256M --page-size 1M -- \
        python -m pytest -q -s -p no:cacheprovider tests/guest/test_array.py

Skipped anywhere else (no emulator server answering).
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

import numpy as np
import pytest

from agent.kernel.sgio import ScsiCommandError, sg_io
from protocol import pagemap, scsi
from tests.array import control

pytestmark = pytest.mark.guest

MIB = 1 << 20


def array(*args: str) -> dict:
    """`python -m tests.array ARGS --json`, parsed."""
    out = subprocess.run([sys.executable, "-m", "tests.array", *args, "--json"], check=True,
                         capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def info() -> dict:
    if not control.server_running(control.run_dir()):
        pytest.skip("no emulated array is up (runs in the VM rig)")
    data = array("info")
    if not data["multipath_map"] or not all(m["paths"] for m in data["members"]):
        pytest.skip("not logged in to every member (run the rig without --no-login)")
    return data


def scsi_command(device: str, cdb: bytes, *, read: int = 0, data_out: bytes | None = None
                 ) -> tuple[bool, bytes, scsi.Sense | None]:
    """One CDB through SG_IO (the agent's wrapper): (GOOD?, data-in, sense on CHECK CONDITION)."""
    fd = os.open(device, os.O_RDWR | os.O_NONBLOCK)
    try:
        result = sg_io(fd, cdb, data_in_length=read, data_out=data_out, device=device)
    except ScsiCommandError as exc:
        return False, b"", exc.sense
    finally:
        os.close(fd)
    return True, result.data_in, None


def vpd(device: str, page: int) -> bytes:
    good, data, sense = scsi_command(device, scsi.build_inquiry_cdb(evpd=True, page_code=page,
                                                                    allocation_length_bytes=1024), read=1024)
    assert good, sense
    return data


def aligned_buffer(size: int) -> mmap.mmap:
    """Page-aligned memory for O_DIRECT."""
    return mmap.mmap(-1, size)


def direct_io(path: str, offset: int, length: int, data: bytes | None = None) -> bytes:
    """One O_DIRECT write (data given) or read at `offset`."""
    buf = aligned_buffer(length)
    fd = os.open(path, (os.O_RDWR if data is not None else os.O_RDONLY) | os.O_DIRECT)
    try:
        if data is not None:
            buf[:] = data
            assert os.pwritev(fd, [buf], offset) == length
            return b""
        assert os.preadv(fd, [buf], offset) == length
        return bytes(buf)
    finally:
        os.close(fd)
        buf.close()


# -- identity -------------------------------------------------------------------------------

def test_every_path_reports_one_unit_and_its_own_member(info) -> None:
    seen = {}
    for member in info["members"]:
        for path in member["paths"]:
            page83 = scsi.decode_device_identification_vpd(vpd(path, 0x83))
            identity = pagemap.decode_member_identity_vpd(vpd(path, 0xC0))
            serial = scsi.decode_unit_serial_number_vpd(vpd(path, 0x80)).serial_number
            seen[path] = (page83.logical_unit_naa().wwid, serial, page83.target_port_group_id(),
                          page83.relative_target_port_id(), identity.member_id)
            assert identity.member_id == member["member_id"] == page83.target_port_group_id()
            assert identity.name == member["name"]
    assert {v[0] for v in seen.values()} == {info["wwid"]}
    assert {v[1] for v in seen.values()} == {info["serial"]}
    assert len({v[3] for v in seen.values()}) == len(seen)  # relative target ports unique
    # multipathd grouped them under that WWID (udev's ID_SERIAL from the NAA designator).
    assert info["multipath_map"]


def test_page_map_over_sg_io_matches_the_array(info) -> None:
    path = info["members"][-1]["paths"][0]
    assembler = pagemap.PageMapAssembler()
    while not assembler.complete:
        good, data, sense = scsi_command(path, pagemap.build_get_page_map_cdb(assembler.next_page, 4096),
                                         read=4096)
        assert good, sense
        assembler.add(pagemap.decode_page_map_response(data))
    result = assembler.result()
    assert result.generation == info["generation"]
    assert result.total_pages == info["total_pages"]
    page = info["page_size_bytes"]
    sample = random.Random(1).sample(range(result.total_pages), min(20, result.total_pages))
    owners = array("owner", *(str(p * page) for p in sample))
    for p, owner in zip(sample, owners if isinstance(owners, list) else [owners]):
        assert result.members[result.owners[p]].member_id == owner["member_id"]


# -- baseline I/O -------------------------------------------------------------------------------

def test_baseline_io_through_multipath(info, capsys) -> None:
    """64 MiB at random page-aligned offsets through the map, O_DIRECT; read back on every path."""
    mpath = info["multipath_map"]
    page = info["page_size_bytes"]
    members = len(info["members"])
    chunk = min(page, MIB)
    chunks = (64 * MIB) // chunk
    pages = info["total_pages"]
    rng = random.Random(42)
    offsets = [p * page for p in rng.sample(range(pages - 1), min(chunks, pages - 1))]
    while len(offsets) < chunks:  # volume has fewer pages than chunks: reuse pages, new offsets
        offsets.append(rng.randrange(pages - 1) * page + (len(offsets) % max(1, page // chunk)) * chunk)
    payload = {off: np.random.default_rng(off).integers(0, 256, chunk, dtype=np.uint8).tobytes()
               for off in offsets}
    array("stats", "--reset")
    for off, data in payload.items():
        direct_io(mpath, off, chunk, data)
    for off, data in payload.items():
        assert direct_io(mpath, off, chunk) == data, f"mismatch at {off}"
    stats = array("stats")
    # Same data on every path (one shared store behind every member).
    for member in info["members"]:
        for off in list(payload)[:4]:
            assert direct_io(member["paths"][0], off, chunk) == payload[off]
    direct = sum(c["direct_bytes"] for c in stats["members"].values())
    forwarded = sum(c["forwarded_bytes"] for c in stats["members"].values())
    share = forwarded / (direct + forwarded)
    with capsys.disabled():
        print(f"\nbaseline: {len(payload)} x {chunk} B at random page-aligned offsets, {members} members, "
              f"layout {info['layout']}: forwarded {share:.1%} (expected about {(members - 1) / members:.1%})")
        print(f"{'member':8} {'direct_cmds':>12} {'direct_bytes':>14} {'fwd_cmds':>10} {'fwd_bytes':>14}")
        for name, c in stats["members"].items():
            print(f"{name:8} {c['direct_cmds']:12} {c['direct_bytes']:14} {c['forwarded_cmds']:10} "
                  f"{c['forwarded_bytes']:14}")
    assert direct + forwarded >= 2 * 64 * MIB  # written and read back
    assert abs(share - (members - 1) / members) < 0.15
    assert all(c["direct_cmds"] + c["forwarded_cmds"] > 0 for c in stats["members"].values())


# -- bad input ----------------------------------------------------------------------------------

def expect_sense(outcome: tuple[bool, bytes, scsi.Sense | None], asc_ascq: tuple[int, int]) -> None:
    good, _data, sense = outcome
    assert not good and sense is not None, outcome
    assert (sense.key, sense.asc, sense.ascq) == (scsi.SenseKey.ILLEGAL_REQUEST, *asc_ascq), str(sense)


def test_bad_input_gets_clean_sense_and_changes_nothing(info) -> None:
    path = info["members"][0]["paths"][0]
    blocks = info["size_bytes"] // 512
    marker = bytes(range(256)) * 4
    good, _, sense = scsi_command(path, scsi.build_write_10_cdb(8, 2), data_out=marker)
    assert good, sense
    for opcode in (0x02, 0x42, 0xC1, 0xEE, 0xFF):
        cdb = bytes([opcode]) + bytes(scsi.cdb_length_for_opcode(opcode) - 1)
        expect_sense(scsi_command(path, cdb), (0x20, 0x00))
    expect_sense(scsi_command(path, scsi.build_read_16_cdb(blocks, 1), read=512), (0x21, 0x00))
    expect_sense(scsi_command(path, scsi.build_write_10_cdb(blocks - 1, 2), data_out=bytes(1024)),
                 (0x21, 0x00))
    # A short write: the CDB says 2 blocks, 1000 bytes come. LIO's own answer for its backstores.
    expect_sense(scsi_command(path, scsi.build_write_10_cdb(8, 2), data_out=b"x" * 1000), (0x0E, 0x03))
    bad_map = bytearray(pagemap.build_get_page_map_cdb(0, 4096))
    bad_map[1] = 0x80
    expect_sense(scsi_command(path, bytes(bad_map), read=4096), (0x24, 0x00))
    expect_sense(scsi_command(path, pagemap.build_get_page_map_cdb(info["total_pages"] + 1, 4096),
                              read=4096), (0x24, 0x00))
    # Still up, data intact.
    assert array("info")["generation"] == info["generation"]
    good, data, sense = scsi_command(path, scsi.build_read_10_cdb(8, 2), read=1024)
    assert good and data == marker, sense


def test_page_move_raises_inquiry_data_changed_on_every_path(info) -> None:
    paths = [p for m in info["members"] for p in m["paths"]]
    before = subprocess.run(["dmesg"], capture_output=True, text=True).stdout.count("Inquiry data has changed")
    moved = array("move", "--fraction", "0.1")
    assert moved["generation"] == info["generation"] + 1
    for path in paths:
        # Our TUR, or multipathd's checker before it, gets the unit attention once.
        subprocess.run(["sg_turs", path], capture_output=True, timeout=30)
        assert subprocess.run(["sg_turs", path], capture_output=True, timeout=30).returncode == 0
    after = subprocess.run(["dmesg"], capture_output=True, text=True).stdout.count("Inquiry data has changed")
    assert after - before == len(paths)
    identity = pagemap.decode_member_identity_vpd(vpd(paths[0], 0xC0))
    assert identity.generation == moved["generation"]


# -- membership and size changes (last: they change the array for good) ------------------------------

def map_paths(name: str) -> set[str]:
    """The sd devices under multipathd's map now."""
    dm = Path(os.path.realpath(name)).name
    return {p.name for p in Path(f"/sys/block/{dm}/slaves").iterdir()}


def wait_until(what: str, predicate, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)  # polling sysfs / multipathd with a deadline


def test_add_member_then_remove_it(info) -> None:
    mpath = info["multipath_map"]
    before = map_paths(mpath)
    added = array("add-member")
    number = added["number"]
    assert added["generation"] > info["generation"]
    array("login", "--member", str(number))
    now = array("info")
    new_paths = next(m["paths"] for m in now["members"] if m["number"] == number)
    assert new_paths and pagemap.decode_member_identity_vpd(vpd(new_paths[0], 0xC0)).member_id == added["member_id"]
    wait_until("the new path in the map", lambda: {Path(p).name for p in new_paths} <= map_paths(mpath))
    assert next(m["pages"] for m in now["members"] if m["number"] == number) > 0
    data = bytes(range(256)) * 16
    direct_io(mpath, 0, len(data), data)
    removed = array("remove-member", str(number))
    assert removed["generation"] > added["generation"]
    assert map_paths(mpath) == before
    after = array("info")
    assert number not in [m["number"] for m in after["members"]]
    assert sum(m["pages"] for m in after["members"]) == after["total_pages"]
    assert direct_io(mpath, 0, len(data)) == data


def test_resize_grows_the_volume(info) -> None:
    path = info["members"][0]["paths"][0]
    before = subprocess.run(["dmesg"], capture_output=True, text=True).stdout.count("Capacity data has changed")
    grown = array("resize", "--size", str(info["size_bytes"] + 64 * MIB))
    assert grown["total_pages"] == info["total_pages"] + (64 * MIB) // info["page_size_bytes"]
    scsi_command(path, scsi.build_test_unit_ready_cdb())  # takes the unit attention if nobody did
    good, data, sense = scsi_command(path, scsi.build_read_capacity_16_cdb(32), read=32)
    assert good, sense
    assert scsi.decode_read_capacity_16(data).capacity_bytes == info["size_bytes"] + 64 * MIB
    wait_until("the kernel's capacity-changed message", lambda: subprocess.run(
        ["dmesg"], capture_output=True, text=True).stdout.count("Capacity data has changed") > before)
