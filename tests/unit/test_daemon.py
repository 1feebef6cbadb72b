"""The daemon over fake kernel layers: start-up scan, udev triggers, polling, the control socket, stop."""

from __future__ import annotations

import asyncio
import contextlib
import time
from types import SimpleNamespace
from typing import Callable

import pytest

from agent import control
from agent.config import Config
from agent.daemon import FULL_LEG_CHECK_EVERY, Daemon, LunScheduler
from agent.kernel.udev import UdevMonitor
from agent.orchestrator import Orchestrator
from tests.unit.fakes_kernel import FakeSystem, ManyLunSystem
from tests.unit.fakes_udev import FakeUdevSource, dm_disk_event, scsi_ua_event, sd_disk_event


async def until(condition: Callable[[], bool], *, timeout_s: float = 10.0) -> None:
    """Poll a condition with a deadline (the daemon works in the background)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.01)


def config(tmp_path, **overrides) -> Config:
    # metrics_textfile off: a host with node_exporter has its default directory.
    defaults = dict(socket_path=tmp_path / "run" / "control.sock", debounce_s=0.01, poll_interval_s=3600,
                    retry_initial_s=0.01, retry_max_s=0.05, metrics_textfile="")
    return Config(**{**defaults, **overrides})


@contextlib.asynccontextmanager
async def running(cfg: Config, system: FakeSystem, *, udev: bool = False):
    """A daemon serving on cfg.socket_path (with a fake udev source to emit on, if asked); stopped after."""
    source = FakeUdevSource() if udev else None
    monitor = None
    if source is not None:
        monitor = UdevMonitor(source)
        monitor.start()
    daemon = Daemon(cfg, system, monitor)
    task = asyncio.create_task(daemon.run())
    await until(lambda: cfg.socket_path.exists() or task.done())
    try:
        yield daemon, source
    finally:
        daemon.stop()
        await task


async def ask(cfg: Config, request: dict):
    return await asyncio.to_thread(control.request, cfg.socket_path, request)


def routed(system: FakeSystem, daemon: Daemon) -> bool:
    lun = daemon.orchestrator.luns.get(system.wwid)
    return bool(lun and lun.state == "routed")


def run(coro):
    return asyncio.run(coro)


def test_routes_at_start_and_answers_on_the_socket(tmp_path):
    system = FakeSystem(tmp_path=tmp_path / "store", layout="random")
    cfg = config(tmp_path)

    async def main():
        async with running(cfg, system) as (daemon, _):
            await until(lambda: routed(system, daemon))
            await check_answers(daemon)
        assert not cfg.socket_path.exists()
        # Stopping leaves the routed device in place.
        assert f"switch-{system.wwid}" in system.dm.devices

    async def check_answers(daemon):
        status = await ask(cfg, {"command": "status"})
        assert [s["state"] for s in status] == ["routed"]
        assert status[0]["device"] == f"/dev/mapper/switch-{system.wwid}"
        where = await ask(cfg, {"command": "locate", "lun": system.wwid, "offset": 5 * 16 * 1024 * 1024})
        assert where["page"] == 5 and where["member"] == system.volume.owner_of_offset(5 * 16 << 20).name
        with pytest.raises(control.ControlError, match="no such array LUN"):
            await ask(cfg, {"command": "show", "lun": "nope"})
        with pytest.raises(control.ControlError, match="offset"):
            await ask(cfg, {"command": "locate", "lun": system.wwid, "offset": "ten"})

    run(main())


def test_unit_attention_event_brings_page_moves_in(tmp_path):
    system = FakeSystem(tmp_path=tmp_path / "store", layout="random")
    cfg = config(tmp_path)
    top = f"switch-{system.wwid}"

    async def main():
        async with running(cfg, system, udev=True) as (daemon, source):
            await until(lambda: routed(system, daemon))
            system.volume.move_pages(0.2)
            assert system.misrouted_pages(top) > 0
            for name in system.paths:  # one unit attention per path, folded into one run
                source.emit(scsi_ua_event(system.hctl_of(name), "INQUIRY_DATA_HAS_CHANGED"))
            await until(lambda: system.misrouted_pages(top) == 0)

    run(main())


def test_polling_notices_a_new_generation(tmp_path):
    system = FakeSystem(tmp_path=tmp_path / "store", layout="random")
    cfg = config(tmp_path, poll_interval_s=0.02)
    top = f"switch-{system.wwid}"

    async def main():
        async with running(cfg, system) as (daemon, _):
            await until(lambda: routed(system, daemon))
            system.volume.move_pages(0.2)
            await until(lambda: system.misrouted_pages(top) == 0)

    run(main())


def test_a_poll_round_that_sees_the_map_move_starts_no_keeping_run(tmp_path):
    """It would take the LUN's lock before the reconcile it triggers (docs/sessions.md, (b))."""
    system = FakeSystem(tmp_path=tmp_path / "store", layout="random")
    cfg = config(tmp_path, poll_interval_s=0.02)
    top = f"switch-{system.wwid}"
    rounds: list[list[str]] = []

    async def main():
        async with running(cfg, system) as (daemon, _):
            await until(lambda: routed(system, daemon))
            poll, trigger = daemon.orchestrator.poll_generations, daemon.scheduler.trigger

            async def polled(luns):
                rounds.append([])
                return await poll(luns)

            daemon.orchestrator.poll_generations = polled
            daemon.scheduler.trigger = lambda wwid, reason, **kw: (rounds and rounds[-1].append(reason),
                                                                  trigger(wwid, reason, **kw))
            daemon.keep_sessions_soon = lambda wwid: rounds and rounds[-1].append("keep")
            await until(lambda: len(rounds) >= 3)
            system.volume.move_pages(0.2)
            await until(lambda: system.misrouted_pages(top) == 0)
            await until(lambda: len(rounds) >= 3 and rounds[-2] == ["keep"])

    run(main())
    moved = [r for r in rounds if "map generation changed" in r]
    assert moved and all("keep" not in r for r in moved), rounds
    assert ["keep"] in rounds  # the other rounds keep the sessions


