"""agent.kernel.sysfs against a tmp tree laid out like /sys on an iSCSI + multipath host."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from agent.kernel.sysfs import (
    DevNum,
    Hctl,
    Portal,
    QueueLimits,
    Sysfs,
    SysfsError,
    SysfsGarbledError,
    SysfsMissingError,
)


def run(coro):
    return asyncio.run(coro)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _link(link: Path, target: Path) -> None:
    """A relative symlink, as sysfs makes them."""
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(target, link.parent))


def add_iscsi_disk(
    root: Path, name: str, *, host: int, session: int, devnum: str, address: str, port: int = 3260,
    target: str = "iqn.2026-11.org.example:vol", max_hw_kb: int = 32767, max_kb: int = 1280,
) -> Path:
    """An sd disk under an iSCSI session, where the kernel puts one (scsi_transport_iscsi)."""
    host_dir = root / "devices" / "platform" / f"host{host}"
    sess_dir = host_dir / f"session{session}"
    _write(sess_dir / "iscsi_session" / f"session{session}" / "targetname", target + "\n")
    _write(sess_dir / "iscsi_session" / f"session{session}" / "tpgt", "1\n")
    conn = f"connection{session}:0"
    _write(sess_dir / conn / "iscsi_connection" / conn / "persistent_address", address + "\n")
    _write(sess_dir / conn / "iscsi_connection" / conn / "persistent_port", f"{port}\n")
    hctl = f"{host}:0:0:0"
    sdev = sess_dir / f"target{host}:0:0" / hctl
    _write(sdev / "state", "running\n")
    _write(sdev / "vendor", "SWAGENT \n")
    _write(sdev / "model", "EMU-VOLUME      \n")
    bdir = sdev / "block" / name
    _write(bdir / "dev", devnum + "\n")
    _write(bdir / "size", "524288\n")
    _write(bdir / "queue" / "max_hw_sectors_kb", f"{max_hw_kb}\n")
    _write(bdir / "queue" / "max_sectors_kb", f"{max_kb}\n")
    _write(bdir / "queue" / "logical_block_size", "512\n")
    (bdir / "holders").mkdir(parents=True)
    (bdir / "slaves").mkdir(parents=True)
    _link(bdir / "device", sdev)
    _link(root / "block" / name, bdir)
    _link(root / "dev" / "block" / devnum, bdir)
    return bdir


def add_dm(root: Path, kname: str, *, name: str, uuid: str, devnum: str, slaves: list[str],
           suspended: str = "0") -> Path:
    """A dm device with its legs linked both ways, as bd_link_disk_holder does."""
    bdir = root / "devices" / "virtual" / "block" / kname
    _write(bdir / "dev", devnum + "\n")
    _write(bdir / "size", "524288\n")
    _write(bdir / "dm" / "name", name + "\n")
    _write(bdir / "dm" / "uuid", uuid + "\n")
    _write(bdir / "dm" / "suspended", suspended + "\n")
    (bdir / "slaves").mkdir(parents=True)
    (bdir / "holders").mkdir(parents=True)
    _link(root / "block" / kname, bdir)
    _link(root / "dev" / "block" / devnum, bdir)
    for slave in slaves:
        sdir = (root / "block" / slave).resolve()
        _link(bdir / "slaves" / slave, sdir)
        _link(sdir / "holders" / kname, bdir)
    return bdir


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "sys"
    add_iscsi_disk(root, "sdb", host=2, session=1, devnum="8:16", address="127.0.0.1")
    add_iscsi_disk(root, "sdc", host=3, session=2, devnum="8:32", address="127.0.0.2", port=3261)
    add_dm(root, "dm-0", name="mpatha", uuid="mpath-36001405abc", devnum="254:0", slaves=["sdb", "sdc"])
    add_dm(root, "dm-10", name="sw0", uuid="", devnum="254:10", slaves=["dm-0"], suspended="1")
    # a local non-iSCSI disk
    sdev = root / "devices" / "pci0000:00" / "host0" / "target0:0:0" / "0:0:0:0"
    _write(sdev / "state", "running\n")
    _write(sdev / "vendor", "ATA     \n")
    _write(sdev / "model", "QEMU HARDDISK\n")
    bdir = sdev / "block" / "sda"
    for attr, val in (("dev", "8:0"), ("size", "2048"), ("queue/max_hw_sectors_kb", "32767"),
                      ("queue/max_sectors_kb", "1280"), ("queue/logical_block_size", "4096")):
        _write(bdir / attr, val + "\n")
    _link(bdir / "device", sdev)
    _link(root / "block" / "sda", bdir)
    return root


def test_dm_device(tree: Path) -> None:
    sysfs = Sysfs(tree)
    dm = run(sysfs.dm_device("dm-0"))
    assert dm.kernel_name == "dm-0"
    assert dm.name == "mpatha"
    assert dm.uuid == "mpath-36001405abc"
    assert dm.suspended is False
    assert dm.size_sectors == 524288
    assert dm.dev == DevNum(254, 0) and str(dm.dev) == "254:0"
    assert dm.slaves == ("sdb", "sdc")
    sw = run(sysfs.dm_device("dm-10"))
    assert sw.uuid == "" and sw.suspended is True and sw.slaves == ("dm-0",)


def test_dm_devices_lists_in_numeric_order(tree: Path) -> None:
    sysfs = Sysfs(tree)
    assert run(sysfs.dm_kernel_names()) == ["dm-0", "dm-10"]
    assert [d.name for d in run(sysfs.dm_devices())] == ["mpatha", "sw0"]


def test_scsi_disk_with_iscsi_session(tree: Path) -> None:
    disk = run(Sysfs(tree).scsi_disk("sdc"))
    assert disk.dev == DevNum(8, 32)
    assert disk.size_sectors == 524288
    assert disk.queue == QueueLimits(max_hw_sectors_kb=32767, max_sectors_kb=1280, logical_block_size=512)
    assert disk.queue.max_transfer_bytes == 1280 * 1024
    assert disk.hctl == Hctl(3, 0, 0, 0) and str(disk.hctl) == "3:0:0:0"
    assert disk.state == "running"
    assert (disk.vendor, disk.model) == ("SWAGENT", "EMU-VOLUME")
    assert disk.iscsi is not None
    assert disk.iscsi.session == "session2"
    assert disk.iscsi.target_name == "iqn.2026-11.org.example:vol"
    assert disk.iscsi.tpgt == 1
    assert disk.iscsi.portal == Portal("127.0.0.2", 3261)
    assert str(disk.iscsi.portal) == "127.0.0.2:3261"


def test_iscsi_path_identities_name_running_iscsi_paths_by_their_session(tree: Path) -> None:
    sysfs = Sysfs(tree)
    found = run(sysfs.iscsi_path_identities(["sda", "sdb", "sdc", "sdq"]))
    # sda is a local disk, sdq is gone: neither has an identity; the others name their session.
    assert sorted(found) == ["sdb", "sdc"]
    assert found["sdb"].endswith(os.path.join("host2", "session1", "target2:0:0", "2:0:0:0"))
    assert found["sdc"].endswith(os.path.join("session2", "target3:0:0", "3:0:0:0"))
    # A path in recovery is not named: what it lands on must be asked again once it runs.
    (Path(found["sdb"]) / "state").write_text("blocked\n")
    assert sorted(run(sysfs.iscsi_path_identities(["sdb", "sdc"]))) == ["sdc"]


def test_non_iscsi_disk_has_no_session(tree: Path) -> None:
    disk = run(Sysfs(tree).scsi_disk("sda"))
    assert disk.iscsi is None
    assert disk.queue.logical_block_size == 4096


def test_holders_and_slaves(tree: Path) -> None:
    sysfs = Sysfs(tree)
    assert run(sysfs.holders("sdb")) == ("dm-0",)
    assert run(sysfs.slaves("sdb")) == ()


def test_block_name_from_devnum(tree: Path) -> None:
    sysfs = Sysfs(tree)
    assert run(sysfs.block_name(DevNum(8, 16))) == "sdb"
    assert run(sysfs.block_name("254:10")) == "dm-10"
    assert run(sysfs.block_name((8, 32))) == "sdc"
    with pytest.raises(SysfsMissingError) as err:
        run(sysfs.block_name("9:9"))
    assert err.value.path.endswith("dev/block/9:9")


def test_missing_device_is_typed(tree: Path) -> None:
    with pytest.raises(SysfsMissingError) as err:
        run(Sysfs(tree).dm_device("dm-7"))
    assert "dm-7" in err.value.path
    assert isinstance(err.value, SysfsError)
    assert err.value.path in str(err.value)


def test_garbled_attributes_are_typed(tree: Path) -> None:
    sysfs = Sysfs(tree)
    (tree / "block" / "dm-0" / "dm" / "suspended").write_text("maybe\n")
    with pytest.raises(SysfsGarbledError, match="suspended: expected 0 or 1"):
        run(sysfs.dm_device("dm-0"))
    (tree / "block" / "sdb" / "size").write_text("lots\n")
    with pytest.raises(SysfsGarbledError, match="decimal integer"):
        run(sysfs.size_sectors("sdb"))
    (tree / "block" / "sdb" / "dev").write_text("8-16\n")
    with pytest.raises(SysfsGarbledError, match="major:minor"):
        run(sysfs.block_devnum("sdb"))
    (tree / "block" / "sdb" / "dev").write_bytes(b"\xff\xfe\n")
    with pytest.raises(SysfsGarbledError, match="UTF-8"):
        run(sysfs.block_devnum("sdb"))


def test_device_names_cannot_escape_the_root(tree: Path) -> None:
    with pytest.raises(ValueError):
        run(Sysfs(tree).dm_device("../etc"))


def test_dm_devices_skips_one_that_vanished(tree: Path) -> None:
    (tree / "devices" / "virtual" / "block" / "dm-10" / "dm" / "name").unlink()
    assert [d.kernel_name for d in run(Sysfs(tree).dm_devices())] == ["dm-0"]


def test_devnum_parse() -> None:
    assert DevNum.parse("253:7\n") == DevNum(253, 7)
    for bad in ("253", "a:b", "1:2:3", ""):
        with pytest.raises(ValueError):
            DevNum.parse(bad)


def test_portals_compare_addresses_as_ip_addresses() -> None:
    from agent.kernel.sysfs import Portal

    assert Portal("fd00::1", 3260).same_as(Portal("fd00:0:0::1", 3260))
    assert Portal("[fd00::1]", 3260).same_as(Portal("fd00::1", 3260))
    assert not Portal("fd00::1", 3260).same_as(Portal("fd00::1", 3261))
    assert not Portal("10.0.0.1", 3260).same_as(Portal("10.0.0.2", 3260))
    assert Portal("Array.Example", 3260).same_as(Portal("array.example", 3260))
