"""The audit's defects in the orchestrator and the daemon (issue 13): each test fails on the code before it.

A routed device must never reach another LUN, never stay suspended, and the
daemon must go on following the kernel after a lost udev event.
"""

from __future__ import annotations

import asyncio
import errno
import threading

import pytest

from agent.config import Config
from agent.daemon import Daemon, DaemonTaskError, watchdog_interval
from agent.kernel.udev import UdevMonitor
from agent.discovery import LunNotFoundError
from agent.dm_async import DeviceLeftSuspendedError
from agent.orchestrator import InternalError, Orchestrator
from agent.stack import PlanError
from protocol.errors import SwitchAgentError
from protocol.pagemap import PageMapAssembler
from tests.unit.fakes_kernel import MiB, FakeSystem, ManyLunSystem
from tests.unit.fakes_udev import FakeUdevSource, scsi_ua_event
from tests.unit.test_daemon import config, routed, until

ALIASES = Config(device_name="switch-{mpath}", max_message_bytes=4096)


def reconcile(orch: Orchestrator, wwid: str):
    return asyncio.run(orch.reconcile(wwid))


def top_of(system: FakeSystem) -> str:
    """The name of the device whose uuid is this LUN's top: what the LUN's users opened."""
    return next(d.name for d in system.dm.devices.values() if d.uuid == f"SWAGENT-top-{system.wwid}")


def paths_reached(system: FakeSystem, top: str) -> set[str]:
    """Every path (major:minor) any region of a top device leads to."""
    return {dev for region in range(system.volume.total_pages) for dev in system.dm.route_region(top, region)}


# -- 1. a routed device is addressed by its uuid, never by a name that may be another LUN's ------------------

def test_swapped_multipath_aliases_never_point_a_routed_device_at_the_other_lun(tmp_path):
    many = ManyLunSystem(2, tmp_path=tmp_path, members=3, paths_per_member=1)
    a, b = many.systems
    a.alias, b.alias = "db", "logs"
    first = Orchestrator(ALIASES, many)
    for system in (a, b):
        reconcile(first, system.wwid)
    assert (top_of(a), top_of(b)) == ("switch-db", "switch-logs")
    # The administrator swaps the aliases in multipath.conf; multipathd renames; the daemon restarts.
    a.alias, b.alias = "logs", "db"
    a.volume.move_pages(0.3)
    b.volume.move_pages(0.3)
    restarted = Orchestrator(ALIASES, many)
    asyncio.run(restarted.adopt())
    for system in (a, b):
        reconcile(restarted, system.wwid)
    for system in (a, b):
        # The device named switch-db still holds the data it held: LUN A's, reached only over A's paths.
        assert paths_reached(system, top_of(system)) <= set(system.devs.values())
        assert system.misrouted_pages(top_of(system)) == 0
    assert (top_of(a), top_of(b)) == ("switch-db", "switch-logs")
    warnings = restarted.status(restarted.luns[a.wwid]).warnings
    assert any("keeps its name switch-db" in w and "switch-logs" in w for w in warnings)
    assert restarted.find("switch-db").wwid == a.wwid and restarted.find("switch-logs").wwid == b.wwid


def test_a_new_luns_name_held_by_another_device_is_a_status_error_and_that_device_is_untouched(tmp_path):
    many = ManyLunSystem(2, tmp_path=tmp_path, members=3, paths_per_member=1)
    a, b = many.systems
    a.alias, b.alias = "db", "logs"
    orch = Orchestrator(ALIASES, many)
    reconcile(orch, b.wwid)
    b.alias = "db"  # renamed while A was not routed yet; then A takes "logs"... or the other way round
    a.alias = "logs"
    before = {n: (d.live, d.suspended) for n, d in many.dm.devices.items()}
    with pytest.raises(PlanError, match="switch-logs is taken"):
        reconcile(orch, a.wwid)
    assert {n: (d.live, d.suspended) for n, d in many.dm.devices.items()} == before
    lun = orch.luns[a.wwid]
    assert lun.state == "error" and "taken by another device" in lun.last_error
    assert b.misrouted_pages("switch-logs") == 0


# -- 3. the routed device is never left suspended ---------------------------------------------------------

