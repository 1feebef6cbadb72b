"""The one place that decides: from a multipath LUN to a routed dm-switch device, and keeping it right.

Read top-down: ``reconcile`` is the whole per-LUN pipeline — discover paths
and members, fetch the map, plan the stack, then either send only the
changed regions to the live switch or build a new switch beside the old
one and swap the top device over to it. The jobs it delegates live beside it:

    agent.discovery   paths, members and the map, from the kernel and the array
    agent.apply       a plan into the kernel (new epoch, or only what changed)
    agent.health      leg paths reinstated, map generations polled
    agent.reporting   status and locate records for the CLI
    agent.dm_async    device-mapper as whole operations on worker threads
    agent.session_keeper  iSCSI sessions to every member (members that join are
                      logged in before pages are routed to them)

The kernel is a collaborator (``System``): agent.system.RealSystem in the
daemon, fakes in tests/unit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any, Callable, Container, Protocol

from agent import logfields
from agent.apply import PlanApplier
from agent.config import Config
from agent.discovery import Discovery, LunNotFoundError, NotOurArrayError
from agent.dm_async import AsyncDeviceMapper, DeviceLeftSuspendedError, SyncDeviceMapper
from agent.health import PathHealth
from agent.lun import LunState, State, pages_moved
from agent.reporting import Location, LunStatus, find_lun, locate, lun_status
from agent.kernel.holders import holders_of
from agent.kernel.sysfs import Portal
from agent.scsipath import PollablePath
from agent.session_keeper import SessionKeeper
from agent.stack import DeviceKind, OwnedUuid, plan_stack
from agent.topology import MpathMap, NewPath, Topology
from protocol.errors import SwitchAgentError
from protocol.pagemap import PageMap

LOG = logging.getLogger(__name__)


class InternalError(SwitchAgentError):
    """A bug (an exception that is not one of ours) while reconciling: recorded and retried like any failure."""


class DeviceBusyError(SwitchAgentError):
    """`logout` refused: a routed device of the target is open; ``holders`` names who holds it."""

    def __init__(self, device: str, holders: list[str]) -> None:
        self.device = device
        self.holders = holders
        super().__init__(f"{device} is busy: in use ({', '.join(holders) or 'open, holder not found'}); "
                         "close it (umount, stop the process) and log out again; nothing was changed")


class NoTargetError(SwitchAgentError):
    """`logout` of something that names no iSCSI target the daemon knows."""


JOIN_POLL_S = 0.25
"""How often the paths of a member just logged in to are looked for (udev and multipathd add them)."""
JOIN_WAIT_MAX_S = 30.0
LOCK_WAIT_LOGGED_S = 0.1
"""A reconcile that waited longer than this for its LUN says so (info): time a page move waits."""


class System(Protocol):
    """The kernel as the orchestrator needs it."""

    @property
    def dm(self) -> SyncDeviceMapper:
        """The blocking dm ioctl layer (the orchestrator drives it through AsyncDeviceMapper)."""
        ...

    async def find_mpath_maps(self, wwid: str | None = None) -> list[MpathMap]:
        """Every multipathd map (DM_UUID mpath-*) present now; with `wwid`, only that LUN's."""
        ...

    async def path_identities(self, devices: list[str]) -> dict[str, str]:
        """For each path that is a running iSCSI path: a text that names its session while it lives."""
        ...

    def open_path(self, device: str) -> PollablePath:
        """A SCSI path to send commands through."""
        ...

    async def block_devices_of_scsi(self, scsi_sys_path: str) -> list[str]:
        """The sd names under a scsi_device."""
        ...

    async def rescan_path(self, device: str) -> None:
        """Re-read a path's capacity (the kernel does not on CAPACITY DATA HAS CHANGED)."""
        ...

    async def describe_path(self, device: str, luns: Container[str] | None = None) -> NewPath | None:
        """A SCSI disk's LUN, major:minor and size; None when gone, not identifiable, or not one of `luns`."""
        ...


