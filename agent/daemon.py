"""`switch-agent daemon`: udev events, polling and the control socket, feeding one Orchestrator.

Nothing here decides how a LUN is routed; it decides *when*: at start for
every multipath map already there, on udev events (debounced: each path
raises its own unit attention), every poll interval when the array's map
generation moved, on `switch-agent refresh`, and again with backoff after a
failure. SIGTERM stops the daemon and leaves every routed device in place.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
from collections import Counter
from typing import Any, AsyncIterator, Awaitable, Callable, Coroutine

from agent import activation, control, logfields, mapview
from agent.config import Config
from agent.events import Trigger, TriggerKind, classify
from agent.kernel.sysfs import Portal
from agent.kernel.udev import UdevEventsLostError
from agent.discovery import LunNotFoundError, NotOurArrayError
from agent.lun import State
from agent.metrics import Metrics, MetricsEndpointError
from agent.orchestrator import Orchestrator, System
from agent.session_keeper import SessionKeeper
from protocol.errors import SwitchAgentError

LOG = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]

FULL_LEG_CHECK_EVERY = 8
"""Poll rounds between status reads of every leg where the kernel's device list has no event numbers."""


class DaemonTaskError(SwitchAgentError):
    """One of the daemon's long-lived tasks (polling, udev) ended: the daemon stops, non-zero, to be restarted."""

    def __init__(self, task: str, cause: BaseException | None) -> None:
        self.task = task
        self.cause = cause
        super().__init__(f"the {task} task ended" + (f": {type(cause).__name__}: {cause}" if cause else ""))


