"""The emulated array's state: one volume, its members, its page map, counters and unit attentions.

Transport-free: the logical-unit core (tests/array/lu.py) reads it to
answer commands, the control server changes it. Members are known by a
stable *number* k (backstore m<k>, TPG tag k+1, portal 127.0.0.(k+1),
member id k+1); the page map's entries are *indexes* into the current
member list, ordered by number, so removing a member shifts indexes but
never numbers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

import ipaddress

from protocol.pagemap import UNALLOCATED, Member
from protocol.portals import MemberPortals, MemberPortalsPage, Portal
from tests.array import layouts
from tests.array.errors import ArrayStateError

BLOCK_BYTES = 512
"""Logical block size the array reports (sectors, as docs/protocol.md counts)."""
ISCSI_PORT = 3260
"""Every member's portal listens here (tests/array/lio.py PORT)."""

ASC_CAPACITY_DATA_HAS_CHANGED = (0x2A, 0x09)
ASC_INQUIRY_DATA_HAS_CHANGED = (0x3F, 0x03)

CORRUPTION_KINDS = ("bad-crc", "truncated", "entry-out-of-range", "generation-churn")


@dataclass
class Counters:
    """I/O a member received, split by whether it owns the pages ("direct") or not ("forwarded")."""

    direct_bytes: int = 0
    forwarded_bytes: int = 0
    direct_cmds: int = 0
    forwarded_cmds: int = 0
    last_forwarded_at: float = 0.0
    """time.monotonic() of the latest forwarded command (the host's clock, shared by every process)."""
    forwarded_write_cmds: int = 0
    """Forwarded writes: nothing on the host writes to a path on its own (udev's probes read), so
    these came through a routed or multipath device."""
    last_forwarded_write_at: float = 0.0

    def as_dict(self) -> dict[str, int | float]:
        """Plain dict for JSON."""
        return dict(self.__dict__)


@dataclass
class ArrayMember:
    """One member: its stable number, identity, counters and pending unit attentions."""

    number: int
    counters: Counters = field(default_factory=Counters)
    pending_ua: list[tuple[int, int]] = field(default_factory=list)

    @property
    def member_id(self) -> int:
        """Id in VPD 0xC0, the page map's member table and VPD 0x83's target port group (16 bits)."""
        return self.number + 1

    @property
    def name(self) -> str:
        """Member name (also the LIO backstore name)."""
        return f"m{self.number}"

    @property
    def relative_port(self) -> int:
        """Relative target port identifier, unique per portal."""
        return self.number + 1

    @property
    def portal_ip(self) -> str:
        """The member's own loopback portal address."""
        return f"127.0.0.{self.number + 1}"

    @property
    def tpg_tag(self) -> int:
        """The iSCSI portal group tag of the member's TPG (tests/array/lio.py)."""
        return self.number + 1

    def portals(self) -> MemberPortals:
        """VPD 0xC1's record: target port group = member id, one portal."""
        return MemberPortals(self.member_id, self.member_id, (Portal(
            ipaddress.IPv4Address(self.portal_ip), ISCSI_PORT, self.tpg_tag, self.relative_port),))


@dataclass
class PendingCorruption:
    """How the next GET PAGE MAP responses are to be damaged, and how many are left."""

    kind: str
    remaining: int


