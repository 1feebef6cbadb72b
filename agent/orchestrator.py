"""The one place that decides: from a multipath LUN to a routed dm-switch device, and keeping it right.

Read top-down: ``reconcile`` is the whole per-LUN pipeline —
discover paths and members, fetch the map, plan the stack, then either
send only the changed regions to the live switch or build a new switch
beside the old one and swap the top device over to it.

The kernel is a collaborator (``System``): agent.system.RealSystem in the
daemon, fakes in tests/unit. Blocking dm calls run in worker threads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Container, Protocol

import numpy as np

from agent import mapsource, mapsources
from agent.config import ArrayMatch, Config
from agent.stack import (DeviceSpec, PlanError, StackPlan, parse_owned_uuid, plan_stack, top_name_for,
                         top_uuid_for)
from agent.topology import PathInfo, Topology
from protocol import dmswitch
from protocol.errors import DecodeError, SwitchAgentError
from protocol.mpath_status import parse_multipath_status
from protocol.pagemap import UNALLOCATED, PageMap

LOG = logging.getLogger(__name__)


WHOLE_MAP_ENCODES = 2
"""Whole-map encodes at once. Each needs ~85 bytes per page of temporaries (8.5 MiB for 100k
pages) and holds the GIL most of the time: more than two at once cost memory, not time."""


class LunNotFoundError(SwitchAgentError):
    """No array LUN matches what the user named."""


class NotOurArrayError(SwitchAgentError):
    """The LUN's INQUIRY vendor/product matches no configured array."""


class FetchTimeoutError(SwitchAgentError):
    """The whole page-map fetch took longer than fetch_timeout_s (a slow or hostile array)."""

    def __init__(self, wwid: str, timeout_s: float) -> None:
        self.wwid = wwid
        self.timeout_s = timeout_s
        super().__init__(f"{wwid}: the map fetch did not finish within {timeout_s:g} s (fetch_timeout_s)")


class DeviceLeftSuspendedError(SwitchAgentError):
    """A table swap failed and the device could not be resumed either: its I/O waits."""

    def __init__(self, uuid: str, cause: SwitchAgentError) -> None:
        self.uuid = uuid
        self.cause = cause
        super().__init__(f"{uuid} is left SUSPENDED (its I/O waits): resuming it failed: {cause}; "
                         f"`dmsetup resume --uuid {uuid}` by hand")


class InternalError(SwitchAgentError):
    """A bug (an exception that is not one of ours) while reconciling: recorded and retried like any failure."""


@dataclass(frozen=True)
class MpathMap:
    """multipathd's map of one LUN, as sysfs shows it."""

    wwid: str
    name: str
    device: str
    size_sectors: int
    slaves: tuple[tuple[str, str], ...]
    """(kernel name, major:minor) of each path device."""
    map_size_sectors: int | None = None
    """multipathd's map's own size; lags size_sectors after a grow until `multipathd resize map`."""


@dataclass(frozen=True)
class NewPath:
    """A SCSI disk the kernel just announced, as a candidate path of one LUN."""

    device: str
    dev: str
    wwid: str
    """The LUN it belongs to, in multipath's naming (what MpathMap.wwid holds)."""
    size_sectors: int


class System(Protocol):
    """The kernel as the orchestrator needs it."""

    dm: Any

    async def find_mpath_maps(self, wwid: str | None = None) -> list[MpathMap]:
        """Every multipathd map (DM_UUID mpath-*) present now; with `wwid`, only that LUN's."""
        ...

    def open_path(self, device: str) -> mapsource.ScsiPath:
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


@dataclass
class RoutedStack:
    """What the kernel holds for a routed LUN, kept because dm-switch cannot report its map."""

    plan: StackPlan
    kernel_map: np.ndarray
    """Path number of every region as the live switch holds it; -1 where we do not know."""
    page_map: PageMap
    fetched_at: float