def test_sigterm_in_the_middle_of_an_epoch_swap_leaves_the_top_device_resumed(tmp_path):
    system = FakeSystem(tmp_path=tmp_path / "store", size_bytes=2 * 1024 * MiB)
    cfg = config(tmp_path)
    dm = system.dm
    release = threading.Event()

    async def main():
        daemon = Daemon(cfg, system, None)
        task = asyncio.create_task(daemon.run())
        await until(lambda: routed(system, daemon))
        top = top_of(system)
        dm.hold[top] = release
        system.resize(3 * 1024 * MiB)  # a new epoch: the top's table is swapped under suspend
        daemon.scheduler.trigger(system.wwid, "test", delay_s=0)
        assert await asyncio.to_thread(dm.holding.wait, 10)
        assert dm.devices[top].suspended
        daemon.stop()  # SIGTERM while the top device is suspended
        await asyncio.wait_for(task, 10)
        release.set()  # the kernel call that was under way finishes after the daemon's tasks are gone

    asyncio.run(main())  # joins the worker threads, as the daemon's exit does
    assert not dm.devices[top_of(system)].suspended


def test_a_failed_resume_resumes_the_old_table_and_keeps_routing(tmp_path):
    system = FakeSystem(tmp_path=tmp_path / "store", size_bytes=2 * 1024 * MiB, layout="random")
    orch = Orchestrator(Config(max_message_bytes=4096), system)
    reconcile(orch, system.wwid)
    top = top_of(system)
    before = {n: d.live for n, d in system.dm.devices.items()}
    system.resize(3 * 1024 * MiB)
    system.dm.fail[("resume", top + "$")] = errno.EINVAL
    with pytest.raises(SwitchAgentError):
        reconcile(orch, system.wwid)
    assert not system.dm.devices[top].suspended
    assert {n: d.live for n, d in system.dm.devices.items()} == before  # the old epoch, whole
    assert orch.luns[system.wwid].state == "routed"
    assert reconcile(orch, system.wwid).state == "routed"  # and the next try gets through
    assert system.misrouted_pages(top) == 0 and not system.dm.devices[top].suspended


def test_a_device_that_cannot_be_resumed_is_reported_suspended_until_it_is(tmp_path):
    system = FakeSystem(tmp_path=tmp_path / "store", size_bytes=2 * 1024 * MiB)
    orch = Orchestrator(Config(max_message_bytes=4096), system)
    reconcile(orch, system.wwid)
    top = top_of(system)
    system.resize(3 * 1024 * MiB)
    system.dm.fail[("resume", top + "$")] = [errno.EINVAL, errno.EIO]  # the swap, then the resume of the old table
    with pytest.raises(DeviceLeftSuspendedError):
        reconcile(orch, system.wwid)
    lun = orch.luns[system.wwid]
    assert system.dm.devices[top].suspended
    assert lun.state == "suspended" and orch.status(lun).to_json()["state"] == "suspended"
    assert "SUSPENDED" in lun.last_error
    lun = reconcile(orch, system.wwid)
    assert lun.state == "routed" and not system.dm.devices[top].suspended
    assert system.misrouted_pages(top) == 0


def test_a_device_found_suspended_at_start_is_resumed(tmp_path):
    system = FakeSystem(tmp_path=tmp_path / "store")
    reconcile(Orchestrator(Config(max_message_bytes=4096), system), system.wwid)
    top = top_of(system)
    system.dm.device_suspend(top)  # kill -9 between suspend and resume
    fresh = Orchestrator(Config(max_message_bytes=4096), system)
    asyncio.run(fresh.adopt())
    assert not system.dm.devices[top].suspended


# -- 4. whatever goes wrong, the LUN shows it and is retried -------------------------------------------------

def test_an_unexpected_exception_is_a_typed_error_on_the_lun(tmp_path, monkeypatch):
    system = FakeSystem(tmp_path=tmp_path / "store")
    orch = Orchestrator(Config(max_message_bytes=4096), system)

    def out_of_memory(*_args, **_kw):
        raise MemoryError("forged page count")

    monkeypatch.setattr(PageMapAssembler, "add", out_of_memory)
    with pytest.raises(InternalError, match="MemoryError"):
        reconcile(orch, system.wwid)
    lun = orch.luns[system.wwid]
    assert lun.state == "error" and lun.failures == 1 and "MemoryError" in lun.last_error


