"""From a LUN's multipath map to what the array says of it: its paths' members, and its page map.

The kernel side comes from the System (sysfs, SG_IO); the array side from
the configured map source (agent.mapsources). Nothing here changes a device.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import TYPE_CHECKING, Mapping

from agent import logfields, mapsources
from agent.scsipath import read_inquiry
from agent.config import ArrayMatch, Config
from agent.lun import LunState
from agent.stack import PlanError
from agent.topology import MpathMap, PathInfo, Topology
from protocol.errors import DecodeError, SwitchAgentError
from protocol.pagemap import PageMap

if TYPE_CHECKING:
    from agent.orchestrator import System

LOG = logging.getLogger(__name__)


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


class Discovery:
    """Finds a LUN's paths (multipathd's and the kernel's newer ones), their members, and its map."""

    def __init__(self, config: Config, system: System) -> None:
        self.config = config
        self.system = system
        self._new_paths: dict[str, set[str]] = {}
        """wwid -> disks the kernel announced for it that multipathd's map does not hold yet."""

    async def offer_path(self, device: str, luns: Mapping[str, LunState]) -> str | None:
        """A new SCSI disk appeared: if it is a path of a LUN we route, remember it for that LUN.

        Returns the LUN's wwid when the disk is news to it (its reconcile then
        gives the disk to the member's leg), else None. multipathd takes the
        same disk into its map seconds later under load; until then the
        member's I/O would go on being forwarded by the array.
        """
        if not self.config.early_paths:
            return None
        routed = {wwid for wwid, lun in luns.items() if lun.topology is not None}
        path = await self.system.describe_path(device, routed) if routed else None
        lun = luns.get(path.wwid) if path else None
        if path is None or lun is None or lun.topology is None:
            return None
        offered = self._new_paths.setdefault(path.wwid, set())
        if device in offered or any(p.device == device and p.dev == path.dev for p in lun.topology.paths):
            return None  # the kernel's and udev's event of the same disk, or a path we hold
        offered.add(device)
        LOG.info("%s: new path %s (%s); taking it before multipathd's map has it", path.wwid, device, path.dev)
        return path.wwid

    def expect_paths(self, wwid: str, devices: list[str]) -> None:
        """Disks of sessions the agent just logged in to: the LUN's paths as soon as they show its
        wwid and size, before multipathd's map has them."""
        if devices:
            self._new_paths.setdefault(wwid, set()).update(devices)

    async def find_mpath(self, wwid: str) -> MpathMap:
        """multipathd's map of the LUN, with the disks the kernel announced for it since."""
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

    async def discover(self, mpath: MpathMap, known: Topology | None = None) -> Topology:
        """Which member every path lands on; the first answer also says whose array it is.

        `known`: what the last successful reconcile found for this LUN. Its
        array and map source stand (an array does not change vendor under a
        routed LUN). A path still on the iSCSI session it answered over then
        keeps that member, unasked (``PathInfo.remembered``: a page move's
        reconcile routes without waiting for a SCSI command per path;
        ``confirm`` asks them after routing). The others are asked side by
        side: one round trip, not one after another.
        """
        identities = await self.system.path_identities([device for device, _ in mpath.slaves])
        if known is not None and known.wwid == mpath.wwid:
            known_source = mapsources.get(known.map_source)
            answered: dict[tuple[str, str, str | None], PathInfo] = {
                (p.device, p.dev, p.identity): p for p in known.paths if p.usable and p.identity}

            async def member_of(device: str, dev: str) -> PathInfo:
                earlier = answered.get((device, dev, identities.get(device)))
                if earlier is not None:
                    return dataclasses.replace(earlier, remembered=True)
                return await self._identify(known_source, mpath.wwid, device, dev, identities.get(device))

            infos = await asyncio.gather(*(member_of(device, dev) for device, dev in mpath.slaves))
            return Topology(mpath.wwid, mpath.name, mpath.device, mpath.size_sectors, tuple(infos),
                            mpath.map_size_sectors, known_source.name)
        found: dict[str, PathInfo] = {}
        source: mapsources.MapSource | None = None
        slaves = list(mpath.slaves)
        while slaves and source is None:
            device, dev = slaves.pop(0)
            try:
                scsi_path = self.system.open_path(device)
                inquiry = await read_inquiry(scsi_path)
                array = self._our_array(inquiry.vendor, inquiry.product)
                if array is None:
                    raise NotOurArrayError(f"{mpath.wwid}: {inquiry.vendor!r} {inquiry.product!r} "
                                           "matches no configured array")
                source = await mapsources.choose(array.map_source, scsi_path)
            except NotOurArrayError:
                raise
            except SwitchAgentError as exc:
                found[device] = _unusable(mpath.wwid, device, dev, exc)
                continue
            found[device] = await self._identify(source, mpath.wwid, device, dev, identities.get(device))
        if source is not None:
            # The rest side by side: one path after another cost seconds of a page move's convergence.
            for info in await asyncio.gather(*(self._identify(source, mpath.wwid, device, dev,
                                                              identities.get(device)) for device, dev in slaves)):
                found[info.device] = info
        paths = tuple(found[device] for device, _ in mpath.slaves if device in found)
        return Topology(mpath.wwid, mpath.name, mpath.device, mpath.size_sectors, paths,
                        mpath.map_size_sectors, source.name if source else "page-map")

    async def confirm(self, topology: Topology) -> Topology:
        """`topology` with every remembered path asked again which member it lands on (side by side)."""
        source = mapsources.get(topology.map_source)
        remembered = [p.device for p in topology.paths if p.remembered]
        if not remembered:
            return topology
        identities = await self.system.path_identities(remembered)

        async def asked(path: PathInfo) -> PathInfo:
            if not path.remembered:
                return path
            return await self._identify(source, topology.wwid, path.device, path.dev, identities.get(path.device))

        return dataclasses.replace(topology, paths=tuple(await asyncio.gather(*map(asked, topology.paths))))

    async def with_disks(self, topology: Topology, devices: list[str]) -> Topology:
        """`topology` (discovered moments ago) with those of `devices` it lacks that are paths of its
        LUN (its wwid and size): only they are asked which member they land on. For a joining
        member's new disks, waited for: multipathd's map is not read again for them."""
        had = {p.device for p in topology.paths}
        described = await asyncio.gather(*(self.system.describe_path(d) for d in devices if d not in had))
        new = [p for p in described
               if p is not None and p.wwid == topology.wwid and p.size_sectors == topology.size_sectors]
        if not new:
            return topology
        source = mapsources.get(topology.map_source)
        identities = await self.system.path_identities([p.device for p in new])
        found = await asyncio.gather(*(self._identify(source, topology.wwid, p.device, p.dev, identities.get(p.device))
                                       for p in new))
        return dataclasses.replace(topology, paths=topology.paths + tuple(found))

    async def _identify(self, source: mapsources.MapSource, wwid: str, device: str, dev: str,
                        identity: str | None) -> PathInfo:
        try:
            member_id, member_name = await source.identify(self.system.open_path(device))
        except SwitchAgentError as exc:
            return _unusable(wwid, device, dev, exc)
        return PathInfo(device, dev, member_id, member_name, identity=identity)

    def _our_array(self, vendor: str, product: str) -> ArrayMatch | None:
        return next((a for a in self.config.arrays if vendor.strip() == a.vendor and product.strip() == a.product),
                    None)

    async def fetch_map(self, topology: Topology, current: PageMap | None = None) -> PageMap:
        """Fetch through the first usable path; fall back to the next on a transport error.

        With `current` (the map routed now), only what changed since its
        generation is asked first where the array offers that; any trouble
        with that short form falls back to the whole map.
        """
        last: SwitchAgentError | None = None
        source = mapsources.get(topology.map_source)
        for path in topology.paths:
            if not path.usable:
                continue
            try:
                # The array is a peer: a fetch that never ends must not hold the LUN and a build slot.
                async with asyncio.timeout(self.config.fetch_timeout_s):
                    scsi_path = self.system.open_path(path.device)
                    if current is not None:
                        updated = await source.fetch_changes(scsi_path, current)
                        if updated is not None:
                            return updated
                    return await source.fetch(scsi_path, restarts=self.config.fetch_restarts)
            except TimeoutError:
                raise FetchTimeoutError(topology.wwid, self.config.fetch_timeout_s) from None
            except SwitchAgentError as exc:
                LOG.warning("%s: page map fetch over %s failed: %s", topology.wwid, path.device, exc,
                            extra=logfields.member(path.member_name))
                last = exc
                # A map that failed to decode is the array's answer, not the path's: don't retry it elsewhere.
                if isinstance(exc, DecodeError):
                    raise
        raise last or PlanError(topology.wwid, "no usable path to fetch the page map")

    async def map_now(self, topology: Topology, page_map: PageMap) -> PageMap:
        """The map's changes since `page_map` over the first usable path, where the array offers that
        cheaply; else, or on any trouble, or when the size moved (the next reconcile sees to that),
        `page_map` itself (no other path is tried: this is a second look, not the fetch)."""
        path = next((p for p in topology.paths if p.usable), None)
        if path is None:
            return page_map
        source = mapsources.get(topology.map_source)
        try:
            async with asyncio.timeout(self.config.fetch_timeout_s):
                updated = await source.fetch_changes(self.system.open_path(path.device), page_map)
        except (TimeoutError, SwitchAgentError) as exc:
            LOG.info("%s: map not checked again after the join: %s", topology.wwid, exc or "timed out")
            return page_map
        if updated is None or updated.total_pages != page_map.total_pages:
            return page_map
        if updated.generation != page_map.generation:
            LOG.info("%s: generation %d while members joined; routing it", topology.wwid, updated.generation)
        return updated

    async def rescan_paths(self, devices: list[str], wwid: str = "-") -> None:
        """Make the kernel re-read each path's capacity (it does not on CAPACITY DATA HAS CHANGED).

        Side by side: each rescan is a round of SCSI commands. A path that
        fails is logged and left to the next reconcile.
        """
        results = await asyncio.gather(*(self.system.rescan_path(d) for d in devices), return_exceptions=True)
        for device, result in zip(devices, results):
            if isinstance(result, SwitchAgentError):
                LOG.warning("%s: rescan of %s failed: %s", wwid, device, result)
            elif isinstance(result, BaseException):
                raise result


def _unusable(wwid: str, device: str, dev: str, exc: SwitchAgentError) -> PathInfo:
    LOG.warning("%s: path %s unusable: %s", wwid, device, exc)
    return PathInfo(device, dev, None, usable=False, error=str(exc))
