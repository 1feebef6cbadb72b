"""Applying a LUN's planned stack to the kernel: a new epoch beside the live one, or only what changed.

Two ways, as the orchestrator decides:

- same shape (size, regions, legs): reload the legs whose paths changed in
  place, and send the live switch only the regions whose owner changed;
- otherwise: build and fully program a new switch and legs (a new epoch),
  point the top device at it under suspend, then remove the old epoch.
  A switch's table load resets its map to round-robin, so the routed device
  never serves I/O through a half-programmed switch.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import numpy as np

from agent import logfields
from agent.config import Config
from agent.dm_async import AsyncDeviceMapper
from agent.lun import LunState, RoutedStack
from agent.stack import DeviceSpec, OwnedUuid, PlanError, StackPlan, top_name_for
from agent.topology import Topology
from protocol import dmswitch_changes, dmswitch_encoder
from protocol.errors import SwitchAgentError
from protocol.pagemap import PageMap

LOG = logging.getLogger(__name__)

WHOLE_MAP_ENCODES = 2
"""Whole-map encodes at once. Each needs ~85 bytes per page of temporaries (8.5 MiB for 100k
pages) and holds the GIL most of the time: more than two at once cost memory, not time."""


class PlanApplier:
    """Puts StackPlans into the kernel through the async dm facade; records what it holds on the LunState."""

    def __init__(self, config: Config, dm: AsyncDeviceMapper, clock: Callable[[], float]) -> None:
        self.config = config
        self.dm = dm
        self.clock = clock
        self._encodes = asyncio.Semaphore(WHOLE_MAP_ENCODES)

    async def claim_top_name(self, topology: Topology) -> str:
        """The routed device's name for a new epoch: its own if it exists, else the template's if free.

        The device is found by its uuid (top-<wwid>), never by name: with
        device_name = "switch-{mpath}" two LUNs whose multipath aliases were
        swapped would otherwise take each other's routed devices.
        """
        wanted = top_name_for(self.config, topology)
        uuid = OwnedUuid.top(topology.wwid).uuid
        devices = await self.dm.list_devices()
        own: str | None = next((d.name for d in devices if d.uuid == uuid), None)
        if own is not None:
            return own
        holder = next((d for d in devices if d.name == wanted), None)
        if holder is not None:
            raise PlanError(topology.wwid, f"the routed device's name {wanted} is taken by another device "
                                           f"(uuid {holder.uuid or '-'}); left untouched: rename one of the "
                                           "multipath aliases or change device_name")
        return wanted

    async def update_in_place(self, lun: LunState, plan: StackPlan, page_map: PageMap) -> None:
        """Same shape: the legs whose own paths changed, then the switch's changed regions, then the
        legs whose fallback paths alone changed. A page moved to a member that just joined is
        forwarded until its leg and the switch both route it there; the others' fallbacks are no
        part of that (in the guest run of 21:00 the joining member's leg was the last of four)."""
        assert lun.stack is not None
        old = lun.stack.plan
        await self._reload_changed_legs(lun, plan, old, preferred=True)
        await self.update_live_switch(lun, plan, page_map)
        await self._reload_changed_legs(lun, plan, old, preferred=False)

    async def _reload_changed_legs(self, lun: LunState, plan: StackPlan, old: StackPlan, *, preferred: bool) -> None:
        """Paths came or went: give the affected legs their new path groups, in place -- those whose
        own paths changed (``preferred``), or those whose fallback alone did (not ``preferred``).

        Only the leg's own table is swapped (noflush, as multipathd reloads its
        maps, so queued I/O moves to the new table instead of failing); the
        switch above keeps its region map.
        """
        member_of = {p.dev: p.member_name for p in lun.topology.paths} if lun.topology else {}
        for leg, paths, old_paths in zip(plan.legs, plan.leg_paths, old.leg_paths):
            if paths == old_paths or preferred != (paths[0] != old_paths[0]):
                continue
            await self.dm.swap_table(leg.uuid, leg.targets, udev_flags=leg.udev_flags, noflush=True)
            # The leg's own paths are its member's (none: the member lost its sessions).
            member = member_of.get(paths[0][0]) if paths[0] else None
            LOG.info("%s: %s now prefers %s (fallback %s)", lun.wwid, leg.name, " ".join(paths[0]) or "-",
                     " ".join(paths[1]) or "-", extra=logfields.member(member))

    async def update_live_switch(self, lun: LunState, plan: StackPlan, page_map: PageMap) -> None:
        """Same legs, same geometry: send only the regions whose owner changed.

        When the map came from a changes-since answer on top of what the switch
        holds, those changed pages are all there is to send: no look at the rest.
        """
        assert lun.stack is not None
        changed = _changed_regions(lun.stack, page_map)
        if changed is not None:
            messages = dmswitch_changes.encode_changed_regions(
                changed, page_map.owners[changed], nr_regions=page_map.total_pages,
                max_message_bytes=self.config.max_message_bytes)
        else:
            # A -1 in `previous` is a region whose kernel value we do not know: it is sent if allocated.
            messages = dmswitch_encoder.encode_region_mappings(page_map.owners, previous=lun.stack.kernel_map,
                                                               max_message_bytes=self.config.max_message_bytes)
        try:
            await self._send(lun, plan.switch_uuid, messages)
        except SwitchAgentError:
            # Messages are not atomic: after a rejected one we no longer know what the kernel
            # holds, so send the whole map.
            lun.stack.kernel_map = np.full(page_map.total_pages, -1, dtype=page_map.owners.dtype)
            LOG.warning("%s: diff upload failed; sending the whole map", lun.wwid)
            await self._send(lun, plan.switch_uuid, dmswitch_encoder.encode_region_mappings(
                page_map.owners, max_message_bytes=self.config.max_message_bytes))
        lun.stack = RoutedStack(plan, _after_upload(page_map.owners), page_map, self.clock())
        LOG.info("%s: map generation %d applied (%d messages)", lun.wwid, page_map.generation, len(messages))

    async def build_and_swap(self, lun: LunState, plan: StackPlan, page_map: PageMap,
                             release_slot: Callable[[], None] = lambda: None) -> None:
        """Build and fully program a new switch, then point the top device at it.

        `release_slot` gives up the LUN's max_parallel_luns slot once only waiting for udev remains.
        """
        created: list[str] = []
        """uuids of the devices this build made: every change to a device addresses it by its uuid."""
        # Encoding a whole map is the install's biggest CPU cost: do it in a thread while the kernel
        # and udev build the devices, and keep the event loop free for the other LUNs meanwhile.
        encoding = asyncio.ensure_future(self._encode_whole_map(plan, page_map))
        try:
            # Legs side by side: most of a leg's time is udev's, and udev works on them in parallel.
            results = await asyncio.gather(*(self._create(spec, created) for spec in plan.legs),
                                           return_exceptions=True)
            leg_devs = []
            for result in results:
                if isinstance(result, BaseException):
                    raise result
                leg_devs.append(result)
            switch_dev = await self._create(plan.switch_spec(leg_devs), created)
            messages = await encoding
            await self._send(lun, plan.switch_uuid, messages)
            await self._point_top_at(plan, switch_dev, release_slot)
        except SwitchAgentError:
            await self.dm.remove(reversed(created))
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
        await self.dm.remove(sorted(stale, key=lambda uuid: stale[uuid] == "leg"))
        lun.leftovers.clear()

    async def _encode_whole_map(self, plan: StackPlan, page_map: PageMap) -> list[str]:
        async with self._encodes:
            return await asyncio.to_thread(
                dmswitch_encoder.encode_region_mappings, page_map.owners,
                previous=dmswitch_encoder.round_robin(plan.region_count, len(plan.legs)),
                max_message_bytes=self.config.max_message_bytes)

    async def _create(self, spec: DeviceSpec, created: list[str]) -> str:
        dev = await self.dm.create_and_load(spec)
        created.append(spec.uuid)
        return dev

    async def _point_top_at(self, plan: StackPlan, switch_dev: str, release_slot: Callable[[], None]) -> None:
        targets = plan.top_targets(switch_dev)
        if plan.top_uuid not in {d.uuid for d in await self.dm.list_devices()}:
            # The new node's resume waits for udev (up to 30 s while it works through many LUNs
            # appearing at once). The building is done: let another LUN build meanwhile;
            # this LUN's own lock stays held until its device is there.
            await self.dm.create_visible(plan.top_name, plan.top_uuid, targets, before_udev_wait=release_slot)
            return
        # The node exists and keeps its name: udev's change event needs no waiting for, and
        # waiting would hold the lock the next change needs.
        await self.dm.swap_table(plan.top_uuid, targets)

    async def _send(self, lun: LunState, switch_uuid: str, messages: list[str]) -> None:
        sent: list[str] = []
        try:
            await self.dm.messages(switch_uuid, messages, sent)
        finally:
            lun.messages_sent += len(sent)
            lun.message_bytes_sent += sum(map(len, sent))


CHANGED_REGIONS_SHARE = 1 / 64
"""Above this share of the map changed, the whole-map diff encoder's copies pay for its look at every
region (and its numpy passes beat a run per changed region)."""


def _changed_regions(stack: RoutedStack, page_map: PageMap) -> np.ndarray | None:
    """The regions to write when `page_map` is the routed one plus a known list of changes; else None.

    Only where the switch holds exactly the routed map (`kernel_map` is its
    owners: not after a failed upload) and the change list starts from it.
    Pages that became unallocated need nothing written.
    """
    pages = page_map.changed_pages
    if (pages is None or page_map.changed_since != stack.page_map.generation
            or stack.kernel_map is not stack.page_map.owners
            or pages.size > CHANGED_REGIONS_SHARE * page_map.total_pages):
        return None
    allocated: np.ndarray = pages[page_map.owners[pages] >= 0]
    return allocated


def _after_upload(owners: np.ndarray) -> np.ndarray:
    """What the switch holds after an upload of `owners`: known where allocated.

    Unallocated pages may have been filled with any path by the encoder, so
    they stay unknown (-1) and are sent again once they get an owner. That
    is `owners` itself (UNALLOCATED is -1): shared, read-only, not copied,
    as with many LUNs the copy was half of what the daemon kept.
    """
    owners.flags.writeable = False
    return owners