def test_a_fetch_that_never_ends_is_abandoned_after_fetch_timeout_s(tmp_path, monkeypatch):
    system = FakeSystem(tmp_path=tmp_path / "store")
    orch = Orchestrator(Config(max_message_bytes=4096, fetch_timeout_s=0.2), system)

    async def trickle(path, *, restarts):
        while True:  # an array answering one entry at a time, forever
            await asyncio.sleep(0.01)

    monkeypatch.setattr("agent.mapsources.pagemap.fetch_page_map", trickle)
    with pytest.raises(SwitchAgentError, match="fetch_timeout_s"):
        reconcile(orch, system.wwid)
    assert orch.luns[system.wwid].state == "error" and not orch.luns[system.wwid].lock.locked()


# -- 7. names nobody routes are not remembered; locate stays inside the routed device ------------------------

def test_triggers_for_luns_that_do_not_exist_are_not_remembered(tmp_path):
    system = FakeSystem(tmp_path=tmp_path / "store")
    orch = Orchestrator(Config(max_message_bytes=4096), system)
    for k in range(500):
        with pytest.raises(LunNotFoundError):
            reconcile(orch, f"3600bogus{k:04d}")
    assert orch.luns == {}


def test_locate_after_a_grow_that_failed_to_route_stays_inside_the_routed_device(tmp_path):
    system = FakeSystem(tmp_path=tmp_path / "store", size_bytes=2 * 1024 * MiB)
    orch = Orchestrator(Config(max_message_bytes=4096), system)
    reconcile(orch, system.wwid)
    system.resize(3 * 1024 * MiB)
    system.dm.fail[("load", f"switch-{system.wwid}-sw")] = errno.ENOMEM
    with pytest.raises(SwitchAgentError):
        reconcile(orch, system.wwid)
    lun = orch.luns[system.wwid]
    assert orch.locate(lun, 2 * 1024 * MiB - 1).page == 2 * 1024 // 16 - 1
    with pytest.raises(ValueError, match="outside the routed device"):
        orch.locate(lun, 2 * 1024 * MiB + 5 * 16 * MiB)


# -- 6. a lost udev event does not stop the daemon following udev; a dead task stops the daemon -------------

def test_after_a_netlink_overflow_the_daemon_rescans_and_keeps_following_udev(tmp_path):
    system = FakeSystem(tmp_path=tmp_path / "store", layout="random")
    cfg = config(tmp_path)
    source = FakeUdevSource()

    async def main():
        monitor = UdevMonitor(source)
        monitor.start()
        daemon = Daemon(cfg, system, monitor)
        task = asyncio.create_task(daemon.run())
        await until(lambda: routed(system, daemon))
        lun = daemon.orchestrator.luns[system.wwid]
        source.emit_overflow()
        # The lost events may have been a page move: the rescan fetches the map again.
        system.volume.move_pages(0.2)
        await until(lambda: lun.stack.page_map.generation == system.volume.generation)
        assert system.misrouted_pages(top_of(system)) == 0
        # And udev is still followed: a unit attention after the overflow is acted on.
        system.volume.move_pages(0.2)
        source.emit(scsi_ua_event(system.hctl_of("sdb"), "MODE_PARAMETERS_CHANGED"))
        await until(lambda: lun.stack.page_map.generation == system.volume.generation)
        assert system.misrouted_pages(top_of(system)) == 0 and not task.done()
        daemon.stop()
        await task

    asyncio.run(main())


def test_a_long_lived_task_that_dies_stops_the_daemon_with_an_error(tmp_path):
    system = FakeSystem(tmp_path=tmp_path / "store")
    cfg = config(tmp_path)

    async def main():
        daemon = Daemon(cfg, system, None)

        async def broken_poll():
            raise RuntimeError("a bug in the poll loop")

        daemon._poll_forever = broken_poll
        with pytest.raises(DaemonTaskError, match="poll task ended: RuntimeError"):
            await asyncio.wait_for(daemon.run(), 10)
        assert not cfg.socket_path.exists()

    asyncio.run(main())


def test_the_watchdog_is_petted_from_the_event_loop_at_half_its_interval(tmp_path, monkeypatch):
    import os
    import socket
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 0.1
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert watchdog_interval() is None  # meant for another process
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    system = FakeSystem(tmp_path=tmp_path / "store")
    cfg = config(tmp_path)

    async def main():
        daemon = Daemon(cfg, system, None)
        task = asyncio.create_task(daemon.run())
        got = []
        while got.count(b"WATCHDOG=1") < 3:
            got.append(await asyncio.to_thread(notify.recv, 256))
        daemon.stop()
        await task

    asyncio.run(main())
    notify.close()
