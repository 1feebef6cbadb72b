"""agent/kernel (sgio, sysfs, udev) against the real kernel: run inside the VM rig only.

    python -m tests.vm.run -- .venv/bin/python -m pytest -q tests/guest/test_kernel_layers.py

The rig (tests/vm) boots a Debian kernel with the emulated array (tests/array)
on LIO+TCMU, logs in over iSCSI and waits for multipathd's map; it passes the
map in SWITCH_AGENT_MPATH_{NAME,UUID,DEV,PATHS}. Tests needing the logged-in
array skip when those are absent (``--no-login``); the udev and sysfs tests on
a dm device of their own run either way. Every dm device made here is named
``swagent-kl-test-<pid>-*`` and removed in a finally.
"""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
import time

import pytest

from agent.kernel.sgio import ScsiCommandError, ScsiDevice, ScsiResult
from agent.kernel.sysfs import DevNum, Sysfs
from agent.kernel.udev import UdevEvent, UdevMonitor, enumerate_existing
from protocol.pagemap import (
    HEADER_FIXED_BYTES,
    MAX_ALLOCATION_LENGTH,
    PageMapAssembler,
    build_get_page_map_cdb,
    decode_page_map_header,
    decode_page_map_response,
)
from protocol.scsi.capacity import decode_read_capacity_16
from protocol.scsi.cdb import build_inquiry_cdb, build_read_capacity_16_cdb, build_test_unit_ready_cdb
from protocol.scsi.constants import AdditionalSense, SenseKey
from protocol.scsi.inquiry import decode_standard_inquiry
from protocol.scsi.vpd import decode_device_identification_vpd

pytestmark = pytest.mark.skipif(
    os.environ.get("SWITCH_AGENT_VM") != "1" or os.geteuid() != 0,
    reason="needs the VM rig's real kernel (python -m tests.vm.run)",
)

PATHS = os.environ.get("SWITCH_AGENT_MPATH_PATHS", "").split()
MEMBERS = int(os.environ.get("SWITCH_AGENT_MEMBERS", "0") or 0)
needs_map = pytest.mark.skipif(not PATHS, reason="no multipath map (rig ran with --no-login or no array)")
TEST_PREFIX = f"swagent-kl-test-{os.getpid()}"
TIMEOUT_S = 60.0


def run(coro, timeout: float = TIMEOUT_S):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def execute(path: str, cdb: bytes, length: int = 0) -> ScsiResult:
    async with ScsiDevice(path) as dev:
        return await dev.execute(cdb, data_in_length=length)


async def _retry_unit_attention(dev: ScsiDevice, cdb: bytes, length: int) -> ScsiResult:
    """The first command on a path may meet a pending unit attention; the second one runs."""
    for attempt in range(3):
        try:
            return await dev.execute(cdb, data_in_length=length)
        except ScsiCommandError as exc:
            if exc.sense is None or exc.sense.key != SenseKey.UNIT_ATTENTION or attempt == 2:
                raise
    raise AssertionError("unreachable")


# --- SG_IO ------------------------------------------------------------------------


@needs_map
def test_inquiry_vpd83_and_read_capacity_on_each_path() -> None:
    async def main():
        sysfs = Sysfs()
        naas, ports = set(), set()
        for path in PATHS:
            async with ScsiDevice(path) as dev:
                std = decode_standard_inquiry(
                    (await _retry_unit_attention(dev, build_inquiry_cdb(allocation_length_bytes=96), 96)).data_in)
                vpd = decode_device_identification_vpd(
                    (await dev.execute(build_inquiry_cdb(evpd=True, page_code=0x83, allocation_length_bytes=512),
                                       data_in_length=512)).data_in)
                cap = decode_read_capacity_16(
                    (await dev.execute(build_read_capacity_16_cdb(32), data_in_length=32)).data_in)
                disk = await sysfs.scsi_disk(dev.name)
                print(f"{path}: {std.vendor!r} {std.product!r} naa={vpd.logical_unit_naa()} "
                      f"rtp={vpd.relative_target_port_id()} tpg={vpd.target_port_group_id()} "
                      f"blocks={cap.block_count} x {cap.block_length_bytes}")
                assert std.vendor.strip() == disk.vendor and std.product.strip() == disk.model
                naas.add(vpd.logical_unit_naa())
                ports.add(vpd.relative_target_port_id())
                assert cap.block_count * cap.block_length_bytes == disk.size_sectors * 512
                if "SWITCH_AGENT_SIZE" in os.environ:
                    assert cap.block_count * cap.block_length_bytes == int(os.environ["SWITCH_AGENT_SIZE"])
        assert len(naas) == 1 and None not in naas, "every path must report the one LU's NAA"
        assert len(ports) == len(PATHS), "each path should land on its own relative target port"

    run(main())