class ArrayVolume:
    """One volume on a scale-out array: geometry, page owners, members, generation."""

    def __init__(self, *, size_bytes: int, page_size_bytes: int, members: int,
                 layout: str = "striped", seed: int = 0) -> None:
        _check_geometry(size_bytes, page_size_bytes)
        if not 1 <= members <= 254:
            raise ArrayStateError(f"member count must be 1..254, got {members}")
        self.size_bytes = size_bytes
        self.page_size_bytes = page_size_bytes
        self.layout = layout
        self.rng = np.random.default_rng(seed)
        self.members = [ArrayMember(k) for k in range(members)]
        self.owners = layouts.build(layout, self.total_pages, members, self.rng)
        self.generation = 1
        self.changes = ChangeLog(self.generation)
        """What each recent generation changed: GET PAGE MAP's changes-since answers come from it."""
        self.answers_changes = True
        """Whether VPD 0xC0 offers the changes-since form (False: behave as a 1.1 array)."""
        self.change_times: list[float] = []
        """time.monotonic() of the latest (up to 32) changes that raised a unit attention (the host's
        clock, like the counters' times): what tests measure the host's reaction from."""
        self.corruption: PendingCorruption | None = None
        # Removed members whose ports still drain (logout in progress): they
        # keep answering, own nothing, and are forgotten once their port is gone.
        self.retired: dict[int, ArrayMember] = {}
        self._next_number = members

    # -- geometry --------------------------------------------------------------

    @property
    def total_pages(self) -> int:
        """Pages in the volume; the last may be partial."""
        return -(-self.size_bytes // self.page_size_bytes)

    @property
    def total_blocks(self) -> int:
        """Logical blocks in the volume."""
        return self.size_bytes // BLOCK_BYTES

    @property
    def page_size_sectors(self) -> int:
        """Page size in 512-byte sectors, as the page map carries it."""
        return self.page_size_bytes // BLOCK_BYTES

    # -- members -----------------------------------------------------------------

    def member(self, number: int) -> ArrayMember:
        """The member with stable number `number` (live or retired)."""
        # Hot path (every command): a linear scan of a handful of members is
        # cheaper than keeping an index in step with add/remove.
        for member in self.members:
            if member.number == number:
                return member
        if number in self.retired:
            return self.retired[number]
        raise ArrayStateError(f"no member m{number} (have {', '.join(m.name for m in self.members)})")

    def index_of(self, number: int) -> int:
        """The page-map index of live member `number`."""
        member = self.member(number)
        if member.number in self.retired:
            raise ArrayStateError(f"member m{number} has been removed")
        return self.members.index(member)

    def _owner_index(self, number: int) -> int:
        """The index owners[] uses for member `number`; a retired member matches no page."""
        return -2 if number in self.retired else self.index_of(number)

    def page_map_members(self) -> list[Member]:
        """The member table of GET PAGE MAP, in index order."""
        return [Member(m.member_id, m.name) for m in self.members]

    def member_portals(self) -> MemberPortalsPage:
        """VPD 0xC1: every live member's portals (a retired one is leaving: not listed)."""
        return MemberPortalsPage(self.generation, tuple(m.portals() for m in self.members))

    def owner_of_offset(self, offset: int) -> ArrayMember | None:
        """The member owning the page holding byte `offset`, None when unallocated."""
        if not 0 <= offset < self.size_bytes:
            raise ArrayStateError(f"offset {offset} is outside the {self.size_bytes}-byte volume")
        index = int(self.owners[offset // self.page_size_bytes])
        return None if index == UNALLOCATED else self.members[index]

    # -- I/O accounting -------------------------------------------------------

    def account(self, number: int, offset: int, length: int, *, write: bool = False) -> None:
        """Count an I/O of `length` bytes at `offset` received by member `number`, per page portion.

        An unallocated page counts as direct: any member may serve it.
        """
        if length <= 0:
            return
        counters = self.member(number).counters
        index = self._owner_index(number)
        page = self.page_size_bytes
        first, last = offset // page, (offset + length - 1) // page
        if first == last:
            owner = self.owners.item(first)
            self._add(counters, owner in (index, UNALLOCATED), 1, length, write)
            return
        pages = np.arange(first, last + 1, dtype=np.int64)
        starts = np.maximum(pages * page, offset)
        ends = np.minimum((pages + 1) * page, offset + length)
        owners = self.owners[first : last + 1]
        direct = (owners == index) | (owners == UNALLOCATED)
        portions = ends - starts
        self._add(counters, True, int(direct.sum()), int(portions[direct].sum()), write)
        self._add(counters, False, int((~direct).sum()), int(portions[~direct].sum()), write)

    @staticmethod
    def _add(counters: Counters, direct: bool, cmds: int, nbytes: int, write: bool) -> None:
        if direct:
            counters.direct_cmds += cmds
            counters.direct_bytes += nbytes
        elif cmds:
            counters.forwarded_cmds += cmds
            counters.forwarded_bytes += nbytes
            counters.last_forwarded_at = time.monotonic()
            if write:
                counters.forwarded_write_cmds += cmds
                counters.last_forwarded_write_at = counters.last_forwarded_at

    def reset_counters(self) -> None:
        """Zero every member's counters."""
        for member in self.members:
            member.counters = Counters()

    # -- unit attentions ---------------------------------------------------------

    def raise_unit_attention(self, asc_ascq: tuple[int, int]) -> None:
        """Queue a unit attention for every member's next command (once each)."""
        for member in self.members:
            if asc_ascq not in member.pending_ua:
                member.pending_ua.append(asc_ascq)

    def take_unit_attention(self, number: int) -> tuple[int, int] | None:
        """Pop member `number`'s oldest pending unit attention, if any."""
        pending = self.member(number).pending_ua
        return pending.pop(0) if pending else None

    # -- changes (each makes a new generation) ------------------------------------

    def move_pages(self, fraction: float, *, to: int | None = None) -> int:
        """Reassign round(fraction * pages) pages to other members, or all of them to live member
        number `to`; return how many moved."""
        before = self.owners
        if to is None:
            self.owners, count = layouts.moved(self.owners, fraction, len(self.members), self.rng)
        else:
            self.owners, count = layouts.moved_to(self.owners, fraction, self.index_of(to),
                                                  len(self.members), self.rng)
        self._changed(ASC_INQUIRY_DATA_HAS_CHANGED, before)
        return count

    def resize(self, size_bytes: int) -> None:
        """Grow or shrink the volume; new pages follow the layout."""
        _check_geometry(size_bytes, self.page_size_bytes)
        self.size_bytes = size_bytes
        self.owners = layouts.resized(self.owners, self.total_pages, self.layout,
                                      len(self.members), self.rng)
        self._changed(ASC_CAPACITY_DATA_HAS_CHANGED)

    def add_member(self, *, take_pages: bool = True) -> ArrayMember:
        """A new member (the next unused number) that takes about 1/(M+1) of the pages.

        take_pages=False: it joins owning none (VPD 0xC1 and the page map's member table list it),
        as an EqualLogic member does before the pool rebalances onto it (move_pages(to=)).
        """
        if len(self.members) >= 254:
            raise ArrayStateError("the array already has 254 members")
        member = ArrayMember(self._next_number)
        self._next_number += 1
        if take_pages:
            self.owners = layouts.with_member_added(self.owners, len(self.members), self.rng)
        self.members.append(member)
        self._changed(ASC_INQUIRY_DATA_HAS_CHANGED)
        return member

    def remove_member(self, number: int) -> ArrayMember:
        """Take member `number` out of the map (its pages go to the others); it is retired, not gone.

        Its port keeps answering while the initiator logs out; call
        forget_member once the port is deleted.
        """
        index = self.index_of(number)
        self.owners = layouts.with_member_removed(self.owners, index, len(self.members), self.rng)
        member = self.members.pop(index)
        member.pending_ua.clear()
        self.retired[number] = member
        self._changed(ASC_INQUIRY_DATA_HAS_CHANGED)
        return member

    def forget_member(self, number: int) -> None:
        """Drop a retired member for good."""
        self.retired.pop(number, None)

    def bump_generation(self) -> None:
        """A new generation with no page moved (generation churn); no unit attention."""
        self.generation += 1
        self.changes.record(self.generation, self.owners, self.owners)

    def _changed(self, asc_ascq: tuple[int, int], before: np.ndarray | None = None) -> None:
        """A new generation; `before`: the owners it changed, when only owners changed (else the
        change log starts over: a new size or member set is only described by a whole map)."""
        self.generation += 1
        if before is None:
            self.changes.restart(self.generation)
        else:
            self.changes.record(self.generation, before, self.owners)
        self.change_times = [*self.change_times[-31:], time.monotonic()]
        self.raise_unit_attention(asc_ascq)

    # -- fault injection ------------------------------------------------------------

    def corrupt_next_map(self, kind: str, count: int = 1) -> None:
        """Damage the next `count` GET PAGE MAP responses in the way `kind` names."""
        if kind not in CORRUPTION_KINDS:
            raise ArrayStateError(f"unknown corruption {kind!r}; choose one of {', '.join(CORRUPTION_KINDS)}")
        if count < 1:
            raise ArrayStateError(f"count must be at least 1, got {count}")
        self.corruption = PendingCorruption(kind, count)

    def take_corruption(self, *, has_entries: bool) -> str | None:
        """The corruption to apply to the response being built, consuming one use.

        entry-out-of-range needs entries to damage, so a header-only poll
        leaves it pending for the next response that carries entries.
        """
        pending = self.corruption
        if pending is None or (pending.kind == "entry-out-of-range" and not has_entries):
            return None
        pending.remaining -= 1
        if pending.remaining == 0:
            self.corruption = None
        return pending.kind

    # -- reporting --------------------------------------------------------------------

    def describe(self) -> dict[str, object]:
        """Geometry, generation and members for `info`."""
        counts = np.bincount(self.owners[self.owners >= 0].astype(np.int64), minlength=len(self.members))
        return {
            "size_bytes": self.size_bytes,
            "page_size_bytes": self.page_size_bytes,
            "total_pages": self.total_pages,
            "layout": self.layout,
            "generation": self.generation,
            "change_times": list(self.change_times),
            "members": [
                {"number": m.number, "member_id": m.member_id, "name": m.name,
                 "portal": f"{m.portal_ip}:{ISCSI_PORT}", "tpg_tag": m.tpg_tag,
                 "pages": int(counts[i])}
                for i, m in enumerate(self.members)
            ],
        }


class ChangeLog:
    """The pages each recent generation moved, bounded: the last MAX_GENERATIONS generations,
    at most MAX_PAGES pages in all; older ones are dropped (a host asking about them is "too old")."""

    MAX_GENERATIONS = 64
    MAX_PAGES = 1 << 20

    def __init__(self, generation: int) -> None:
        self.oldest = generation
        """The oldest generation changes are known from."""
        self.steps: list[tuple[int, np.ndarray, np.ndarray]] = []
        """(generation, pages, their owners from then on), oldest first."""
        self.reshaped_at: int | None = None
        """The generation of the last change of size or members (a host older than it is told so)."""

    def restart(self, generation: int) -> None:
        """A change only a whole map describes: nothing before `generation` can be answered."""
        self.steps.clear()
        self.oldest = self.reshaped_at = generation

    def record(self, generation: int, before: np.ndarray, after: np.ndarray) -> None:
        """Generation `generation` turned `before` into `after` (same size)."""
        pages = np.flatnonzero(before != after)
        self.steps.append((generation, pages, after[pages].copy()))
        while len(self.steps) > self.MAX_GENERATIONS or sum(p.size for _, p, _ in self.steps) > self.MAX_PAGES:
            self.oldest = self.steps.pop(0)[0]

    def since(self, key: int) -> tuple[int, list[tuple[int, np.ndarray, np.ndarray]]] | str:
        """(the generation whose low 32 bits are `key`, the steps after it), or why there are none."""
        known = [self.oldest, *(generation for generation, _, _ in self.steps)]
        for index, generation in enumerate(known):
            if generation & 0xFFFF_FFFF == key:
                return generation, self.steps[index:]
        if self.reshaped_at is not None and key & 0xFFFF_FFFF < self.reshaped_at & 0xFFFF_FFFF:
            return "reshaped"
        return "too old"


def _check_geometry(size_bytes: int, page_size_bytes: int) -> None:
    if page_size_bytes <= 0 or page_size_bytes % BLOCK_BYTES:
        raise ArrayStateError(f"page size must be a positive multiple of {BLOCK_BYTES}, got {page_size_bytes}")
    if size_bytes <= 0 or size_bytes % BLOCK_BYTES:
        raise ArrayStateError(f"volume size must be a positive multiple of {BLOCK_BYTES}, got {size_bytes}")
    if -(-size_bytes // page_size_bytes) >= 1 << 32:
        raise ArrayStateError("more pages than GET PAGE MAP's 32-bit starting page can address")
