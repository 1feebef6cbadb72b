"""What the daemon tells an administrator: each LUN's status, and where a byte offset is served.

Typed records built from a LunState; the control socket carries them as
JSON (`to_json`), the CLI reads them back (`from_json`) and renders them,
and `--json` prints that JSON as it is.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable

from agent.config import Config
from agent.discovery import LunNotFoundError
from agent.lun import LunState, MemberSessionsState, SessionsState
from agent.stack import top_name_for
from protocol.pagemap import UNALLOCATED


@dataclass(frozen=True)
class PathStatus:
    """One path of a member as the routed LUN uses it."""

    device: str
    state: str
    """"active" or "failed" (did not answer discovery)."""
    dev: str = ""
    """major:minor."""


@dataclass(frozen=True)
class MemberStatus:
    """One array member of a routed LUN: its pages, its leg, its paths."""

    member_id: int
    name: str
    pages: int
    leg: str = ""
    paths: tuple[PathStatus, ...] = ()


@dataclass(frozen=True)
class LunStatus:
    """One LUN's status record (what `status --json` prints)."""

    wwid: str
    state: str
    device: str | None = None
    """The routed device's path, once routed."""
    members: tuple[MemberStatus, ...] = ()
    generation: int | None = None
    map_age_s: float | None = None
    last_error: str | None = None
    epoch: int | None = None
    messages_sent: int = 0
    message_bytes_sent: int = 0
    last_reconcile: dict[str, float] = dataclasses.field(default_factory=dict)
    multipath: str | None = None
    warnings: tuple[str, ...] = ()
    map_source: str | None = None
    page_size_bytes: int | None = None
    pages: int | None = None
    unallocated_pages: int | None = None
    sessions: SessionsState | None = None
    """The iSCSI sessions of its target: per member have/want, or unmanaged and why."""

    def to_json(self) -> dict[str, Any]:
        plain: dict[str, Any] = _plain(dataclasses.asdict(self))
        return plain

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LunStatus:
        """Read back what to_json wrote (unknown keys, e.g. from a newer daemon, are ignored)."""
        values = _known(cls, data)
        sessions = data.get("sessions")
        values["sessions"] = None if not isinstance(sessions, dict) else SessionsState(**{
            **_known(SessionsState, sessions),
            "members": tuple(MemberSessionsState(**{**_known(MemberSessionsState, m),
                                                    "waiting": tuple(m.get("waiting") or ())})
                             for m in sessions.get("members") or ())})
        values["members"] = tuple(
            MemberStatus(**{**_known(MemberStatus, m), "paths": tuple(PathStatus(**_known(PathStatus, p))
                                                                      for p in m.get("paths", ()))})
            for m in data.get("members", ()))
        values["warnings"] = tuple(data.get("warnings") or ())
        return cls(**values)


@dataclass(frozen=True)
class Location:
    """Which member owns the page at a byte offset, and which paths the switch sends it to."""

    wwid: str
    offset: int
    page: int
    member_id: int | None
    member: str | None
    """None: an unallocated page (any path serves it)."""
    leg: str | None
    paths: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        plain: dict[str, Any] = _plain(dataclasses.asdict(self))
        return plain

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Location:
        return cls(**{**_known(cls, data), "paths": tuple(data.get("paths", ()))})


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """The keys of `data` that are fields of `cls`: a newer daemon may send more."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def _plain(value: Any) -> Any:
    """JSON's own shapes: tuples become lists (what the other side reads back)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def find_lun(luns: Iterable[LunState], config: Config, ref: str) -> LunState:
    """A LUN by wwid, multipath map name, routed device name, or /dev path."""
    luns = list(luns)
    ref = ref.removeprefix("/dev/mapper/").removeprefix("/dev/")
    # A routed device's own name first: after a multipath alias swap the template would name another LUN's.
    for lun in luns:
        if lun.stack and ref == lun.stack.plan.top_name:
            return lun
    for lun in luns:
        names = {lun.wwid}
        if lun.topology:
            names |= {lun.topology.mpath_name, lun.topology.mpath_device}
            if not lun.stack:
                names.add(top_name_for(config, lun.topology))
        if ref in names:
            return lun
    raise LunNotFoundError(f"{ref}: no such array LUN (try `switch-agent status`)")


def lun_status(lun: LunState, config: Config, now: float) -> LunStatus:
    """The status record of one LUN."""
    topology, stack = lun.topology, lun.stack
    warnings: list[str] = []
    if topology:
        warnings += topology.warnings()
        wanted = top_name_for(config, topology)
        if stack and stack.plan.top_name != wanted:
            warnings.append(f"the routed device keeps its name {stack.plan.top_name}; device_name now gives "
                            f"{wanted} (the multipath alias changed?): it is renamed only when rebuilt after "
                            "removal by hand")
    record = LunStatus(lun.wwid, lun.state, last_error=lun.last_error, epoch=lun.epoch if stack else None,
                       messages_sent=lun.messages_sent, message_bytes_sent=lun.message_bytes_sent,
                       last_reconcile=dict(lun.last_reconcile),
                       multipath=topology.mpath_name if topology else None, warnings=tuple(warnings),
                       map_source=topology.map_source if topology else None, sessions=lun.sessions)
    if stack is None:
        return record
    page_map = stack.page_map
    pages = page_map.pages_per_member()
    members = []
    for k, member in enumerate(page_map.members):
        paths = topology.paths_of_member(member.member_id) if topology else ()
        members.append(MemberStatus(member.member_id, member.name, pages[member.member_id], stack.plan.legs[k].name,
                                    tuple(PathStatus(p.device, "active" if p.usable else "failed", p.dev)
                                          for p in paths)))
    return dataclasses.replace(
        record, device=f"/dev/mapper/{stack.plan.top_name}", members=tuple(members), generation=page_map.generation,
        map_age_s=round(now - stack.fetched_at, 1), page_size_bytes=page_map.page_size_sectors * 512,
        pages=page_map.total_pages, unallocated_pages=int((page_map.owners == UNALLOCATED).sum()))


def locate(lun: LunState, byte_offset: int) -> Location:
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
    return Location(lun.wwid, byte_offset, page, owner.member_id if owner else None, owner.name if owner else None,
                    leg.name if leg else None, tuple(by_dev.get(d, d) for d in preferred))