@needs_map
def test_max_transfer_bytes_is_sane() -> None:
    async def main():
        sysfs = Sysfs()
        for path in PATHS:
            async with ScsiDevice(path, sysfs=sysfs) as dev:
                limit = await dev.max_transfer_bytes()
                q = await sysfs.queue_limits(dev.name)
                print(f"{path}: max_transfer_bytes={limit} ({q})")
                assert limit == min(q.max_hw_sectors_kb, q.max_sectors_kb) * 1024
                assert 64 * 1024 <= limit <= 0xFFFF * 512  # iscsi_tcp: .max_sectors = 0xFFFF
                assert limit % q.logical_block_size == 0

    run(main())


@needs_map
def test_get_page_map_fetches_and_decodes_on_each_path() -> None:
    async def main():
        maps = []
        for path in PATHS:
            async with ScsiDevice(path) as dev:
                alloc = min(await dev.max_transfer_bytes(), MAX_ALLOCATION_LENGTH)
                head = await _retry_unit_attention(dev, build_get_page_map_cdb(0, HEADER_FIXED_BYTES),
                                                   HEADER_FIXED_BYTES)
                header = decode_page_map_header(head.data_in)
                assembler = PageMapAssembler()
                chunks = 0
                while not assembler.complete:
                    res = await dev.execute(build_get_page_map_cdb(assembler.next_page, alloc),
                                            data_in_length=alloc)
                    assembler.add(decode_page_map_response(res.data_in))
                    chunks += 1
                page_map = assembler.result()
                print(f"{path}: generation {page_map.generation}, {page_map.total_pages} pages of "
                      f"{page_map.page_size_sectors} sectors in {chunks} chunk(s), "
                      f"per member {page_map.pages_per_member()}")
                assert page_map.generation == header.generation
                if MEMBERS:
                    assert len(page_map.members) == MEMBERS
                if "SWITCH_AGENT_SIZE" in os.environ and "SWITCH_AGENT_PAGE_SIZE" in os.environ:
                    size, page = int(os.environ["SWITCH_AGENT_SIZE"]), int(os.environ["SWITCH_AGENT_PAGE_SIZE"])
                    assert page_map.page_size_sectors * 512 == page
                    assert page_map.total_pages == math.ceil(size / page)
                maps.append(page_map)
        first = maps[0]
        for other in maps[1:]:
            assert other.generation == first.generation and other.members == first.members
            assert (other.owners == first.owners).all(), "every member must serve the same map"

    run(main())


@needs_map
def test_bad_get_page_map_comes_back_as_typed_check_condition() -> None:
    async def main():
        async with ScsiDevice(PATHS[0]) as dev:
            head = await _retry_unit_attention(dev, build_get_page_map_cdb(0, HEADER_FIXED_BYTES),
                                               HEADER_FIXED_BYTES)
            total = decode_page_map_header(head.data_in).total_pages
            with pytest.raises(ScsiCommandError) as err:
                await dev.execute(build_get_page_map_cdb(total + 1, 4096), data_in_length=4096)
            return err.value

    err = run(main())
    print(err)
    assert err.sense is not None
    assert err.sense.key == SenseKey.ILLEGAL_REQUEST
    assert err.sense.additional_sense == AdditionalSense.INVALID_FIELD_IN_CDB
    assert str(err).endswith("GET PAGE MAP (0xc8): CHECK CONDITION, ILLEGAL REQUEST: INVALID FIELD IN CDB (24/00)")