class LunScheduler:
    """Runs reconciles: debounced, one at a time per LUN, retried with backoff after failure."""

    def __init__(self, orchestrator: Orchestrator, config: Config, *, sleep: Sleep = asyncio.sleep,
                 after_reconcile: Callable[[], object] = lambda: None,
                 after_routed: Callable[[str], object] = lambda wwid: None) -> None:
        self.orchestrator = orchestrator
        self.config = config
        self.sleep = sleep
        self.after_reconcile = after_reconcile
        """Called after every reconcile, whatever its outcome (the metrics file is rewritten)."""
        self.after_routed = after_routed
        """Called with the wwid after every reconcile that succeeded (the sessions are kept)."""
        self._pending: dict[str, asyncio.Task[None]] = {}
        self._reasons: dict[str, Counter[str]] = {}
        """wwid -> what asked for its pending run (logged when it starts: which reconciles were needed)."""
        self._healing: dict[str, asyncio.Task[None]] = {}

    def trigger(self, wwid: str, reason: str, *, delay_s: float | None = None) -> None:
        """Reconcile `wwid` soon; triggers that arrive while one is pending fold into it."""
        self._reasons.setdefault(wwid, Counter())[reason] += 1
        if wwid in self._pending:
            LOG.debug("%s: %s folded into the pending run", wwid, reason)
            return
        LOG.debug("%s: scheduled (%s)", wwid, reason)
        delay = self.config.debounce_s if delay_s is None else delay_s
        self._pending[wwid] = asyncio.create_task(self._run(wwid, delay), name=f"reconcile {wwid}")

    async def run_now(self, wwid: str) -> Any:
        """Reconcile immediately (for `refresh`), returning the LUN's state; errors go to the caller."""
        pending = self._pending.pop(wwid, None)
        if pending:
            pending.cancel()
        self._reasons.pop(wwid, None)
        try:
            with logfields.about(**self._fields(wwid)):
                return await self.orchestrator.reconcile(wwid)
        finally:
            self.after_reconcile()

    def _fields(self, wwid: str) -> dict[str, str | None]:
        """The journal fields of every message logged while working on `wwid` (agent.logfields)."""
        lun = self.orchestrator.luns.get(wwid)
        return {"WWID": wwid, "MPATH": lun.topology.mpath_name if lun and lun.topology else None}

    def _task_about(self, wwid: str) -> None:
        """The fields for the rest of this task: reconcile and heal runs are tasks of their own."""
        logfields.replace(**self._fields(wwid))

    async def _run(self, wwid: str, delay: float) -> None:
        await self.sleep(delay)
        self._pending.pop(wwid, None)
        self._task_about(wwid)
        reasons = self._reasons.pop(wwid, Counter())
        LOG.info("%s: reconcile for %s", wwid, ", ".join(r + (f" x{n}" if n > 1 else "")
                                                        for r, n in reasons.items()) or "?")
        try:
            await self.orchestrator.reconcile(wwid)
            self.after_routed(wwid)
        except (NotOurArrayError, LunNotFoundError) as exc:
            LOG.debug("%s: ignored: %s", wwid, exc)
        except SwitchAgentError:
            lun = self.orchestrator.luns.get(wwid)
            failures = lun.failures if lun else 1
            backoff = min(self.config.retry_initial_s * 2 ** (failures - 1), self.config.retry_max_s)
            LOG.info("%s: retrying in %.1f s", wwid, backoff)
            self.trigger(wwid, "retry", delay_s=backoff)
        except Exception:  # a bug must not kill the daemon's other LUNs
            LOG.exception("%s: unexpected error while reconciling", wwid)
        finally:
            self.after_reconcile()

    def heal(self, wwid: str, *, delay_s: float = 0.0, attempt: int = 0,
             events: dict[str, int] | None = None) -> None:
        """Probe and reinstate the LUN's failed leg paths soon; again with backoff while any stay failed.

        `events` (dm device name -> event_nr, from polling) lets the probe skip legs that did not change.
        """
        if wwid not in self._healing:
            self._healing[wwid] = asyncio.create_task(self._heal(wwid, delay_s, attempt, events),
                                                      name=f"heal {wwid}")

    async def _heal(self, wwid: str, delay: float, attempt: int, events: dict[str, int] | None) -> None:
        await self.sleep(delay)
        self._healing.pop(wwid, None)
        self._task_about(wwid)
        try:
            still_failed = await self.orchestrator.heal_paths(wwid, events)
        except Exception:  # a bug must not kill the daemon's other LUNs
            LOG.exception("%s: unexpected error while healing paths", wwid)
            return
        if still_failed:
            backoff = min(self.config.retry_initial_s * 2 ** attempt, self.config.retry_max_s)
            LOG.info("%s: %d leg path(s) still failed; probing again in %.1f s", wwid, still_failed, backoff)
            self.heal(wwid, delay_s=backoff, attempt=attempt + 1)

    async def close(self) -> None:
        """Cancel everything pending and wait for it to stop."""
        tasks = [*self._pending.values(), *self._healing.values()]
        self._pending.clear()
        self._reasons.clear()
        self._healing.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Daemon:
    """The long-running agent."""

    def __init__(self, config: Config, system: System, events: AsyncIterator[Any] | None, *,
                 sleep: Sleep = asyncio.sleep, sessions: SessionKeeper | None = None) -> None:
        self.config = config
        self.system = system
        self.events = events
        self.orchestrator = Orchestrator(config, system, sessions=sessions)
        self.metrics = Metrics(config, lambda: self.orchestrator.luns.values(), self.orchestrator.clock)
        self.scheduler = LunScheduler(self.orchestrator, config, sleep=sleep,
                                      after_reconcile=self.metrics.write_soon, after_routed=self.keep_sessions_soon)
        self._keeping: dict[str, asyncio.Task[None]] = {}
        self.sleep = sleep
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.failure: DaemonTaskError | None = None
        """Why the daemon stopped by itself (a long-lived task died), else None."""

    def stop(self) -> None:
        """Ask the daemon to finish (SIGTERM)."""
        self._stop.set()

    async def run(self) -> None:
        """Serve until stop(): control socket, initial scan, events, polling."""
        # systemd's socket (switch-agent.socket) if it started us through it, else one of our own.
        listening = activation.control_socket(self.config.socket_path, activation.listen_fds())
        server = await control.serve(self.config.socket_path, self.handle_request, listening=listening)
        try:
            self.metrics.start_endpoint()
        except MetricsEndpointError as exc:  # metrics are worth less than routing: go on without them
            LOG.error("%s; serving no metrics over HTTP", exc)
        tasks = [asyncio.create_task(self._poll_forever(), name="poll")]
        if self.events is not None:
            tasks.append(asyncio.create_task(self._follow_events(), name="udev"))
        watchdog_s = watchdog_interval()
        if watchdog_s:
            tasks.append(asyncio.create_task(self._pet_watchdog(watchdog_s), name="watchdog"))
        for task in tasks:
            task.add_done_callback(self._supervise)
        try:
            for wwid in await self.orchestrator.adopt():
                self.scheduler.trigger(wwid, "adopted at start", delay_s=0)
            for mpath in await self.system.find_mpath_maps():
                self.scheduler.trigger(mpath.wwid, "present at start", delay_s=0)
            notify_systemd("READY=1\nSTATUS=watching multipath maps")
            self.metrics.write()
            LOG.info("switch-agent ready; control socket %s%s", self.config.socket_path,
                     " (from systemd)" if server.activated else "")
            await self._stop.wait()
        finally:
            notify_systemd("STOPPING=1")
            LOG.info("switch-agent stopping; routed devices stay as they are")
            server.close()
            for task in (*tasks, *self._tasks):
                task.cancel()
            await asyncio.gather(*tasks, *self._tasks, return_exceptions=True)
            await self.scheduler.close()
            await self.metrics.close()
            await server.wait_closed()
        if self.failure is not None:
            raise self.failure

    def _supervise(self, task: asyncio.Task[Any]) -> None:
        """A long-lived task that ends before stop() takes the daemon down: systemd restarts it whole."""
        if task.cancelled() or self._stop.is_set():
            return
        cause = task.exception()
        LOG.critical("the %s task ended (%s); stopping so that the service manager restarts the daemon",
                     task.get_name(), f"{type(cause).__name__}: {cause}" if cause else "returned",
                     exc_info=cause)
        self.failure = DaemonTaskError(task.get_name(), cause)
        self._stop.set()

    async def _pet_watchdog(self, interval_s: float) -> None:
        """WATCHDOG=1 from the event loop itself: a loop stalled by a bug stops it, and systemd restarts us."""
        while True:
            notify_systemd("WATCHDOG=1")
            await asyncio.sleep(interval_s)

    async def _follow_events(self) -> None:
        assert self.events is not None
        while True:
            try:
                async for event in self.events:
                    trigger = classify(event.action, event.subsystem, event.devtype, event.sys_path,
                                       event.properties)
                    if trigger is not None:
                        await self._on_trigger(trigger)
                return
            except UdevEventsLostError as exc:
                # The netlink buffer overflowed (a login of many disks): the lost events may have been
                # anything, so look at everything again as at start, and go on following.
                LOG.warning("%s; re-reading every multipath map and routed LUN", exc)
                await self._rescan_everything()

    async def _rescan_everything(self) -> None:
        """What a lost event may have said: every multipath map and routed LUN is reconciled and its legs healed."""
        wwids = {mpath.wwid for mpath in await self.system.find_mpath_maps()} | set(self.orchestrator.luns)
        for wwid in sorted(wwids):
            self.scheduler.trigger(wwid, "udev events lost")
            if wwid in self.orchestrator.luns:
                self.scheduler.heal(wwid, delay_s=self.config.debounce_s)

    async def _on_trigger(self, trigger: Trigger) -> None:
        LOG.debug("udev: %s", trigger)
        if trigger.kind in (TriggerKind.MPATH_READY, TriggerKind.PATH_EVENT) and trigger.wwid:
            self.scheduler.trigger(trigger.wwid, trigger.kind)
            if trigger.kind == TriggerKind.PATH_EVENT:
                self.scheduler.heal(trigger.wwid, delay_s=self.config.debounce_s)
        elif trigger.kind == TriggerKind.LEG_PATH_EVENT and trigger.wwid:
            # A path just failed under I/O: give it a moment before the first probe.
            self.scheduler.heal(trigger.wwid, delay_s=self.config.retry_initial_s)
        elif trigger.kind == TriggerKind.PATH_ADDED:
            # A returning or new member's disk: into its leg now, not after multipathd's reload.
            # In a task: a login brings many disks, each a few sysfs reads, and other events wait.
            self._background(self._offer_path(trigger.detail))
        elif trigger.kind == TriggerKind.MPATH_GONE and trigger.wwid in self.orchestrator.luns:
            LOG.warning("%s: multipath map removed; the routed device stays until removed by hand",
                        trigger.wwid, extra=logfields.lun(trigger.wwid))
            self.orchestrator.luns[trigger.wwid].state = State.NO_MULTIPATH
        elif trigger.kind == TriggerKind.UNIT_ATTENTION and trigger.scsi_sys_path:
            devices = set(await self.system.block_devices_of_scsi(trigger.scsi_sys_path))
            luns = [lun for lun in self.orchestrator.luns.values()
                    if lun.topology and devices & {p.device for p in lun.topology.paths}]
            if trigger.detail == "CAPACITY_DATA_HAS_CHANGED":
                # The kernel leaves the path's size as it was (scsi_error.c); userspace rescans.
                # Each path raises its own; rescanning in a task lets the others' start meanwhile.
                self._background(self._rescan_then_trigger(sorted(devices), [lun.wwid for lun in luns]))
                return
            for lun in luns:
                self.scheduler.trigger(lun.wwid, f"unit attention {trigger.detail}")

    async def _offer_path(self, device: str) -> None:
        wwid = await self.orchestrator.offer_path(device)
        if wwid:
            self.scheduler.trigger(wwid, f"new path {device}")

    async def _rescan_then_trigger(self, devices: list[str], wwids: list[str]) -> None:
        await self.orchestrator.rescan_paths(devices, ",".join(wwids) or "-")
        for wwid in wwids:
            self.scheduler.trigger(wwid, "unit attention CAPACITY_DATA_HAS_CHANGED")

    def keep_sessions_soon(self, wwid: str) -> None:
        """Run the LUN's session plan in the background (one run at a time per LUN); a run that
        added or released paths asks for a reconcile."""
        if self.orchestrator.sessions is None or wwid in self._keeping:
            return
        task = asyncio.create_task(self._keep_sessions(wwid), name=f"sessions {wwid}")
        self._keeping[wwid] = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _keep_sessions(self, wwid: str) -> None:
        try:
            if await self.orchestrator.keep_sessions(wwid):
                self.scheduler.trigger(wwid, "sessions changed")
        except Exception:  # a bug must not kill the daemon's other LUNs
            LOG.exception("%s: unexpected error while keeping sessions", wwid)
        finally:
            self._keeping.pop(wwid, None)
            self.metrics.write_soon()

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)  # a reference, or the loop may drop the task half-way
        task.add_done_callback(self._tasks.discard)

    async def _poll_forever(self) -> None:
        """Every interval, a 64-byte GET PAGE MAP per routed LUN; reconcile the ones that moved.

        Leg paths are healed from the same round, but only where one DM_LIST_DEVICES shows a
        leg's event_nr moved (or a failed path is still waiting): with many LUNs a status read
        of every leg every round was most of the idle daemon's CPU.
        """
        rounds = 0
        while True:
            await self.sleep(self.config.poll_interval_s)
            rounds += 1
            events = await self._dm_events()
            # Without event numbers (a kernel before 4.14, or no list) every leg is read, but
            # only every few rounds: a path failure must not stay unseen for good.
            check_legs = events is not None or rounds % FULL_LEG_CHECK_EVERY == 0
            routed = [(lun, lun.stack) for lun in self.orchestrator.luns.values() if lun.stack and lun.topology]
            generations = await self.orchestrator.poll_generations([lun for lun, _ in routed])
            polled = self.orchestrator.clock()
            for lun, stack in routed:
                # None (no path answered) differs too: reconcile finds out and reports why.
                moved = generations[lun.wwid] != stack.page_map.generation
                if moved:
                    self.scheduler.trigger(lun.wwid, "map generation changed", delay_s=0)
                else:
                    lun.map_confirmed_at = polled
                if check_legs and self.orchestrator.legs_to_check(lun, events):
                    self.scheduler.heal(lun.wwid, events=events)
                # A session killed or given up on is restored here (its backoff permitting). Not
                # when the map moved: a keeping run started now would take the LUN's lock before
                # the reconcile (its plan's reads, about a second in a TCG guest, while a joining
                # member's pages are forwarded), and the reconcile is followed by one anyway.
                if not moved:
                    self.keep_sessions_soon(lun.wwid)
            self.metrics.write()

    async def _dm_events(self) -> dict[str, int] | None:
        """Every dm device's event_nr now (None if dm cannot list them, or its list has no event numbers)."""
        try:
            devices = await asyncio.to_thread(self.system.dm.list_devices)
        except SwitchAgentError as exc:
            LOG.warning("cannot list dm devices: %s", exc)
            return None
        events = {d.name: d.event_nr for d in devices}
        return None if None in events.values() else events

    async def handle_request(self, request: dict[str, Any]) -> Any:
        """One control-socket request."""
        command = request["command"]
        orch = self.orchestrator
        if command == "status":
            return [orch.status(lun).to_json() for lun in sorted(orch.luns.values(), key=lambda lun: lun.wwid)]
        if command == "show":
            lun = orch.find(_text(request, "lun"))
            record = orch.status(lun).to_json()
            if "map_cells" in request:  # `show --map`: the page map cut to the CLI's terminal
                cells = request["map_cells"]
                if not isinstance(cells, int) or isinstance(cells, bool):
                    raise ValueError("map_cells must be an integer")
                record["map"] = mapview.picture(lun, cells).to_json()
            return record
        if command == "locate":
            offset = request.get("offset")
            if not isinstance(offset, int) or isinstance(offset, bool):
                raise ValueError("offset must be an integer number of bytes")
            return orch.locate(orch.find(_text(request, "lun")), offset).to_json()
        if command == "trigger":
            # From the udev rule: schedule and return at once; udev must not wait on us.
            # Checked as the CLI checks it: anyone root can send any bytes here, not only the CLI.
            what, value = control.check_trigger(request)
            # At info: the one trace in the daemon's log that the rule ran (udev logs RUN only at debug).
            if what == "scsi_device":
                LOG.info("udev rule: trigger for SCSI device %s", value)
                await self._on_trigger(Trigger(TriggerKind.UNIT_ATTENTION, scsi_sys_path=value, detail="udev rule"))
            else:
                wwid = value.removeprefix("mpath-")
                LOG.info("%s: udev rule: trigger", wwid, extra=logfields.lun(wwid))
                self.scheduler.trigger(wwid, "udev rule")
            return {"scheduled": True}
        if command == "refresh":
            ref = _text(request, "lun")
            try:
                wwid = orch.find(ref).wwid
            except LunNotFoundError:
                wwid = await self._wwid_from_system(ref)
            lun = await self.scheduler.run_now(wwid)
            return orch.status(lun).to_json()
        if command == "sessions":
            # From `switch-agent login`: look at the target's LUNs now (new LUNs come by udev).
            target = _text(request, "target")
            if not control.IQN.fullmatch(target):
                raise ValueError(f"not an iSCSI target name: {target[:80]!r}")
            made: tuple[Portal, str] | None = None
            if "portal" in request:  # the node record `login` made: `logout` deletes it
                from agent.login import parse_portal

                made = (parse_portal(_text(request, "portal")), _text(request, "iface"))
                if not control.IQN.fullmatch(made[1]):
                    raise ValueError("iface must be an open-iscsi iface name")
            orch.login_seen(target, made)
            wwids = [lun.wwid for lun in orch.luns.values() if lun.sessions and lun.sessions.target == target]
            for wwid in wwids:
                self.keep_sessions_soon(wwid)
            for mpath in await self.system.find_mpath_maps():
                if mpath.wwid not in orch.luns:
                    self.scheduler.trigger(mpath.wwid, "login")
            return {"target": target, "luns": wwids}
        if command == "logout":
            return await orch.logout(_text(request, "ref"))
        raise ValueError(f"unknown command {command!r}")

    async def _wwid_from_system(self, ref: str) -> str:
        """A LUN the daemon has not routed yet, named by wwid or multipath name."""
        ref = ref.removeprefix("/dev/mapper/")
        for mpath in await self.system.find_mpath_maps():
            if ref in (mpath.wwid, mpath.name, mpath.device):
                return mpath.wwid
        raise LunNotFoundError(f"{ref}: no multipath map by that wwid or name")


def _text(request: dict[str, Any], key: str) -> str:
    value = request.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key} must be a non-empty string")
    return value


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of systemd's WatchdogSec), or None when no watchdog is set for us."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


def notify_systemd(state: str) -> None:
    """sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET, if systemd gave one."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(state.encode(), address)
        except OSError as exc:
            LOG.warning("could not notify systemd: %s", exc)


M_ARENA_MAX = -8  # <malloc.h>
MALLOC_ARENAS = 2


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Ask glibc for at most `arenas` malloc arenas (False where there is no mallopt: not glibc).

    glibc gives threads that allocate arenas of their own, up to 8 per CPU,
    and each keeps what it once held. The daemon's threads mostly wait in
    ioctls; their arenas only raised its high-water mark.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    return bool(mallopt(M_ARENA_MAX, arenas))


def install_signal_handlers(daemon: Daemon) -> None:
    """SIGTERM and SIGINT stop the daemon cleanly."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.stop)