class Orchestrator:
    """Keeps every array LUN routed."""

    def __init__(self, config: Config, system: System, *, clock: Callable[[], float] = time.monotonic,
                 sessions: SessionKeeper | None = None) -> None:
        self.config = config
        self.system = system
        self.clock = clock
        self.sessions = sessions
        """Keeps the iSCSI sessions (None: the host's sessions are used as they are)."""
        self.withdrawn: set[str] = set()
        """LUNs `logout` took the routing of: not routed again until a `login`."""
        self.luns: dict[str, LunState] = {}
        self._parallel = asyncio.Semaphore(config.max_parallel_luns)
        self.dm = AsyncDeviceMapper(system.dm)
        self.discovery = Discovery(config, system)
        self.applier = PlanApplier(config, self.dm, clock)
        self.health = PathHealth(system, self.dm)

    # -- the pipeline ---------------------------------------------------------

    async def adopt(self) -> list[str]:
        """Take over the devices an earlier daemon left; returns the LUNs (wwids) they belong to.

        The kernel cannot report a switch's map and the daemon may have died
        mid-upload, so nothing of the old stack is trusted: the next reconcile
        builds a fresh epoch, swaps the top device over, and removes the rest.
        """
        ours = [(device, owned) for device in await self.dm.list_devices()
                if (owned := OwnedUuid.parse(device.uuid)) is not None]
        for device, owned in ours:
            lun = self.luns.setdefault(owned.wwid, LunState(owned.wwid, state=State.ADOPTING))
            if owned.kind != DeviceKind.TOP:
                lun.leftovers[device.uuid] = owned.kind
                lun.epoch = max(lun.epoch, owned.epoch or 0)
            LOG.info("%s: adopting %s", owned.wwid, device.name)
        # A daemon killed mid-swap (kill -9) may have left a device suspended: its I/O waits until resumed.
        wwid_of = {device.uuid: owned.wwid for device, owned in ours}
        for uuid, error in (await self.dm.resume_suspended(list(wwid_of))).items():
            lun = self.luns[wwid_of[uuid]]
            lun.state, lun.last_error, lun.last_error_at = State.SUSPENDED, str(error), self.clock()
        return sorted(self.luns)

    async def reconcile(self, wwid: str) -> LunState:
        """Bring one LUN's routing in line with the array's map; keep the old routing on any error."""
        if wwid in self.withdrawn:
            raise LunNotFoundError(f"{wwid}: logged out with `switch-agent logout`; `switch-agent login` to route it")
        lun = self.luns.setdefault(wwid, LunState(wwid))
        # Node records for members with no session yet, made beside the wait for the LUN, its
        # discovery and its map fetch: a member that joins now then waits for its login only.
        routed = _routed_topology(lun)
        preparing = asyncio.create_task(self.sessions.prepare(lun, routed)) \
            if self.sessions is not None and routed is not None else None
        asked = self.clock()
        try:
            async with lun.lock, _Slot(self._parallel) as slot:
                started = self.clock()
                if started - asked > LOCK_WAIT_LOGGED_S:
                    # Where a page move's reaction goes: behind a keeping run, a heal, another reconcile.
                    LOG.info("%s: waited %.2f s for the LUN", wwid, started - asked)
                previous = lun.stack.page_map if lun.stack else None
                # A routed LUN's array is known: its paths are only asked which member they land on.
                # (Looked at again: the LUN may have changed while this waited for its lock.)
                lun = await self._reconcile(lun, wwid, started, previous, _routed_topology(lun), slot)
                return await self._confirm_members(lun, slot)
        finally:
            if preparing is not None:
                await asyncio.gather(preparing, return_exceptions=True)

    async def _reconcile(self, lun: LunState, wwid: str, started: float, previous: PageMap | None,
                         known: Topology | None, slot: _Slot) -> LunState:
        """The reconcile itself, under the LUN's lock (see reconcile)."""
        try:
            topology = lun.topology = await self.discovery.discover(await self.discovery.find_mpath(wwid), known)
            logfields.add(MPATH=topology.mpath_name)
            discovered = self.clock()
            page_map = await self.discovery.fetch_map(topology, previous)
            if _pages_for(topology, page_map) != page_map.total_pages:
                # The array resized the volume and a path still shows the old capacity (its unit
                # attention went to a daemon that died, or is still queued): re-read, look again.
                await self.rescan_paths([p.device for p in topology.paths], wwid)
                topology = lun.topology = await self.discovery.discover(await self.discovery.find_mpath(wwid),
                                                                        known)
            fetched = self.clock()
            if self.sessions is not None:
                # Members that own pages and have no session: logged in before the legs are planned.
                topology, page_map = await self._join_members(lun, topology, page_map)
                lun.topology = topology
                # Sessions about to be logged out: their paths leave the legs first.
                topology = _without(topology, self.sessions.released_devs(wwid))
            # A routed device keeps its name while it lives, whatever the template now says.
            top_name = lun.stack.plan.top_name if lun.stack else None
            plan = plan_stack(self.config, topology, page_map, epoch=lun.epoch, top_name=top_name)
            if lun.stack and plan.same_shape_as(lun.stack.plan):
                await self.applier.update_in_place(lun, plan, page_map)
            else:
                # A new epoch names a new switch and legs, built beside the live ones.
                top_name = await self.applier.claim_top_name(topology)
                lun.epoch += 1
                await self.applier.build_and_swap(lun, plan_stack(self.config, topology, page_map,
                                                                  epoch=lun.epoch, top_name=top_name),
                                                  page_map, slot.release)
        except NotOurArrayError:
            self.luns.pop(wwid, None)
            raise
        except SwitchAgentError as exc:
            self._failed(lun, exc)
            raise
        except Exception as exc:  # a bug: the LUN shows it and is retried like any other failure
            LOG.exception("%s: unexpected error while reconciling", wwid)
            error = InternalError(f"{wwid}: internal error: {type(exc).__name__}: {exc}")
            self._failed(lun, error)
            raise error from exc
        lun.failures = 0
        lun.state = State.ROUTED
        lun.reconciles["ok"] = lun.reconciles.get("ok", 0) + 1
        lun.map_confirmed_at = self.clock()
        if previous is not None and previous.generation != page_map.generation:
            moved = page_map.changed_pages if page_map.changed_since == previous.generation else None
            lun.moved_pages = pages_moved(previous, page_map) if moved is None else moved
            lun.moved_since = previous.generation
        # Where a reconcile's time goes, for `status --json` and for tuning convergence.
        lun.last_reconcile = {"discover_s": round(discovered - started, 3),
                              "fetch_s": round(fetched - discovered, 3),
                              "kernel_s": round(self.clock() - fetched, 3)}
        LOG.info("%s: reconciled in %.2f s (discover %.2f, fetch %.2f, kernel %.2f)", wwid,
                 self.clock() - started, *lun.last_reconcile.values())
        return lun

    async def _confirm_members(self, lun: LunState, slot: _Slot) -> LunState:
        """Ask the paths whose member was remembered (same iSCSI session) again, now that the pages
        are routed; if one answers otherwise (a portal moved under a live session), reconcile again
        with every path asked."""
        assert lun.topology is not None
        confirmed = await self.discovery.confirm(lun.topology)
        if _members(confirmed) == _members(lun.topology):
            lun.topology = confirmed
            return lun
        LOG.warning("%s: a path lands on another member than before over the same session; routing again",
                    lun.wwid)
        return await self._reconcile(lun, lun.wwid, self.clock(), lun.stack.page_map if lun.stack else None,
                                     None, slot)

    def _failed(self, lun: LunState, exc: SwitchAgentError) -> None:
        """Record a failed reconcile; a LUN we never routed and that has no multipath map is forgotten."""
        if isinstance(exc, LunNotFoundError) and lun.stack is None and not lun.leftovers:
            # A name from udev or `trigger` that is no LUN of ours: nothing to remember it by.
            self.luns.pop(lun.wwid, None)
            return
        lun.failures += 1
        lun.last_error, lun.last_error_at = str(exc), self.clock()
        lun.reconciles["error"] = lun.reconciles.get("error", 0) + 1
        lun.errors[type(exc).__name__] = lun.errors.get(type(exc).__name__, 0) + 1
        if isinstance(exc, DeviceLeftSuspendedError):
            lun.state = State.SUSPENDED
        else:
            lun.state = State.ROUTED if lun.stack else State.ERROR
        LOG.warning("%s: %s (routing %s)", lun.wwid, exc, "kept as it was" if lun.stack else "not set up")

    # -- sessions (agent.session_keeper) -----------------------------------------

    async def _join_members(self, lun: LunState, topology: Topology, page_map: PageMap) -> tuple[Topology, PageMap]:
        """Log in to joining members, then wait (bounded) until their paths show; the topology with
        them, and the map as the array has it by then (the logins took seconds: a page move meanwhile
        goes into the epoch being built, not into another reconcile after it). Unchanged when no
        member joined."""
        assert self.sessions is not None
        try:
            joined = await self.sessions.join(lun, topology, page_map, self.held_devs())
        except SwitchAgentError as exc:  # routing goes on over the sessions there are
            LOG.warning("%s: session keeping failed: %s", lun.wwid, exc)
            return topology, page_map
        if not joined.members:
            return topology, page_map
        # Asked beside the wait for the paths: one round trip less before the routing.
        rechecked = asyncio.create_task(self.discovery.map_now(topology, page_map))
        try:
            topology = await self._wait_for_paths(lun, topology, joined.members, joined.sids, joined.disks)
            return topology, await rechecked
        finally:
            rechecked.cancel()

    async def _wait_for_paths(self, lun: LunState, topology: Topology, members: frozenset[int],
                              sids: tuple[int, ...], seen: tuple[str, ...] = ()) -> Topology:
        """The topology once the joined members' sessions show a usable path each, or at the deadline.
        ``seen``: their disks as the logins saw them, for the first look (no sysfs read of its own)."""
        assert self.sessions is not None
        waited = self.clock()
        deadline = waited + min(self.config.iscsiadm_timeout_s, JOIN_WAIT_MAX_S)
        looks = 0
        while True:
            looks += 1
            # The kernel often has the disk before iscsiadm returns: the login's own read saw it.
            disks = list(seen) if looks == 1 and seen else await self.sessions.disks_of(sids)
            self.discovery.expect_paths(lun.wwid, disks)  # for the reconciles before multipathd has them
            # Only the new disks are asked which member they land on: the rest were, moments ago.
            topology = await self.discovery.with_disks(topology, disks)
            waiting = sorted(m for m in members if not any(p.usable for p in topology.paths_of_member(m)))
            if not waiting:
                LOG.info("%s: member(s) %s logged in; routing to them (their paths waited for %.2f s, %d look(s))",
                         lun.wwid, ",".join(map(str, sorted(members))), self.clock() - waited, looks)
                return topology
            if self.clock() >= deadline:
                LOG.warning("%s: no path to member(s) %s yet after their login; routing without them",
                            lun.wwid, ",".join(map(str, waiting)))
                return topology
            await asyncio.sleep(JOIN_POLL_S)

    async def keep_sessions(self, wwid: str) -> bool:
        """Run the rest of the LUN's session plan; True when the LUN needs a reconcile (paths to add or release)."""
        lun = self.luns.get(wwid)
        if self.sessions is None or lun is None or wwid in self.withdrawn:
            return False
        try:
            # The LUN's lock for deciding, not for the logins (a page move's reconcile goes first).
            return await self.sessions.keep(lun, self.held_devs, lun.lock)
        except SwitchAgentError as exc:
            LOG.warning("%s: session keeping failed: %s", wwid, exc)
            return False

    def held_devs(self) -> set[str]:
        """Every path (major:minor) a live leg holds."""
        return {dev for lun in self.luns.values() if lun.stack
                for own, other in lun.stack.plan.leg_paths for dev in (*own, *other)}

    async def logout(self, ref: str) -> dict[str, Any]:
        """`switch-agent logout`: the routing of every LUN of the target first (refused if one is open),
        then its sessions and the node records the agent made."""
        if self.sessions is None:
            raise NoTargetError("session management is off in this daemon")
        target: str | None = ref
        if not ref.startswith(("iqn.", "eui.", "naa.")):
            found = self.find(ref)
            target = found.sessions.target if found.sessions else None
            if target is None:
                raise NoTargetError(f"{ref}: no iSCSI target known for it (`switch-agent status` shows it once "
                                    "the daemon has looked)")
        luns = [lun for lun in self.luns.values() if lun.sessions and lun.sessions.target == target]
        for lun in luns:  # refuse before anything is changed
            if lun.stack:
                info = await asyncio.to_thread(self.system.dm.device_info, uuid=lun.stack.plan.top_uuid)
                if info.open_count:
                    holders = await asyncio.to_thread(holders_of, info.major, info.minor)
                    raise DeviceBusyError(f"/dev/mapper/{lun.stack.plan.top_name}", holders)
        removed = []
        for lun in luns:
            async with lun.lock:
                self.withdrawn.add(lun.wwid)
                if lun.stack:
                    plan = lun.stack.plan
                    await self.dm.remove([plan.top_uuid], wait_for_udev=True)
                    await self.dm.remove([plan.switch_uuid, *(leg.uuid for leg in plan.legs), *lun.leftovers])
                    removed.append(f"/dev/mapper/{plan.top_name}")
                self.luns.pop(lun.wwid, None)
                self.sessions.forget_lun(lun.wwid)
        assert target is not None
        result = await self.sessions.logout_target(target)
        return {**result, "routing_removed": removed, "luns": sorted(lun.wwid for lun in luns)}

    def login_seen(self, target: str, record: tuple[Portal, str] | None = None) -> None:
        """`switch-agent login` made a session to `target` (and the node record `record`, if it made
        one): manage it, and route its LUNs again."""
        if self.sessions is not None:
            self.sessions.remember(target, record)
        self.withdrawn.clear()

    # -- events and health (agent.discovery, agent.health) ---------------------

    async def offer_path(self, device: str) -> str | None:
        """A new SCSI disk: the wwid of the routed LUN it is news to (reconcile it), else None."""
        return await self.discovery.offer_path(device, self.luns)

    async def rescan_paths(self, devices: list[str], wwid: str = "-") -> None:
        """Make the kernel re-read each path's capacity (it does not on CAPACITY DATA HAS CHANGED)."""
        await self.discovery.rescan_paths(devices, wwid)

    def legs_to_check(self, lun: LunState, events: dict[str, int] | None) -> list[str]:
        """The legs whose status may show a failed path (see PathHealth.legs_to_check)."""
        return self.health.legs_to_check(lun, events)

    async def heal_paths(self, wwid: str, events: dict[str, int] | None = None) -> int:
        """Reinstate the LUN's failed leg paths that answer again; how many stay failed."""
        lun = self.luns.get(wwid)
        return await self.health.heal_paths(lun, events) if lun else 0

    async def poll_generations(self, luns: list[LunState]) -> dict[str, int | None]:
        """Each LUN's map generation over its first path that answers (None: none did)."""
        return await self.health.poll_generations(luns)

    # -- questions from the CLI (agent.reporting) ------------------------------

    def find(self, ref: str) -> LunState:
        """A LUN by wwid, multipath map name, routed device name, or /dev path."""
        return find_lun(self.luns.values(), self.config, ref)

    def status(self, lun: LunState) -> LunStatus:
        """The status record of one LUN (what `status --json` prints)."""
        return lun_status(lun, self.config, self.clock())

    def locate(self, lun: LunState, byte_offset: int) -> Location:
        """Which member owns the page at a byte offset, and which paths the switch sends it to."""
        return locate(lun, byte_offset)


