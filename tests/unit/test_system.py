"""agent.system.RealSystem over a sysfs and /dev made of plain files: path candidates and the fd cache."""

from __future__ import annotations

import asyncio
import os
from types import SimpleNamespace

import pytest

from agent.config import Config
from agent.kernel.dm_abi import DeviceEntry
from agent.topology import NewPath
from agent.system import RealSystem


def make(tmp_path, monkeypatch) -> RealSystem:
    monkeypatch.setattr("agent.system.DeviceMapper", lambda prefix: None)  # this host has no dm
    (tmp_path / "dev").mkdir()
    return RealSystem(Config(), sysfs_root=str(tmp_path / "sys"), dev_root=str(tmp_path / "dev"))


def add_disk(tmp_path, name: str, *, dev: str, wwid: str | None, size: int = 2048) -> None:
    block = tmp_path / "sys" / "block" / name
    (block / "device").mkdir(parents=True)
    (block / "dev").write_text(dev + "\n")
    (block / "size").write_text(f"{size}\n")
    if wwid is not None:
        (block / "device" / "wwid").write_text(wwid + "\n")
    (tmp_path / "dev" / name).write_bytes(b"")


def test_a_disk_is_described_in_multipaths_naming(tmp_path, monkeypatch):
    system = make(tmp_path, monkeypatch)
    add_disk(tmp_path, "sda", dev="8:0", wwid="naa.6025341db82da163d3bd459a2676ee53")
    add_disk(tmp_path, "sdb", dev="8:16", wwid="t10.LIO-ORG vol0")
    add_disk(tmp_path, "sdc", dev="8:32", wwid=None)
    assert asyncio.run(system.describe_path("sda")) == NewPath("sda", "8:0", "36025341db82da163d3bd459a2676ee53", 2048)
    assert asyncio.run(system.describe_path("sdb")) is None  # no multipath form: wait for multipathd
    assert asyncio.run(system.describe_path("sdc")) is None  # no identifier
    assert asyncio.run(system.describe_path("sdq")) is None  # gone
    assert asyncio.run(system.describe_path("sda", {"3600other"})) is None  # not a LUN asked about
    assert asyncio.run(system.describe_path("sda", {"36025341db82da163d3bd459a2676ee53"})).dev == "8:0"


def test_a_disk_replaced_under_the_same_name_gets_a_new_fd(tmp_path, monkeypatch):
    system = make(tmp_path, monkeypatch)
    add_disk(tmp_path, "sda", dev="8:0", wwid="naa.60")
    first = system.open_path("sda")
    assert system.open_path("sda") is first
    os.unlink(tmp_path / "dev" / "sda")  # the session logged out; a new disk took the name
    (tmp_path / "dev" / "sda").write_bytes(b"")
    second = system.open_path("sda")
    assert second is not first and second.fileno() >= 0
    with pytest.raises(ValueError):
        first.fileno()  # closed


def add_map(tmp_path, minor: int, slaves: list[str], size: int = 2048) -> None:
    block = tmp_path / "sys" / "block" / f"dm-{minor}"
    (block / "slaves").mkdir(parents=True)
    (block / "size").write_text(f"{size}\n")
    for slave in slaves:
        (block / "slaves" / slave).write_text("")  # a symlink in sysfs; only the name counts


def test_multipath_maps_are_read_from_sysfs_only_for_the_lun_asked_about(tmp_path, monkeypatch):
    system = make(tmp_path, monkeypatch)
    for k, name in enumerate(("sda", "sdb", "sdc")):
        add_disk(tmp_path, name, dev=f"8:{16 * k}", wwid=None, size=4096 if name == "sdc" else 2048)
    add_map(tmp_path, 0, ["sda", "sdb"])
    add_map(tmp_path, 1, ["sdc", "sdq"])  # sdq went away while we look: left out
    system.dm = SimpleNamespace(list_devices=lambda: [
        DeviceEntry("mpatha", "mpath-3600a", 254, 0, 0), DeviceEntry("mpathb", "mpath-3600b", 254, 1, 0),
        DeviceEntry("vg-lv", "LVM-xyz", 254, 2, 0)])
    maps = asyncio.run(system.find_mpath_maps())
    assert [(m.wwid, m.device, m.slaves, m.size_sectors) for m in maps] == [
        ("3600a", "dm-0", (("sda", "8:0"), ("sdb", "8:16")), 2048), ("3600b", "dm-1", (("sdc", "8:32"),), 4096)]
    read = []
    stacks = system.sysfs._stacks

    def counting(names):
        read.append(names)
        return stacks(names)

    system.sysfs._stacks = counting
    assert [m.wwid for m in asyncio.run(system.find_mpath_maps("3600b"))] == ["3600b"]
    assert read == [["dm-1"]]  # one worker-thread call, for the one map asked about


def test_a_map_removed_while_listed_is_left_out_and_so_is_a_path_that_does_not_read(tmp_path, monkeypatch):
    system = make(tmp_path, monkeypatch)
    add_disk(tmp_path, "sda", dev="8:0", wwid=None)
    add_map(tmp_path, 0, ["sda"])
    system.dm = SimpleNamespace(list_devices=lambda: [
        DeviceEntry("mpatha", "mpath-3600a", 254, 0, 0), DeviceEntry("mpathb", "mpath-3600b", 254, 1, 0)])
    assert [m.wwid for m in asyncio.run(system.find_mpath_maps())] == ["3600a"]  # dm-1 has no sysfs entry
    (tmp_path / "sys" / "block" / "sda" / "dev").write_text("eight:zero\n")
    assert [m.slaves for m in asyncio.run(system.find_mpath_maps())] == [()]  # as a path going away
