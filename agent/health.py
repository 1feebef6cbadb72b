"""Keeping routed LUNs healthy between reconciles: leg paths reinstated, map generations polled.

dm-multipath fails a path on an I/O error and never brings it back by
itself (multipathd does that for its own maps only): until a leg's path is
reinstated its member's I/O goes to the fallback group, i.e. is forwarded
by the array. And the array changes its map at any time: a cheap poll of
each LUN's generation tells the daemon which to reconcile.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from typing import TYPE_CHECKING, Any

from agent import logfields, mapsources
from agent.scsipath import path_answers
from agent.dm_async import AsyncDeviceMapper
from agent.lun import LunState
from protocol.errors import SwitchAgentError
from protocol.multipath import parse_multipath_status

if TYPE_CHECKING:
    from agent.orchestrator import System

LOG = logging.getLogger(__name__)


class PathHealth:
    """Reinstates legs' failed paths and polls map generations; owns the poll round's thread."""

    def __init__(self, system: System, dm: AsyncDeviceMapper) -> None:
        self.system = system
        self.dm = dm
        # The poll round's own thread: it runs every LUN's poll one after another (see poll_generations).
        self._poller = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="poll")

    @staticmethod
    def legs_to_check(lun: LunState, events: dict[str, int] | None) -> list[str]:
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

    async def _answers(self, wwid: str, device: str) -> bool:
        """TEST UNIT READY over the path; a disk that is gone (its session logged out) does not answer."""
        try:
            path = self.system.open_path(device)
        except SwitchAgentError as exc:  # the node went away: the path stays failed, the other legs still heal
            LOG.info("%s: failed path %s cannot be opened: %s", wwid, device, exc)
            return False
        return await path_answers(path)

    async def heal_paths(self, lun: LunState, events: dict[str, int] | None = None) -> int:
        """Reinstate legs' failed paths that answer TEST UNIT READY again; returns how many stay failed.

        `events` (leg name -> dm event_nr, read before this call) limits the
        reads to the legs that may have changed.
        """
        if lun.stack is None or lun.topology is None:
            return 0
        by_dev = {p.dev: p.device for p in lun.topology.paths}
        member_of = {p.dev: p.member_name for p in lun.topology.paths}
        still_failed = 0
        async with lun.lock:
            legs = {leg.name: leg for leg in lun.stack.plan.legs}
            for name in set(lun.leg_events) - set(legs):  # legs of an earlier epoch
                del lun.leg_events[name]
            lun.failed_legs &= set(legs)
            statuses = await self.dm.statuses([legs[name] for name in self.legs_to_check(lun, events)])
            for leg_name, status in statuses.items():
                try:
                    if isinstance(status, SwitchAgentError):
                        raise status
                    states = parse_multipath_status(status[0].params)
                except SwitchAgentError as exc:
                    LOG.warning("%s: cannot read the status of %s: %s", lun.wwid, leg_name, exc)
                    continue
                # The number read before the status: a change after it shows as a move next round.
                if events is not None and leg_name in events:
                    lun.leg_events[leg_name] = events[leg_name]
                failed_here = 0
                for state in states:
                    if state.active:
                        continue
                    device = by_dev.get(state.dev)
                    if device is None or not await self._answers(lun.wwid, device):
                        failed_here += 1
                        continue
                    try:
                        await self.dm.message(legs[leg_name].uuid, f"reinstate_path {state.dev}")
                    except SwitchAgentError as exc:
                        LOG.warning("%s: reinstating %s in %s failed: %s", lun.wwid, state.dev, leg_name, exc,
                                    extra=logfields.member(member_of.get(state.dev)))
                        failed_here += 1
                        continue
                    LOG.info("%s: path %s (%s) reinstated in %s", lun.wwid, device, state.dev, leg_name,
                             extra=logfields.member(member_of.get(state.dev)))
                (lun.failed_legs.add if failed_here else lun.failed_legs.discard)(leg_name)
                still_failed += failed_here
        return still_failed

    async def poll_generations(self, luns: list[LunState]) -> dict[str, int | None]:
        """Each LUN's map generation (or stand-in), read over its first usable path that answers.

        None for a LUN none of whose paths answered. The whole round runs in one
        worker thread on an event loop of its own, its commands blocking that
        thread (``open_path(...).blocking()``): a hop to a worker per command was
        most of the idle daemon's CPU with many LUNs. A stuck path delays the
        rest of the round, as it did when the round awaited one poll after another.
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
        return await asyncio.get_running_loop().run_in_executor(self._poller, asyncio.run, poll_round(work))


async def poll_round(work: list[tuple[str, Any, list[Any]]]) -> dict[str, int | None]:
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
