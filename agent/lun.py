"""What the daemon knows about each LUN: its state, what it found, and what the kernel holds for it."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field

import numpy as np

from agent.stack import StackPlan
from agent.topology import Topology
from protocol.pagemap import PageMap


class State(enum.StrEnum):
    """Where a LUN stands (what `status` shows first)."""

    DISCOVERING = "discovering"
    """Seen, not routed yet."""
    ADOPTING = "adopting"
    """Devices of an earlier daemon found at start; its first reconcile rebuilds them."""
    ROUTED = "routed"
    """The routed device serves I/O (a later failure keeps it so, with last_error set)."""
    ERROR = "error"
    """Never routed: last_error says why; retried with backoff."""
    SUSPENDED = "suspended"
    """A device of its stack could not be resumed: its I/O waits (last_error says which)."""
    NO_MULTIPATH = "no-multipath"
    """multipathd's map went away; the routed device stays until removed by hand."""


@dataclass
class RoutedStack:
    """What the kernel holds for a routed LUN, kept because dm-switch cannot report its map."""

    plan: StackPlan
    kernel_map: np.ndarray
    """Path number of every region as the live switch holds it; -1 where we do not know."""
    page_map: PageMap
    fetched_at: float


@dataclass(frozen=True)
class MemberSessionsState:
    """One member's iSCSI sessions, as the session keeper last planned them (agent.sessions.MemberSessions)."""

    member_id: int
    want: int
    logged_in: int
    failed: int
    not_ours: int
    misplaced: int
    last_error: str | None
    login_failures: int
    """Failed logins to it since the daemon started."""
    waiting: tuple[str, ...] = ()
    """What waits and why (backoff, host-cap, release ...)."""


@dataclass(frozen=True)
class SessionsState:
    """The sessions of the LUN's iSCSI target: managed (per member), or unmanaged and why."""

    target: str | None
    managed: bool
    unmanaged_reason: str | None = None
    members: tuple[MemberSessionsState, ...] = ()


@dataclass
class LunState:
    """Everything the daemon knows about one LUN; what `status` shows."""

    wwid: str
    state: State = State.DISCOVERING
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
    """Switches and legs an earlier daemon left (restart, kill -9), uuid -> kind: removed after the next build."""
    leg_events: dict[str, int] = field(default_factory=dict)
    """Each leg's dm event_nr when its status was last read (DM_LIST_DEVICES of that round)."""
    failed_legs: set[str] = field(default_factory=set)
    """Legs whose status showed a failed path the last time it was read."""
    reconciles: dict[str, int] = field(default_factory=dict)
    """Reconciles so far by result ("ok", "error"), for the metrics."""
    errors: dict[str, int] = field(default_factory=dict)
    """Failed reconciles so far by error type (e.g. "ScsiCommandError"), for the metrics."""
    map_confirmed_at: float | None = None
    """When the array last confirmed the routed map current: fetched, or its generation polled unchanged."""
    moved_pages: np.ndarray | None = None
    """Pages whose owning member changed in the last new generation (`moved_since` -> the routed one)."""
    moved_since: int | None = None
    """The generation before the last new one; None before a second generation was seen."""
    sessions: SessionsState | None = None
    """Its target's sessions (agent.session_keeper); None before the keeper looked."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)


def pages_moved(old: PageMap, new: PageMap) -> np.ndarray:
    """The pages (of those both maps cover) whose owning member differs, ascending.

    Compared by member id, not by index into `members`: the indexes shift
    when a member joins or leaves.
    """
    count = min(old.total_pages, new.total_pages)
    if old.members == new.members:  # the usual case: same indexes, no translation needed
        return np.flatnonzero(old.owners[:count] != new.owners[:count]).astype(np.uint32)

    def member_ids(page_map: PageMap) -> np.ndarray:
        # Index -1 (UNALLOCATED) picks the table's last entry, -1: no member.
        table = np.array([m.member_id for m in page_map.members] + [-1], dtype=np.int64)
        ids: np.ndarray = table[page_map.owners[:count]]
        return ids

    return np.flatnonzero(member_ids(old) != member_ids(new)).astype(np.uint32)