# --- SG_IO, sysfs and udev on scsi_debug (no array needed) ---------------------


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), check=check, timeout=60, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True)


def _scsi_debug_disks() -> list[str]:
    found = []
    for block in sorted(os.listdir("/sys/block")):
        try:
            with open(f"/sys/block/{block}/device/model") as f:
                if f.read().strip() == "scsi_debug":
                    found.append(block)
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def scsi_debug_disk():
    """One scsi_debug disk (16 MiB), removed afterwards with whatever multipathd built on it."""
    if _scsi_debug_disks():
        pytest.skip("scsi_debug already loaded by someone else")
    _sh("modprobe", "scsi_debug", "dev_size_mb=16", "num_tgts=1", "max_luns=1")
    try:
        deadline = time.monotonic() + 30
        while not _scsi_debug_disks():
            assert time.monotonic() < deadline, "scsi_debug loaded but no disk appeared"
            time.sleep(0.2)
        _sh("udevadm", "settle", "-t", "30", check=False)
        yield _scsi_debug_disks()[0]
    finally:
        for disk in _scsi_debug_disks():
            for holder in os.listdir(f"/sys/block/{disk}/holders") if os.path.isdir(f"/sys/block/{disk}/holders") else []:
                with open(f"/sys/block/{holder}/dm/name") as f:
                    _sh("multipath", "-f", f.read().strip(), check=False)
        _sh("udevadm", "settle", "-t", "30", check=False)
        r = _sh("rmmod", "scsi_debug", check=False)
        if r.returncode:
            print(f"rmmod scsi_debug failed (left loaded): {r.stderr.strip()}")


def test_sgio_on_scsi_debug(scsi_debug_disk: str) -> None:
    """The real SG_IO ABI: data-in, resid trim, VPD, capacity, and an unknown opcode's sense."""
    async def main():
        sysfs = Sysfs()
        async with ScsiDevice(f"/dev/{scsi_debug_disk}", sysfs=sysfs) as dev:
            res = await dev.execute(build_inquiry_cdb(allocation_length_bytes=255), data_in_length=255)
            std = decode_standard_inquiry(res.data_in)
            assert (std.vendor.strip(), std.product.strip()) == ("Linux", "scsi_debug")
            assert len(res.data_in) == 255 - res.resid and res.duration_ms >= 0
            vpd = decode_device_identification_vpd((await dev.execute(
                build_inquiry_cdb(evpd=True, page_code=0x83, allocation_length_bytes=512),
                data_in_length=512)).data_in)
            assert vpd.logical_unit_naa() is not None
            cap = decode_read_capacity_16((await dev.execute(build_read_capacity_16_cdb(32),
                                                             data_in_length=32)).data_in)
            disk = await sysfs.scsi_disk(dev.name)
            assert cap.block_count * cap.block_length_bytes == disk.size_sectors * 512 == 16 << 20
            assert disk.iscsi is None and disk.vendor == "Linux"
            assert await dev.max_transfer_bytes() == disk.queue.max_transfer_bytes
            with pytest.raises(ScsiCommandError) as err:
                await dev.execute(build_get_page_map_cdb(0, 4096), data_in_length=4096)
            print(f"{dev.name}: {std}, naa {vpd.logical_unit_naa()}, {cap.block_count} blocks; "
                  f"GET PAGE MAP -> {err.value}")
            assert err.value.sense is not None and err.value.sense.key == SenseKey.ILLEGAL_REQUEST
            assert (err.value.sense.asc, err.value.sense.ascq) == (0x20, 0x00)
            assert str(err.value).startswith(f"{dev.name}: GET PAGE MAP (0xc8): CHECK CONDITION, ILLEGAL REQUEST")

    run(main())


