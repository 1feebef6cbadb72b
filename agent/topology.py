"""What the host sees of one array LUN: its multipath map, its paths, and each path's member.

Plain data, filled in by agent.system (the kernel) and agent.discovery (the array).
"""

from __future__ import annotations

from dataclasses import dataclass


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


@dataclass(frozen=True)
class PathInfo:
    """One SCSI path (an sd device) of a LUN and the array member it lands on."""

    device: str
    """Kernel name, e.g. "sdb"."""
    dev: str
    """major:minor, as dm tables name it."""
    member_id: int | None
    """The member (VPD 0xC0) or target port group (VPD 0x83, referrals); None when the path did not answer."""
    member_name: str | None = None
    usable: bool = True
    error: str | None = None
    identity: str | None = None
    """What names the path's iSCSI session while it lives (``Sysfs.iscsi_path_identities``) when
    its member was asked; None: not iSCSI, or not running then."""
    remembered: bool = False
    """member_id is what the path answered over the same session before, not asked this time."""


@dataclass(frozen=True)
class Topology:
    """One LUN as discovered: multipathd's map and every path under it."""

    wwid: str
    mpath_name: str
    """dm name of multipathd's map (DM_UUID mpath-<wwid>)."""
    mpath_device: str
    """Kernel name of that map, e.g. "dm-0"."""
    size_sectors: int
    paths: tuple[PathInfo, ...]
    mpath_map_size_sectors: int | None = None
    """multipathd's map's own size (None: not known)."""
    map_source: str = "page-map"
    """The agent.mapsources plug-in that identified the paths and fetches the map."""

    def warnings(self) -> list[str]:
        """What an administrator should act on; routing works regardless."""
        found = []
        if self.mpath_map_size_sectors is not None and self.mpath_map_size_sectors != self.size_sectors:
            # multipathd then refuses paths that come back ("device size mismatch"), and the
            # agent, which finds paths through multipathd's map, does not see them either.
            found.append(f"multipathd's map {self.mpath_name} is {self.mpath_map_size_sectors} sectors, "
                         f"its paths {self.size_sectors}: run `multipathd resize map {self.mpath_name}`")
        return found

    def paths_of_member(self, member_id: int) -> tuple[PathInfo, ...]:
        """The paths that land on one member."""
        return tuple(p for p in self.paths if p.member_id == member_id)