class _Slot:
    """One max_parallel_luns slot, held for a reconcile and releasable early (once) from within it."""

    def __init__(self, semaphore: asyncio.Semaphore) -> None:
        self._semaphore = semaphore
        self._held = False

    async def __aenter__(self) -> _Slot:
        await self._semaphore.acquire()
        self._held = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        if self._held:
            self._held = False
            self._semaphore.release()


def _without(topology: Topology, devs: frozenset[str]) -> Topology:
    """The topology without paths about to be logged out (unless that would leave no usable path)."""
    kept = tuple(p for p in topology.paths if p.dev not in devs)
    if not devs or kept == topology.paths or not any(p.usable for p in kept):
        return topology
    return dataclasses.replace(topology, paths=kept)


def _members(topology: Topology) -> list[tuple[str, str, int | None, bool]]:
    """Each path with the member it lands on, as routing sees it."""
    return [(p.device, p.dev, p.member_id, p.usable) for p in topology.paths]


def _routed_topology(lun: LunState) -> Topology | None:
    """What the last reconcile found for a routed LUN with a usable path; None otherwise."""
    if lun.stack and lun.topology and any(p.usable for p in lun.topology.paths):
        return lun.topology
    return None


def _pages_for(topology: Topology, page_map: PageMap) -> int:
    """Pages the LUN's size (as its paths show it) spans, in the map's page size."""
    return -(-topology.size_sectors // page_map.page_size_sectors)