def test_udev_sees_a_capacity_unit_attention_on_scsi_debug(scsi_debug_disk: str) -> None:
    """scsi_debug raises CAPACITY DATA HAS CHANGED when virtual_gb changes; the next command reports it."""
    async def main():
        sysfs = Sysfs()
        hctl = str(await sysfs.hctl(scsi_debug_disk))
        async with UdevMonitor() as monitor:
            with open("/sys/bus/pseudo/drivers/scsi_debug/virtual_gb", "w") as f:
                f.write("1\n")
            try:
                await execute(f"/dev/{scsi_debug_disk}", build_test_unit_ready_cdb())
                tur = "GOOD (another command took the UA first)"
            except ScsiCommandError as exc:
                assert exc.sense is not None and exc.sense.key == SenseKey.UNIT_ATTENTION, exc
                assert exc.sense.additional_sense == AdditionalSense.CAPACITY_DATA_HAS_CHANGED, exc
                tur = str(exc)
            seen = await _wait_for(
                monitor,
                lambda e: (e.subsystem, e.devtype, e.action, e.sys_name) == ("scsi", "scsi_device", "change", hctl)
                and e.get("SDEV_UA") == "CAPACITY_DATA_HAS_CHANGED",
                f"SDEV_UA=CAPACITY_DATA_HAS_CHANGED on {hctl}")
            print("TUR:", tur, "| udev:", [(e.action, e.subsystem, e.sys_name, e.get("SDEV_UA")) for e in seen],
                  dict(seen[-1].properties))
            assert seen[-1].device_node is None

    run(main())


# --- sysfs ------------------------------------------------------------------------


@needs_map
def test_sysfs_finds_the_multipath_map_its_slaves_and_their_portals() -> None:
    async def main():
        sysfs = Sysfs()
        maps = [d for d in await sysfs.dm_devices() if d.uuid.startswith("mpath-")]
        print("multipath maps:", maps)
        mine = [d for d in maps if d.uuid == os.environ.get("SWITCH_AGENT_MPATH_UUID")]
        assert len(mine) == 1
        dm = mine[0]
        assert dm.name == os.environ["SWITCH_AGENT_MPATH_NAME"]
        assert f"/dev/{dm.kernel_name}" == os.environ["SWITCH_AGENT_MPATH_DEV"]
        assert sorted(f"/dev/{s}" for s in dm.slaves) == sorted(PATHS)
        assert not dm.suspended
        assert await sysfs.block_name(dm.dev) == dm.kernel_name
        portals = set()
        for slave in dm.slaves:
            disk = await sysfs.scsi_disk(slave)
            print(slave, disk)
            assert disk.state == "running"
            assert disk.size_sectors == dm.size_sectors
            assert dm.kernel_name in await sysfs.holders(slave)
            assert disk.iscsi is not None and disk.iscsi.portal is not None
            assert disk.iscsi.target_name.startswith("iqn.")
            portals.add(disk.iscsi.portal)
            assert await sysfs.block_name(disk.dev) == slave
        assert len(portals) == len(dm.slaves), "each path comes through its own portal"

    run(main())


# --- udev -------------------------------------------------------------------------


def _dmsetup(*args: str) -> None:
    subprocess.run(["dmsetup", *args], check=True, timeout=60, stdin=subprocess.DEVNULL)


async def _wait_for(monitor: UdevMonitor, pred, what: str, timeout: float = 30.0) -> list[UdevEvent]:
    """Events until pred(event) is true; fails naming what never came."""
    seen: list[UdevEvent] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            summary = [(e.action, e.subsystem, e.sys_name, dict(e.properties)) for e in seen]
            raise AssertionError(f"no {what} within {timeout}s; saw {summary}")
        try:
            event = await asyncio.wait_for(monitor.get(), left)
        except asyncio.TimeoutError:
            continue
        seen.append(event)
        if pred(event):
            return seen


