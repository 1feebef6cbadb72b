"""agent.system.RealSystem over a sysfs and /dev made of plain files: path candidates and the fd cache."""

from __future__ import annotations

import asyncio
import os

import pytest

from agent.config import Config
from agent.orchestrator import NewPath
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