def test_a_multipath_map_appearing_later_is_routed(tmp_path):
    system = FakeSystem(tmp_path=tmp_path / "store")
    system.mpath_present = False
    cfg = config(tmp_path)

    async def main():
        async with running(cfg, system, udev=True) as (daemon, source):
            assert await ask(cfg, {"command": "status"}) == []
            system.mpath_present = True
            source.emit(dm_disk_event("add", "dm-0", dm_name=system.wwid, dm_uuid=f"mpath-{system.wwid}",
                                      extra={"MPATH_DEVICE_READY": "1"}))
            await until(lambda: routed(system, daemon))

    run(main())


def test_failures_are_retried_with_backoff_until_the_array_answers(tmp_path):
    system = FakeSystem(tmp_path=tmp_path / "store")
    system.volume.corrupt_next_map("bad-crc", count=3)
    cfg = config(tmp_path)

    async def main():
        async with running(cfg, system) as (daemon, _):
            await until(lambda: routed(system, daemon))
            assert daemon.orchestrator.luns[system.wwid].last_error  # it did fail first

    run(main())


def test_refresh_of_an_unrouted_lun_reports_the_error(tmp_path):
    system = FakeSystem(tmp_path=tmp_path / "store")
    system.volume.corrupt_next_map("truncated", count=1000)
    cfg = config(tmp_path, fetch_restarts=0, retry_initial_s=60, retry_max_s=60)

    async def main():
        async with running(cfg, system):
            with pytest.raises(control.ControlError, match="GET PAGE MAP"):
                await ask(cfg, {"command": "refresh", "lun": system.wwid})
            status = await ask(cfg, {"command": "status"})
            assert status[0]["state"] == "error" and "GET PAGE MAP" in status[0]["last_error"]
            assert not [d for d in system.dm.devices.values() if d.uuid.startswith("SWAGENT-")]

    run(main())


def test_scheduler_folds_triggers_while_one_is_pending(tmp_path):
    system = FakeSystem(tmp_path=tmp_path / "store")
    cfg = config(tmp_path)
    calls = []

    class Counting(Orchestrator):
        async def reconcile(self, wwid):
            calls.append(wwid)
            return await super().reconcile(wwid)

    async def main():
        gate = asyncio.Event()

        async def sleep(_s):
            await gate.wait()

        scheduler = LunScheduler(Counting(cfg, system), cfg, sleep=sleep)
        for _ in range(6):
            scheduler.trigger(system.wwid, "unit attention")
        gate.set()
        await until(lambda: calls and not scheduler._pending)
        await scheduler.close()

    run(main())
    assert calls == [system.wwid]


