"""agent.kernel.udev: the asyncio monitor over a fake source on a real pipe, and pyudev mapping."""

from __future__ import annotations

import asyncio
import errno
import threading
import types

import pytest

from agent.kernel import udev
from agent.kernel.udev import (
    PyudevSource,
    UdevError,
    UdevEvent,
    UdevEventsLostError,
    UdevMonitor,
    enumerate_existing,
    event_from_device,
)
from tests.unit.fakes_udev import (
    FakeUdevSource,
    dm_disk_event,
    mpath_path_event,
    scsi_ua_event,
    sd_disk_event,
)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=10))


def test_events_reach_the_async_consumer_in_order() -> None:
    source = FakeUdevSource()

    async def main() -> list[UdevEvent]:
        got = []
        async with UdevMonitor(source) as monitor:
            source.emit(dm_disk_event("add", "dm-0", dm_name="mpatha", dm_uuid="mpath-3600a"))
            source.emit(scsi_ua_event("2:0:0:0", "INQUIRY_DATA_HAS_CHANGED"))
            source.emit(dm_disk_event("remove", "dm-0", dm_name="mpatha", dm_uuid="mpath-3600a"))
            async for event in monitor:
                got.append(event)
                if len(got) == 3:
                    break
        return got

    got = run(main())
    assert [(e.action, e.subsystem, e.devtype, e.sys_name) for e in got] == [
        ("add", "block", "disk", "dm-0"),
        ("change", "scsi", "scsi_device", "2:0:0:0"),
        ("remove", "block", "disk", "dm-0"),
    ]
    assert got[1].properties["SDEV_UA"] == "INQUIRY_DATA_HAS_CHANGED"
    assert got[1].device_node is None
    assert [e.seqnum for e in got] == [1001, 1002, 1003]
    assert source.closed


def test_events_emitted_before_start_are_not_lost() -> None:
    source = FakeUdevSource()
    source.emit(sd_disk_event("add", "sdb"))

    async def main() -> UdevEvent:
        async with UdevMonitor(source) as monitor:
            return await monitor.get()

    assert run(main()).sys_name == "sdb"


def test_events_from_another_thread_wake_the_loop() -> None:
    source = FakeUdevSource()

    async def main() -> UdevEvent:
        async with UdevMonitor(source) as monitor:
            waiter = asyncio.ensure_future(monitor.get())
            await asyncio.sleep(0.05)
            assert not waiter.done()
            threading.Thread(
                target=source.emit,
                args=(mpath_path_event("dm-0", dm_name="mpatha", wwid="3600a", dm_action="PATH_FAILED",
                                       dm_path="8:16", valid_paths=1),),
            ).start()
            return await waiter

    event = run(main())
    assert event.properties["DM_ACTION"] == "PATH_FAILED"
    assert event.properties["DM_PATH"] == "8:16"
    assert event.properties["MPATH_DEVICE_READY"] == "1"


def test_overflow_is_raised_in_place_and_the_monitor_keeps_going() -> None:
    source = FakeUdevSource()

    async def main() -> list[object]:
        seen: list[object] = []
        async with UdevMonitor(source) as monitor:
            source.emit(sd_disk_event("add", "sdb"))
            source.emit_overflow()
            source.emit(sd_disk_event("add", "sdc"))
            for _ in range(3):
                try:
                    seen.append((await monitor.get()).sys_name)
                except UdevEventsLostError as exc:
                    seen.append(exc.errno)
        return seen

    assert run(main()) == ["sdb", errno.ENOBUFS, "sdc"]


def test_a_failing_source_stops_the_reader() -> None:
    class Broken(FakeUdevSource):
        calls = 0

        def poll(self):
            self.calls += 1
            raise UdevError("receive failed", errno.EBADF)

    source = Broken()

    async def main() -> None:
        async with UdevMonitor(source) as monitor:
            with pytest.raises(UdevError, match="receive failed"):
                await monitor.get()
            source.emit(sd_disk_event("add", "sdb"))  # fd readable again
            await asyncio.sleep(0.05)
            assert monitor.pending() == 0

    run(main())
    assert source.calls == 1


def test_event_properties_are_read_only_and_complete() -> None:
    event = dm_disk_event(
        "change", "dm-3", dm_name="mpathb", dm_uuid="mpath-3600b",
        extra={"MPATH_DEVICE_READY": "0", "DM_UDEV_DISABLE_OTHER_RULES_FLAG": "1", "DM_COOKIE": "4194304"},
    )
    assert event.get("DM_UDEV_DISABLE_OTHER_RULES_FLAG") == "1"
    assert event.get("DM_SUSPENDED") is None
    with pytest.raises(TypeError):
        event.properties["DM_NAME"] = "x"  # type: ignore[index]