@dataclass
class LunState:
    """Everything the daemon knows about one LUN; what `status` shows."""

    wwid: str
    state: str = "discovering"
    topology: Topology | None = None
    stack: RoutedStack | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    failures: int = 0
    epoch: int = 0
    messages_sent: int = 0
    message_bytes_sent: int = 0
    last_reconcile: dict[str, float] = field(default_factory=dict)
    """Seconds the last successful reconcile spent discovering, fetching and in the kernel."""
    leftovers: dict[str, str] = field(default_factory=dict)
    """Switches and legs an earlier daemon left (restart, kill -9): removed after the next build."""
    leg_events: dict[str, int] = field(default_factory=dict)
    """Each leg's dm event_nr when its status was last read (DM_LIST_DEVICES of that round)."""
    failed_legs: set[str] = field(default_factory=set)
    """Legs whose status showed a failed path the last time it was read."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)


class Orchestrator:
    """Keeps every array LUN routed."""

    def __init__(self, config: Config, system: System, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.system = system
        self.clock = clock
        self.luns: dict[str, LunState] = {}
        self._parallel = asyncio.Semaphore(config.max_parallel_luns)
        self._new_paths: dict[str, set[str]] = {}
        """wwid -> disks the kernel announced for it that multipathd's map does not hold yet."""
        self._encodes = asyncio.Semaphore(WHOLE_MAP_ENCODES)
        # Calls that wait for udev (a new top device's node: up to 30 s) get threads of their own:
        # in the loop's default pool (cpu_count + 4 threads: 6 on 2 CPUs) a few of them stalled
        # every other LUN's dm calls. One wait per LUN at most (its lock), so few threads in practice.
        self._udev_waits = concurrent.futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="udev-wait")
        # The poll round's own thread: it runs every LUN's poll one after another (see poll_generations).
        self._poller = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="poll")

    # -- the pipeline ---------------------------------------------------------

    async def adopt(self) -> list[str]:
        """Take over the devices an earlier daemon left; returns the LUNs (wwids) they belong to.

        The kernel cannot report a switch's map and the daemon may have died
        mid-upload, so nothing of the old stack is trusted: the next reconcile
        builds a fresh epoch, swaps the top device over, and removes the rest.
        """
        dm = self.system.dm
        ours = [(device, owned) for device in await asyncio.to_thread(dm.list_devices)
                if (owned := parse_owned_uuid(device.uuid)) is not None]
        for device, owned in ours:
            lun = self.luns.setdefault(owned.wwid, LunState(owned.wwid, state="adopting"))
            if owned.kind != "top":
                lun.leftovers[device.uuid] = owned.kind
                lun.epoch = max(lun.epoch, owned.epoch or 0)
            LOG.info("%s: adopting %s", owned.wwid, device.name)
        # A daemon killed mid-swap (kill -9) may have left a device suspended: its I/O waits until resumed.
        for uuid, error in (await asyncio.to_thread(_resume_suspended, dm, [d.uuid for d, _ in ours])).items():
            lun = self.luns[parse_owned_uuid(uuid).wwid]
            lun.state, lun.last_error, lun.last_error_at = "suspended", str(error), self.clock()
        return sorted(self.luns)

    async def reconcile(self, wwid: str) -> LunState:
        """Bring one LUN's routing in line with the array's map; keep the old routing on any error."""
        lun = self.luns.setdefault(wwid, LunState(wwid))
        async with lun.lock, _Slot(self._parallel) as slot:
            started = self.clock()
            try:
                mpath = await self._find_mpath(wwid)
                topology = await self._discover(mpath)
                lun.topology = topology
                discovered = self.clock()
                page_map = await self._fetch_map(topology)
                if _pages_for(topology, page_map) != page_map.total_pages:
                    # The array resized the volume and a path still shows the old capacity (its unit
                    # attention went to a daemon that died, or is still queued): re-read, look again.
                    await self.rescan_paths([p.device for p in topology.paths], wwid)
                    topology = lun.topology = await self._discover(await self._find_mpath(wwid))
                fetched = self.clock()
                # A routed device keeps its name while it lives, whatever the template now says.
                top_name = lun.stack.plan.top_name if lun.stack else None
                plan = plan_stack(self.config, topology, page_map, epoch=lun.epoch, top_name=top_name)
                if lun.stack and plan.same_shape_as(lun.stack.plan):
                    await self._reload_changed_legs(lun, plan)
                    await self._update_live_switch(lun, plan, page_map)
                else:
                    # A new epoch names a new switch and legs, built beside the live ones.
                    top_name = await self._claim_top_name(topology)
                    lun.epoch += 1
                    await self._build_and_swap(lun, plan_stack(self.config, topology, page_map, epoch=lun.epoch,
                                                               top_name=top_name), page_map, slot.release)
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
            lun.state = "routed"
            # Where a reconcile's time goes, for `status --json` and for tuning convergence.
            lun.last_reconcile = {"discover_s": round(discovered - started, 3),
                                  "fetch_s": round(fetched - discovered, 3),
                                  "kernel_s": round(self.clock() - fetched, 3)}
            LOG.info("%s: reconciled in %.2f s (discover %.2f, fetch %.2f, kernel %.2f)", wwid,
                     self.clock() - started, *lun.last_reconcile.values())
            return lun

    def _failed(self, lun: LunState, exc: SwitchAgentError) -> None:
        """Record a failed reconcile; a LUN we never routed and that has no multipath map is forgotten."""
        if isinstance(exc, LunNotFoundError) and lun.stack is None and not lun.leftovers:
            # A name from udev or `trigger` that is no LUN of ours: nothing to remember it by.
            self.luns.pop(lun.wwid, None)
            return
        lun.failures += 1
        lun.last_error, lun.last_error_at = str(exc), self.clock()
        if isinstance(exc, DeviceLeftSuspendedError):
            lun.state = "suspended"
        else:
            lun.state = "routed" if lun.stack else "error"
        LOG.warning("%s: %s (routing %s)", lun.wwid, exc, "kept as it was" if lun.stack else "not set up")

    async def _claim_top_name(self, topology: Topology) -> str:
        """The routed device's name for a new epoch: its own if it exists, else the template's if free.

        The device is found by its uuid (top-<wwid>), never by name: with
        device_name = "switch-{mpath}" two LUNs whose multipath aliases were
        swapped would otherwise take each other's routed devices.
        """
        wanted = top_name_for(self.config, topology)
        uuid = top_uuid_for(topology.wwid)
        devices = await asyncio.to_thread(self.system.dm.list_devices)
        own = next((d.name for d in devices if d.uuid == uuid), None)
        if own is not None:
            return own
        holder = next((d for d in devices if d.name == wanted), None)
        if holder is not None:
            raise PlanError(topology.wwid, f"the routed device's name {wanted} is taken by another device "
                                           f"(uuid {holder.uuid or '-'}); left untouched: rename one of the "
                                           "multipath aliases or change device_name")
        return wanted

    async def offer_path(self, device: str) -> str | None:
        """A new SCSI disk appeared: if it is a path of a LUN we route, remember it for that LUN.

        Returns the LUN's wwid when the disk is news to it (its reconcile then
        gives the disk to the member's leg), else None. multipathd takes the
        same disk into its map seconds later under load; until then the
        member's I/O would go on being forwarded by the array.
        """
        if not self.config.early_paths:
            return None
        routed = {wwid for wwid, lun in self.luns.items() if lun.topology is not None}
        path = await self.system.describe_path(device, routed) if routed else None
        lun = self.luns.get(path.wwid) if path else None
        if path is None or lun is None or lun.topology is None:
            return None
        offered = self._new_paths.setdefault(path.wwid, set())
        if device in offered or any(p.device == device and p.dev == path.dev for p in lun.topology.paths):
            return None  # the kernel's and udev's event of the same disk, or a path we hold
        offered.add(device)
        LOG.info("%s: new path %s (%s); taking it before multipathd's map has it", path.wwid, device, path.dev)
        return path.wwid

    async def _find_mpath(self, wwid: str) -> MpathMap:
        for mpath in await self.system.find_mpath_maps(wwid):
            if mpath.wwid == wwid:
                return await self._with_new_paths(mpath)
        raise LunNotFoundError(f"{wwid}: no multipath map for this LUN")

    async def _with_new_paths(self, mpath: MpathMap) -> MpathMap:
        """multipathd's map plus the LUN's announced disks it does not hold yet (re-checked now)."""
        names = self._new_paths.get(mpath.wwid, set())
        names -= {device for device, _ in mpath.slaves}  # multipathd has them: plain paths now
        extra = []
        for device in sorted(names):
            path = await self.system.describe_path(device)
            # Same LUN and size only: a disk still showing an old size (mid-resize) waits for multipathd.
            if path is None or path.wwid != mpath.wwid or path.size_sectors != mpath.size_sectors:
                names.discard(device)
                continue
            extra.append((device, path.dev))
        if not names:
            self._new_paths.pop(mpath.wwid, None)
        return dataclasses.replace(mpath, slaves=mpath.slaves + tuple(extra)) if extra else mpath

    async def _discover(self, mpath: MpathMap) -> Topology:
        """Ask every path which member it lands on; the first answer also says whose array it is."""
        found: dict[str, PathInfo] = {}
        source: mapsources.MapSource | None = None
        slaves = list(mpath.slaves)
        while slaves and source is None:
            device, dev = slaves.pop(0)
            try:
                scsi_path = self.system.open_path(device)
                inquiry = await mapsource.read_inquiry(scsi_path)
                array = self._our_array(inquiry.vendor, inquiry.product)
                if array is None:
                    raise NotOurArrayError(f"{mpath.wwid}: {inquiry.vendor!r} {inquiry.product!r} "
                                           "matches no configured array")
                source = await mapsources.choose(array.map_source, scsi_path)
            except NotOurArrayError:
                raise
            except SwitchAgentError as exc:
                found[device] = self._unusable(mpath.wwid, device, dev, exc)
                continue
            found[device] = await self._identify(source, mpath.wwid, device, dev)
        if source is not None:
            # The rest side by side: each path has its own SG_IO thread, and under load
            # one path after another cost seconds of a page move's convergence.
            for info in await asyncio.gather(*(self._identify(source, mpath.wwid, device, dev)
                                               for device, dev in slaves)):
                found[info.device] = info
        paths = tuple(found[device] for device, _ in mpath.slaves if device in found)
        return Topology(mpath.wwid, mpath.name, mpath.device, mpath.size_sectors, paths,
                        mpath.map_size_sectors, source.name if source else "page-map")

    async def _identify(self, source: mapsources.MapSource, wwid: str, device: str, dev: str) -> PathInfo:
        try:
            member_id, member_name = await source.identify(self.system.open_path(device))
        except SwitchAgentError as exc:
            return self._unusable(wwid, device, dev, exc)
        return PathInfo(device, dev, member_id, member_name)

    @staticmethod
    def _unusable(wwid: str, device: str, dev: str, exc: SwitchAgentError) -> PathInfo:
        LOG.warning("%s: path %s unusable: %s", wwid, device, exc)
        return PathInfo(device, dev, None, usable=False, error=str(exc))

    def _our_array(self, vendor: str, product: str) -> ArrayMatch | None:
        return next((a for a in self.config.arrays if vendor.strip() == a.vendor and product.strip() == a.product),
                    None)

    async def _fetch_map(self, topology: Topology) -> PageMap:
        """Fetch through the first usable path; fall back to the next on error."""
        last: SwitchAgentError | None = None
        for path in topology.paths:
            if not path.usable:
                continue
            try:
                # The array is a peer: a fetch that never ends must not hold the LUN and a build slot.
                async with asyncio.timeout(self.config.fetch_timeout_s):
                    return await mapsources.get(topology.map_source).fetch(self.system.open_path(path.device),
                                                                           restarts=self.config.fetch_restarts)
            except TimeoutError:
                raise FetchTimeoutError(topology.wwid, self.config.fetch_timeout_s) from None
            except SwitchAgentError as exc:
                LOG.warning("%s: page map fetch over %s failed: %s", topology.wwid, path.device, exc)
                last = exc
                # A map that failed to decode is the array's answer, not the path's: don't retry it elsewhere.
                if not _is_transport_error(exc):
                    raise
        raise last or PlanError(topology.wwid, "no usable path to fetch the page map")

    async def rescan_paths(self, devices: list[str], wwid: str = "-") -> None:
        """Make the kernel re-read each path's capacity (it does not on CAPACITY DATA HAS CHANGED).

        Side by side: each rescan is a round of SCSI commands (under TCG, most of
        a second). A path that fails is logged and left to the next reconcile.
        """
        results = await asyncio.gather(*(self.system.rescan_path(d) for d in devices), return_exceptions=True)
        for device, result in zip(devices, results):
            if isinstance(result, SwitchAgentError):
                LOG.warning("%s: rescan of %s failed: %s", wwid, device, result)
            elif isinstance(result, BaseException):
                raise result

    async def _reload_changed_legs(self, lun: LunState, plan: StackPlan) -> None:
        """Paths came or went: give the affected legs their new path groups, in place.

        Only the leg's own table is swapped (noflush, as multipathd reloads its
        maps, so queued I/O moves to the new table instead of failing); the
        switch above keeps its region map.
        """
        assert lun.stack is not None
        for leg, paths, old_paths in zip(plan.legs, plan.leg_paths, lun.stack.plan.leg_paths):
            if paths == old_paths:
                continue
            await _through(swap_table, self.system.dm, leg.uuid, list(leg.targets), udev_flags=leg.udev_flags,
                           noflush=True)
            LOG.info("%s: %s now prefers %s (fallback %s)", lun.wwid, leg.name, " ".join(paths[0]) or "-",
                     " ".join(paths[1]) or "-")
        lun.stack.plan = plan

    async def _update_live_switch(self, lun: LunState, plan: StackPlan, page_map: PageMap) -> None:
        """Same legs, same geometry: send only the regions whose owner changed."""
        assert lun.stack is not None
        # A -1 in `previous` is a region whose kernel value we do not know: it is sent if allocated.
        messages = dmswitch.encode_region_mappings(page_map.owners, previous=lun.stack.kernel_map,
                                                   max_message_bytes=self.config.max_message_bytes)
        try:
            await self._send(lun, plan.switch_uuid, messages)
        except SwitchAgentError:
            # Messages are not atomic: after a rejected one we no longer know what the kernel
            # holds, so send the whole map.
            lun.stack.kernel_map = np.full(page_map.total_pages, -1, dtype=page_map.owners.dtype)
            LOG.warning("%s: diff upload failed; sending the whole map", lun.wwid)
            await self._send(lun, plan.switch_uuid, dmswitch.encode_region_mappings(
                page_map.owners, max_message_bytes=self.config.max_message_bytes))
        lun.stack = RoutedStack(plan, _after_upload(page_map.owners), page_map, self.clock())
        LOG.info("%s: map generation %d applied (%d messages)", lun.wwid, page_map.generation, len(messages))

    async def _build_and_swap(self, lun: LunState, plan: StackPlan, page_map: PageMap,
                              release_slot: Callable[[], None] = lambda: None) -> None:
        """Build and fully program a new switch, then point the top device at it.

        `release_slot` gives up the LUN's max_parallel_luns slot once only waiting for udev remains.
        """
        created: list[str] = []
        """uuids of the devices this build made: every change to a device addresses it by its uuid."""
        # Encoding a whole map is the install's biggest CPU cost (seconds for the seed's 1.5M pages
        # under TCG): do it in a thread while the kernel and udev build the devices, and keep
        # the event loop free for the other LUNs meanwhile.
        encoding = asyncio.ensure_future(self._encode_whole_map(plan, page_map))
        try:
            # Legs side by side: most of a leg's time is udev's, and udev works on them in parallel.
            results = await asyncio.gather(*(self._create(spec, created) for spec in plan.legs),
                                           return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            leg_devs = list(results)
            switch_dev = await self._create(plan.switch_spec(leg_devs), created)
            messages = await encoding
            await self._send(lun, plan.switch_uuid, messages)
            await self._point_top_at(plan, switch_dev, release_slot)
        except SwitchAgentError:
            await self._remove_all(reversed(created))
            raise
        finally:
            if not encoding.done():
                encoding.cancel()  # the thread finishes on its own; nobody waits for its result
            elif not encoding.cancelled():
                encoding.exception()  # retrieved, so asyncio does not log it as never seen
        old = lun.stack
        lun.stack = RoutedStack(plan, _after_upload(page_map.owners), page_map, self.clock())
        LOG.info("%s: routed as /dev/mapper/%s (epoch %d, %d members, %d regions of %d sectors, %d messages)",
                 lun.wwid, plan.top_name, plan.epoch, len(plan.legs), plan.region_count,
                 plan.region_size_sectors, len(messages))
        stale = dict(lun.leftovers)  # uuid -> "sw" or "leg"
        if old is not None:
            stale |= {old.plan.switch_uuid: "sw", **{leg.uuid: "leg" for leg in old.plan.legs}}
        for uuid in (plan.switch_uuid, *(leg.uuid for leg in plan.legs)):
            stale.pop(uuid, None)
        # Switches hold legs: remove them first.
        await self._remove_all(sorted(stale, key=lambda uuid: stale[uuid] == "leg"))
        lun.leftovers.clear()

    async def _encode_whole_map(self, plan: StackPlan, page_map: PageMap) -> list[str]:
        async with self._encodes:
            return await asyncio.to_thread(
                dmswitch.encode_region_mappings, page_map.owners,
                previous=dmswitch.round_robin(plan.region_count, len(plan.legs)),
                max_message_bytes=self.config.max_message_bytes)

    async def _create(self, spec: DeviceSpec, created: list[str]) -> str:
        dm = self.system.dm
        await asyncio.to_thread(dm.device_create, spec.name, spec.uuid)
        created.append(spec.uuid)
        await asyncio.to_thread(dm.table_load, None, list(spec.targets), uuid=spec.uuid)
        # Legs and switch are used by major:minor and hidden from other rules: nothing
        # waits on their /dev/mapper nodes, so neither do we.
        await asyncio.to_thread(dm.device_resume, uuid=spec.uuid, udev_flags=spec.udev_flags, wait_for_udev=False)
        info = await asyncio.to_thread(dm.device_info, uuid=spec.uuid)
        return f"{info.major}:{info.minor}"

    async def _point_top_at(self, plan: StackPlan, switch_dev: str,
                            release_slot: Callable[[], None] = lambda: None) -> None:
        dm = self.system.dm
        targets = list(plan.top_targets(switch_dev))
        existing = {d.uuid for d in await asyncio.to_thread(dm.list_devices)}
        if plan.top_uuid not in existing:
            await asyncio.to_thread(dm.device_create, plan.top_name, plan.top_uuid)
            try:
                await asyncio.to_thread(dm.table_load, None, targets, uuid=plan.top_uuid)
                # The new node's resume waits for udev (up to 30 s while it works through many LUNs
                # appearing at once). The building is done: let another LUN build meanwhile;
                # this LUN's own lock stays held until its device is there.
                release_slot()
                await self._waiting_for_udev(dm.device_resume, uuid=plan.top_uuid)
            except SwitchAgentError:
                await self._remove_all([plan.top_uuid], wait_for_udev=True)
                raise
            return
        # The node exists and keeps its name: udev's change event needs no waiting for, and
        # under load waiting cost seconds of the lock the next change needs.
        await _through(swap_table, dm, plan.top_uuid, targets)

    async def _waiting_for_udev(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A blocking dm call that waits for udev, in the udev-wait threads."""
        return await asyncio.get_running_loop().run_in_executor(
            self._udev_waits, functools.partial(call, *args, **kwargs))

    async def _send(self, lun: LunState, switch_uuid: str, messages: list[str]) -> None:
        dm = self.system.dm
        for message in messages:
            await asyncio.to_thread(dm.target_message, None, 0, message, uuid=switch_uuid)
            lun.messages_sent += 1
            lun.message_bytes_sent += len(message)

    async def _remove_all(self, uuids, *, wait_for_udev: bool = False) -> None:
        """Best effort: try every device (by uuid), log every failure.

        Switches and legs are hidden from udev's rules and used by major:minor
        only, so their removal does not wait for udev unless asked.
        """
        for uuid in uuids:
            try:
                if wait_for_udev:
                    await self._waiting_for_udev(self.system.dm.device_remove, uuid=uuid, wait_for_udev=True)
                else:
                    await asyncio.to_thread(self.system.dm.device_remove, uuid=uuid, wait_for_udev=False)
            except SwitchAgentError as exc:
                LOG.warning("could not remove %s: %s", uuid, exc)

    def legs_to_check(self, lun: LunState, events: dict[str, int] | None) -> list[str]:
        """The legs whose status may show a failed path, given every dm device's event_nr now.

        dm-mpath bumps its device's event_nr on every path failure and
        reinstatement (trigger_event -> dm_table_event), so a leg whose number
        has not moved since its status was read, and which had no failed path
        then, still has none: polling need not ask it. Without numbers
        (`events` None: a udev event, a retry) every leg is read.
        """
        if lun.stack is None:
            return []
        return [leg.name for leg in lun.stack.plan.legs
                if events is None or leg.name in lun.failed_legs or leg.name not in events
                or lun.leg_events.get(leg.name) != events[leg.name]]

    async def heal_paths(self, wwid: str, events: dict[str, int] | None = None) -> int:
        """Reinstate legs' failed paths that answer TEST UNIT READY again; returns how many stay failed.

        dm-multipath fails a path on an I/O error and never brings it back by
        itself (multipathd does that for its own maps only). Until a path is
        reinstated its member's I/O goes to the fallback group, i.e. is
        forwarded by the array. `events` (leg name -> dm event_nr, read before
        this call) limits the reads to the legs that may have changed.
        """
        lun = self.luns.get(wwid)
        if lun is None or lun.stack is None or lun.topology is None:
            return 0
        by_dev = {p.dev: p.device for p in lun.topology.paths}
        still_failed = 0
        dm = self.system.dm
        async with lun.lock:
            legs = {leg.name: leg for leg in lun.stack.plan.legs}
            current = set(legs)
            for name in set(lun.leg_events) - current:  # legs of an earlier epoch
                del lun.leg_events[name]
            lun.failed_legs &= current
            # One hop to a worker for all of them: a hop costs more CPU under TCG than the ioctl,
            # and on a kernel without event numbers a poll round now and then reads every leg.
            statuses = await asyncio.to_thread(_leg_statuses, dm, [legs[n] for n in self.legs_to_check(lun, events)])
            for leg_name, status in statuses.items():
                try:
                    if isinstance(status, SwitchAgentError):
                        raise status
                    states = parse_multipath_status(status[0].params)
                except SwitchAgentError as exc:
                    LOG.warning("%s: cannot read the status of %s: %s", wwid, leg_name, exc)
                    continue
                # The number read before the status: a change after it shows as a move next round.
                if events is not None and leg_name in events:
                    lun.leg_events[leg_name] = events[leg_name]
                failed_here = 0
                for state in states:
                    if state.active:
                        continue
                    device = by_dev.get(state.dev)
                    if device is None or not await mapsource.path_answers(self.system.open_path(device)):
                        failed_here += 1
                        continue
                    try:
                        await asyncio.to_thread(dm.target_message, None, 0, f"reinstate_path {state.dev}",
                                                uuid=legs[leg_name].uuid)
                    except SwitchAgentError as exc:
                        LOG.warning("%s: reinstating %s in %s failed: %s", wwid, state.dev, leg_name, exc)
                        failed_here += 1
                        continue
                    LOG.info("%s: path %s (%s) reinstated in %s", wwid, device, state.dev, leg_name)
                (lun.failed_legs.add if failed_here else lun.failed_legs.discard)(leg_name)
                still_failed += failed_here
        return still_failed

    async def poll_generations(self, luns: list[LunState]) -> dict[str, int | None]:
        """Each LUN's map generation (or stand-in), read over its first usable path that answers.

        None for a LUN none of whose paths answered. The whole round runs in one
        worker thread on an event loop of its own, its commands blocking that
        thread (``open_path(...).blocking()``): a hop to a worker per command was
        most of the idle daemon's CPU with 64 LUNs under TCG. A stuck path delays
        the rest of the round, as it did when the round awaited one poll after another.
        """
        work = []
        for lun in luns:
            assert lun.topology is not None
            paths = []
            for path in lun.topology.paths:
                if path.usable:
                    try:
                        paths.append(self.system.open_path(path.device).blocking())
                    except SwitchAgentError as exc:
                        LOG.debug("%s: cannot poll over %s: %s", lun.wwid, path.device, exc)
            work.append((lun.wwid, mapsources.get(lun.topology.map_source), paths))
        return await asyncio.get_running_loop().run_in_executor(self._poller, asyncio.run, _poll_round(work))

    # -- questions from the CLI ------------------------------------------------

    def find(self, ref: str) -> LunState:
        """A LUN by wwid, multipath map name, routed device name, or /dev path."""
        ref = ref.removeprefix("/dev/mapper/").removeprefix("/dev/")
        # A routed device's own name first: after a multipath alias swap the template would name another LUN's.
        for lun in self.luns.values():
            if lun.stack and ref == lun.stack.plan.top_name:
                return lun
        for lun in self.luns.values():
            names = {lun.wwid}
            if lun.topology:
                names |= {lun.topology.mpath_name, lun.topology.mpath_device}
                if not lun.stack:
                    names.add(top_name_for(self.config, lun.topology))
            if ref in names:
                return lun
        raise LunNotFoundError(f"{ref}: no such array LUN (try `switch-agent status`)")

    def status(self, lun: LunState) -> dict[str, Any]:
        """The status record of one LUN (what `status --json` prints)."""
        now = self.clock()
        record: dict[str, Any] = {"wwid": lun.wwid, "state": lun.state, "device": None, "members": [],
                                  "generation": None, "map_age_s": None, "last_error": lun.last_error,
                                  "epoch": lun.epoch if lun.stack else None,
                                  "messages_sent": lun.messages_sent,
                                  "message_bytes_sent": lun.message_bytes_sent,
                                  "last_reconcile": lun.last_reconcile}
        if lun.topology:
            record["multipath"] = lun.topology.mpath_name
            record["warnings"] = lun.topology.warnings()
            record["map_source"] = lun.topology.map_source
            wanted = top_name_for(self.config, lun.topology)
            if lun.stack and lun.stack.plan.top_name != wanted:
                record["warnings"].append(
                    f"the routed device keeps its name {lun.stack.plan.top_name}; device_name now gives {wanted} "
                    "(the multipath alias changed?): it is renamed only when rebuilt after removal by hand")
        if lun.stack:
            stack = lun.stack
            record.update(device=f"/dev/mapper/{stack.plan.top_name}", generation=stack.page_map.generation,
                          map_age_s=round(now - stack.fetched_at, 1),
                          page_size_bytes=stack.page_map.page_size_sectors * 512,
                          pages=stack.page_map.total_pages,
                          unallocated_pages=int((stack.page_map.owners == UNALLOCATED).sum()))
            pages = stack.page_map.pages_per_member()
            for k, member in enumerate(stack.page_map.members):
                paths = lun.topology.paths_of_member(member.member_id) if lun.topology else ()
                record["members"].append({
                    "member_id": member.member_id, "name": member.name, "pages": pages[member.member_id],
                    "leg": stack.plan.legs[k].name,
                    "paths": [{"device": p.device, "dev": p.dev, "state": "active" if p.usable else "failed"}
                              for p in paths]})
        return record

    def locate(self, lun: LunState, byte_offset: int) -> dict[str, Any]:
        """Which member owns the page at a byte offset, and which paths the switch sends it to."""
        if not lun.stack or not lun.topology:
            raise LunNotFoundError(f"{lun.wwid}: not routed yet")
        stack = lun.stack
        page_bytes = stack.page_map.page_size_sectors * 512
        # The routed size, not the paths': after a grow that failed to route, the switch is the old size.
        routed_bytes = stack.plan.size_sectors * 512
        if not 0 <= byte_offset < routed_bytes:
            raise ValueError(f"offset {byte_offset} is outside the routed device (0..{routed_bytes - 1})")
        page = byte_offset // page_bytes
        owner = stack.page_map.owner_of_page(page)
        path_index = int(stack.kernel_map[page])
        leg = stack.plan.legs[path_index] if path_index >= 0 else None
        preferred = stack.plan.leg_paths[path_index][0] if path_index >= 0 else ()
        by_dev = {p.dev: p.device for p in lun.topology.paths}
        return {"wwid": lun.wwid, "offset": byte_offset, "page": page,
                "member_id": owner.member_id if owner else None,
                "member": owner.name if owner else None,
                "leg": leg.name if leg else None,
                "paths": [by_dev.get(d, d) for d in preferred]}


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


def _pages_for(topology: Topology, page_map: PageMap) -> int:
    """Pages the LUN's size (as its paths show it) spans, in the map's page size."""
    return -(-topology.size_sectors // page_map.page_size_sectors)


def _is_transport_error(exc: SwitchAgentError) -> bool:
    return not isinstance(exc, DecodeError)


def _after_upload(owners: np.ndarray) -> np.ndarray:
    """What the switch holds after an upload of `owners`: known where allocated.

    Unallocated pages may have been filled with any path by the encoder, so
    they stay unknown (-1) and are sent again once they get an owner. That
    is `owners` itself (UNALLOCATED is -1): shared, read-only, not copied,
    as with many LUNs the copy was half of what the daemon kept.
    """
    owners.flags.writeable = False
    return owners


def _leg_statuses(dm: Any, legs: list[DeviceSpec]) -> dict[str, Any]:
    """Each leg's DM_TABLE_STATUS targets, or the error reading it gave, by leg name (in a worker thread)."""
    statuses: dict[str, Any] = {}
    for leg in legs:
        try:
            statuses[leg.name] = dm.table_status(uuid=leg.uuid)
        except SwitchAgentError as exc:
            statuses[leg.name] = exc
    return statuses


def _resume_suspended(dm: Any, uuids: list[str]) -> dict[str, SwitchAgentError]:
    """Resume (their live tables) those of `uuids` that are suspended; the ones that stay suspended and why."""
    stuck: dict[str, SwitchAgentError] = {}
    for uuid in uuids:
        try:
            if not dm.device_info(uuid=uuid).suspended:
                continue
            LOG.warning("%s: found suspended; resuming its live table", uuid)
            resume_as_it_was(dm, uuid)
        except SwitchAgentError as exc:
            stuck[uuid] = exc
    return stuck


def swap_table(dm: Any, uuid: str, targets: list, *, udev_flags: int = 0, noflush: bool = False) -> None:
    """Load `targets` into a live device and swap them in (one resume: suspend, swap, resume).

    Whatever fails, the device is not left suspended: a failed swap leaves it
    suspended with its new table dropped (dm-ioctl.c do_resume), so the old
    table is resumed. If even that fails, DeviceLeftSuspendedError says so.
    Blocking: run it in a worker thread, to its end (`_through`).
    """
    dm.table_load(None, targets, uuid=uuid)
    try:
        dm.device_resume(uuid=uuid, udev_flags=udev_flags, noflush=noflush, wait_for_udev=False)
    except SwitchAgentError:
        resume_as_it_was(dm, uuid, udev_flags=udev_flags, noflush=noflush)
        raise


def resume_as_it_was(dm: Any, uuid: str, *, udev_flags: int = 0, noflush: bool = False) -> None:
    """Drop any inactive table and resume the live one; DeviceLeftSuspendedError when the kernel refuses."""
    try:
        dm.table_clear(uuid=uuid)
    except SwitchAgentError as exc:
        LOG.debug("%s: clearing the inactive table: %s", uuid, exc)
    try:
        dm.device_resume(uuid=uuid, udev_flags=udev_flags, noflush=noflush, wait_for_udev=False)
    except SwitchAgentError as exc:
        LOG.error("%s: left suspended: %s", uuid, exc)
        raise DeviceLeftSuspendedError(uuid, exc) from exc


async def _through(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A blocking call in a worker thread that runs to its end even when the caller is cancelled.

    A table swap cancelled half-way (SIGTERM mid-reconcile) must still resume
    its device: the thread goes on, and asyncio.run joins it before the daemon exits.
    """
    work = asyncio.ensure_future(asyncio.to_thread(call, *args, **kwargs))
    work.add_done_callback(_log_unawaited_failure)
    return await asyncio.shield(work)


def _log_unawaited_failure(work: asyncio.Future) -> None:
    if not work.cancelled() and work.exception() is not None:
        LOG.debug("kernel call finished with %s", work.exception())


async def _poll_round(work: list[tuple[str, Any, list[Any]]]) -> dict[str, int | None]:
    """(wwid, map source, paths) -> generation over the first path that answers, or None."""
    generations: dict[str, int | None] = {}
    for wwid, source, paths in work:
        generations[wwid] = None
        for path in paths:
            try:
                generations[wwid] = await source.poll_generation(path)
                break
            except SwitchAgentError as exc:
                LOG.debug("%s: poll over %s failed: %s", wwid, path.name, exc)
    return generations