def test_capacity_unit_attention_rescans_and_grows_the_routed_device(tmp_path):
    system = FakeSystem(tmp_path=tmp_path / "store", size_bytes=2 << 30, layout="random")
    cfg = config(tmp_path)
    top = f"switch-{system.wwid}"

    async def main():
        async with running(cfg, system, udev=True) as (daemon, source):
            await until(lambda: routed(system, daemon))
            system.volume.resize(3 << 30)  # the array grows; the paths do not know yet
            system.store.resize(3 << 30)
            for name in system.paths:
                source.emit(scsi_ua_event(system.hctl_of(name), "CAPACITY_DATA_HAS_CHANGED"))
            await until(lambda: system.dm.devices[top].live[0][1] == (3 << 30) // 512)
            await until(lambda: daemon.orchestrator.luns[system.wwid].state == "routed")
            assert system.misrouted_pages(top) == 0
            assert len(system.rescans) == len(system.paths)

    run(main())


def test_a_leg_path_failure_event_leads_to_a_probe_and_reinstatement(tmp_path):
    system = FakeSystem(tmp_path=tmp_path / "store")
    cfg = config(tmp_path)

    async def main():
        async with running(cfg, system, udev=True) as (daemon, source):
            await until(lambda: routed(system, daemon))
            plan = daemon.orchestrator.luns[system.wwid].stack.plan
            leg, dev = plan.legs[1], plan.leg_paths[1][0][0]
            system.dm.target_message(leg.name, 0, f"fail_path {dev}")
            source.emit(dm_disk_event("change", "dm-2", dm_name=leg.name, dm_uuid=leg.uuid,
                                      extra={"DM_ACTION": "PATH_FAILED", "DM_PATH": dev}))
            await until(lambda: not system.dm.devices[leg.name].failed)

    run(main())


def test_the_kernels_add_of_a_lun_disk_puts_it_in_its_leg_before_multipathd(tmp_path):
    system = FakeSystem(tmp_path=tmp_path / "store", paths_per_member=1)
    cfg = config(tmp_path)

    async def main():
        async with running(cfg, system, udev=True) as (daemon, source):
            await until(lambda: routed(system, daemon))
            added = system.add_path(1)  # the member's session back; multipathd has not added it
            system.not_in_mpath.add(added)
            source.emit(sd_disk_event("add", added, devnum=system.devs[added]))
            lun = daemon.orchestrator.luns[system.wwid]
            await until(lambda: system.devs[added] in lun.stack.plan.leg_paths[1][0])
            assert system.devs[added] not in lun.stack.plan.leg_paths[0][0]  # only its own member prefers it


class PollGate:
    """A daemon sleep whose poll interval waits for a go from the test; other sleeps are real."""

    def __init__(self, poll_s: float) -> None:
        self.poll_s = poll_s
        self.go: asyncio.Queue[None] = asyncio.Queue()
        self.parked = 0

    async def sleep(self, seconds: float) -> None:
        if seconds != self.poll_s:
            await asyncio.sleep(seconds)
            return
        self.parked += 1
        await self.go.get()


def round_driver(daemon: Daemon, gate: PollGate, dm):
    """settled(n): n poll rounds done and nothing left running; poll_round(n): let round n run, the legs it read."""
    luns = daemon.orchestrator.luns

    def settled(rounds: int) -> bool:
        return (gate.parked == rounds + 1 and not daemon.scheduler._healing
                and all(lun.state == "routed" and not lun.lock.locked() for lun in luns.values()))

    async def poll_round(rounds: int) -> list[str]:
        before = len(dm.log)
        gate.go.put_nowait(None)
        await until(lambda: settled(rounds))
        return [name for op, name in dm.log[before:] if op == "status"]

    return settled, poll_round


def test_poll_rounds_over_healthy_luns_read_no_leg_status(tmp_path):
    system = ManyLunSystem(4, tmp_path=tmp_path, members=3, paths_per_member=1)
    cfg = config(tmp_path, poll_interval_s=1000)
    gate = PollGate(1000)
    dm = system.dm

    async def main():
        daemon = Daemon(cfg, system, None, sleep=gate.sleep)
        task = asyncio.create_task(daemon.run())
        luns = daemon.orchestrator.luns
        settled, poll_round = round_driver(daemon, gate, dm)
        await until(lambda: len(luns) == 4 and settled(0))
        legs = [leg.name for lun in luns.values() for leg in lun.stack.plan.legs]
        assert sorted(await poll_round(1)) == sorted(legs)  # the first round looks at every leg once
        assert await poll_round(2) == []  # nothing moved: no status ioctl at all
        assert await poll_round(3) == []
        # A path fails under I/O and its udev event is lost: the next round still finds and heals it.
        plan = next(iter(luns.values())).stack.plan
        name, dev = plan.legs[2].name, plan.leg_paths[2][0][0]
        dm.target_message(name, 0, f"fail_path {dev}")
        assert await poll_round(4) == [name]
        assert not dm.devices[name].failed
        assert await poll_round(5) == [name]  # its reinstatement moved its event_nr once more
        for rounds in range(6, FULL_LEG_CHECK_EVERY + 2):
            assert await poll_round(rounds) == []  # event numbers say it all: no round reads every leg
        daemon.stop()
        await task

    run(main())


def test_without_event_numbers_every_leg_is_read_every_few_rounds(tmp_path):
    system = ManyLunSystem(2, tmp_path=tmp_path, members=3, paths_per_member=1)
    cfg = config(tmp_path, poll_interval_s=1000)
    gate = PollGate(1000)
    dm = system.dm
    listed = dm.list_devices
    dm.list_devices = lambda: [SimpleNamespace(**{**vars(d), "event_nr": None}) for d in listed()]  # before 4.14

    async def main():
        daemon = Daemon(cfg, system, None, sleep=gate.sleep)
        task = asyncio.create_task(daemon.run())
        luns = daemon.orchestrator.luns
        settled, poll_round = round_driver(daemon, gate, dm)
        await until(lambda: len(luns) == 2 and settled(0))
        legs = sorted(leg.name for lun in luns.values() for leg in lun.stack.plan.legs)
        read = [sorted(await poll_round(rounds)) for rounds in range(1, 2 * FULL_LEG_CHECK_EVERY + 1)]
        assert read == [legs if r % FULL_LEG_CHECK_EVERY == 0 else [] for r in range(1, 2 * FULL_LEG_CHECK_EVERY + 1)]
        daemon.stop()
        await task

    run(main())


def test_malloc_arenas_are_limited_where_glibc_allows_it():
    from agent.daemon import limit_malloc_arenas
    import platform
    assert limit_malloc_arenas() is (platform.libc_ver()[0] == "glibc")