class _StubDevice:
    """The attributes event_from_device reads from a pyudev Device."""

    def __init__(self, action, props, **attrs):
        self.action = action
        self.properties = props
        self.subsystem = attrs.get("subsystem", "block")
        self.device_type = attrs.get("device_type", "disk")
        self.sys_name = attrs.get("sys_name", "dm-1")
        self.sys_path = attrs.get("sys_path", "/sys/devices/virtual/block/dm-1")
        self.device_node = attrs.get("device_node", "/dev/dm-1")


def test_event_from_pyudev_device_keeps_every_property() -> None:
    props = {
        "ACTION": "change", "SEQNUM": "4711", "DM_NAME": "mpatha", "DM_UUID": "mpath-36001405",
        "MPATH_DEVICE_READY": "1", "DM_UDEV_DISABLE_OTHER_RULES_FLAG": "", "DM_ACTION": "PATH_REINSTATED",
        "DM_PATH": "8:32", "SDEV_UA": "CAPACITY_DATA_HAS_CHANGED",
    }
    event = event_from_device(_StubDevice("change", props))
    assert dict(event.properties) == props
    assert event.seqnum == 4711
    assert (event.action, event.subsystem, event.devtype, event.sys_name, event.device_node) == (
        "change", "block", "disk", "dm-1", "/dev/dm-1")
    listed = event_from_device(_StubDevice(None, {"DM_NAME": "mpatha"}))
    assert listed.action is None and listed.seqnum is None


def test_enumerate_existing_asks_for_dm_disks() -> None:
    calls = []

    class Enum:
        def __init__(self, devices):
            self.devices = devices

        def match_property(self, key, value):
            calls.append(("property", key, value))
            return self

        def match_sys_name(self, pattern):
            calls.append(("sys_name", pattern))
            return self

        def __iter__(self):
            return iter(self.devices)

    devices = [
        _StubDevice(None, {"DM_NAME": "sw0"}, sys_name="dm-2", sys_path="/sys/devices/virtual/block/dm-2"),
        _StubDevice(None, {"DM_NAME": "mpatha"}, sys_name="dm-0", sys_path="/sys/devices/virtual/block/dm-0"),
    ]
    ctx = types.SimpleNamespace(list_devices=lambda **kw: calls.append(("list", kw)) or Enum(devices))
    got = enumerate_existing(context=ctx)
    assert [e.sys_name for e in got] == ["dm-0", "dm-2"]
    assert calls == [("list", {"subsystem": "block"}), ("property", "DEVTYPE", "disk"), ("sys_name", "dm-*")]


def test_fake_source_lists_existing_devices() -> None:
    existing = [dm_disk_event(None, "dm-0", dm_name="mpatha", dm_uuid="mpath-3600a")]
    source = FakeUdevSource(existing)
    try:
        assert source.enumerate_existing() == existing
        assert existing[0].action is None and "ACTION" not in existing[0].properties
    finally:
        source.close()


def test_pyudev_source_translates_enobufs() -> None:
    source = PyudevSource.__new__(PyudevSource)

    class Mon:
        def __init__(self, err):
            self.err = err

        def poll(self, timeout):
            assert timeout == 0
            if self.err:
                raise OSError(self.err, "x")
            return None

    source._monitor = Mon(errno.ENOBUFS)
    with pytest.raises(UdevEventsLostError):
        source.poll()
    source._monitor = Mon(errno.EBADF)
    with pytest.raises(UdevError) as err:
        source.poll()
    assert err.value.errno == errno.EBADF and not isinstance(err.value, UdevEventsLostError)
    source._monitor = Mon(0)
    assert source.poll() is None


def test_one_monitor_merges_two_sources_and_closes_both() -> None:
    udev_side, kernel_side = FakeUdevSource(), FakeUdevSource()

    async def main() -> list[str]:
        async with UdevMonitor(udev_side, kernel_side) as monitor:
            kernel_side.emit(sd_disk_event("add", "sdc"))
            udev_side.emit(dm_disk_event("change", "dm-0", dm_name="mpatha", dm_uuid="mpath-3600a"))
            kernel_side.emit(sd_disk_event("add", "sdd"))
            return sorted([(await monitor.get()).sys_name for _ in range(3)])

    assert run(main()) == ["dm-0", "sdc", "sdd"]
    assert udev_side.closed and kernel_side.closed


@pytest.mark.parametrize("netlink", ["udev", "kernel"])
def test_real_pyudev_monitor_opens_and_polls_empty(netlink) -> None:
    """The real netlink monitor opens on this host (no udevd needed) and poll() does not block."""
    try:
        source = PyudevSource(netlink=netlink)
    except (OSError, ImportError) as exc:  # pragma: no cover - sandboxes without netlink
        pytest.skip(f"no netlink here: {exc}")
    try:
        assert source.fileno() >= 0
        assert source.poll() is None
    finally:
        source.close()


def test_only_this_module_imports_pyudev() -> None:
    assert "pyudev" not in vars(udev)