def test_udev_sees_a_dm_device_created_and_removed_and_sysfs_reads_it() -> None:
    name = f"{TEST_PREFIX}-zero"
    uuid = f"SWAGENT-TEST-{name}"

    async def main():
        sysfs = Sysfs()
        async with UdevMonitor() as monitor:
            await asyncio.to_thread(_dmsetup, "create", name, "--uuid", uuid, "--table", "0 2048 zero")
            try:
                seen = await _wait_for(
                    monitor, lambda e: e.subsystem == "block" and e.get("DM_NAME") == name and e.action == "change",
                    f"block change event for {name}")
                change = seen[-1]
                print("create:", [(e.action, e.sys_name) for e in seen], dict(change.properties))
                assert change.devtype == "disk" and change.sys_name.startswith("dm-")
                assert change.get("DM_UUID") == uuid
                assert change.device_node == f"/dev/{change.sys_name}"
                assert any(e.action == "add" and e.sys_name == change.sys_name for e in seen)
                kname = change.sys_name
                dm = await sysfs.dm_device(kname)
                assert (dm.name, dm.uuid, dm.size_sectors, dm.suspended, dm.slaves) == (name, uuid, 2048, False, ())
                assert str(dm.dev) == f"{change.get('MAJOR')}:{change.get('MINOR')}"
                assert await sysfs.block_name(DevNum(dm.dev.major, dm.dev.minor)) == kname
                listed = await asyncio.to_thread(enumerate_existing)
                assert any(e.sys_name == kname and e.get("DM_UUID") == uuid and e.action is None for e in listed)
                if PATHS:
                    mpath = [e for e in listed if e.get("DM_UUID") == os.environ.get("SWITCH_AGENT_MPATH_UUID")]
                    assert len(mpath) == 1 and mpath[0].get("MPATH_DEVICE_READY") == "1", listed
            finally:
                await asyncio.to_thread(_dmsetup, "remove", "--retry", name)
            seen = await _wait_for(monitor, lambda e: e.action == "remove" and e.sys_name == kname,
                                   f"block remove event for {kname}")
            print("remove:", [(e.action, e.sys_name) for e in seen])

    run(main())


def _array_cli_present() -> bool:
    return os.path.exists(os.path.join(os.path.dirname(__file__), "..", "array", "__main__.py"))


@needs_map
@pytest.mark.skipif(not _array_cli_present(), reason="tests/array CLI (python -m tests.array) not in this tree")
def test_udev_sees_the_unit_attention_after_pages_move() -> None:
    async def main():
        sysfs = Sysfs()
        hctls = {}
        for path in PATHS:
            hctls[str(await sysfs.hctl(os.path.basename(path)))] = path
        async with UdevMonitor() as monitor:
            await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "tests.array", "move", "--fraction", "0.1"],
                check=True, timeout=90, stdin=subprocess.DEVNULL)
            ua_seen = {}
            for path in PATHS:  # any command on each path delivers its unit attention
                try:
                    await execute(path, build_test_unit_ready_cdb())
                    ua_seen[path] = "GOOD (multipathd's checker may have taken the UA)"
                except ScsiCommandError as exc:
                    assert exc.sense is not None and exc.sense.key == SenseKey.UNIT_ATTENTION, exc
                    assert exc.sense.additional_sense == AdditionalSense.INQUIRY_DATA_HAS_CHANGED, exc
                    ua_seen[path] = str(exc)
            print("TEST UNIT READY after move:", ua_seen)
            pending = set(hctls)

            def ua_on_a_path(e: UdevEvent) -> bool:
                if (e.subsystem, e.devtype, e.action) == ("scsi", "scsi_device", "change") \
                        and e.get("SDEV_UA") == "INQUIRY_DATA_HAS_CHANGED":
                    pending.discard(e.sys_name)
                return not pending

            seen = await _wait_for(monitor, ua_on_a_path, f"SDEV_UA=INQUIRY_DATA_HAS_CHANGED on {sorted(hctls)}")
            print("udev:", [(e.action, e.subsystem, e.sys_name, e.get("SDEV_UA")) for e in seen])

    run(main(), timeout=150)
