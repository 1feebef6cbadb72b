"""GET PAGE MAP's "changes since generation G" form (docs/protocol.md section 8, version 1.2), both sides.

A host that holds a map of generation G asks for only what changed since;
the array answers runs of (first page, length, owner) with the generation
they lead to, or says the host must fetch the whole map (G too old, the
volume reshaped, the answer too large). Chunks follow generations: each
answer leads from one generation to a later one, and the host asks again
from there until it reaches the array's current generation.

Every byte from the array is untrusted, as in protocol.pagemap: each check
fails with a typed DecodeError (the agent then fetches the whole map), and
nothing here allocates more than the map the host already holds.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from crc32c import crc32c

from protocol.errors import (
    BadMagicError,
    ChangesUnavailableError,
    ChecksumError,
    ChunkOverlapError,
    EncodeError,
    GenerationChangedError,
    TruncatedError,
    ValueRangeError,
)
from protocol.pagemap import (
    GET_PAGE_MAP_CDB_LEN,
    GET_PAGE_MAP_OPCODE,
    HEADER_FIXED_BYTES,
    MAX_ALLOCATION_LENGTH,
    MAX_MEMBERS,
    MAX_PAGES,
    MEMBER_RECORD_BYTES,
    TRAILER_BYTES,
    UNALLOCATED,
    Member,
    PageMap,
    _decode_member,
    _encode_member,
    owners_dtype,
)

SERVICE_ACTION_CHANGES_SINCE = 0x01
"""GET PAGE MAP CDB byte 1: 0 asks the whole map (1.0), 1 the changes since a generation (1.2)."""
FEATURE_CHANGES_SINCE = 0x01
"""VPD 0xC0 byte 9 (FEATURES) bit 0: the array answers the changes-since form."""

MAGIC = b"SAPC"
FORMAT_VERSION = 1
RUN_BYTES = 8
MAX_RUN_PAGES = (1 << 24) - 1
"""A run's length is 24 bits: a longer run of one owner is sent as several."""
RUN_UNALLOCATED = 0xFF
MAX_CHUNKS = 8
"""Answers one fetch of changes may take before the host gives up and fetches the whole map: each
answer moves the host to a later generation, so only an array changing as fast as it is asked, or
trickling, needs more."""
GENERATION_KEY_MASK = 0xFFFF_FFFF
"""The CDB carries G's low 32 bits; the answer carries G whole, and the host checks it."""

# Laid out as GET PAGE MAP's header wherever a field means the same (the generation the data
# describes at 8, response length at 44, header CRC at 60): magic, version, status, member count,
# flags, to generation, page size, header length, reserved, total pages, from generation,
# run count, response length, current generation, reserved, header CRC
_HEADER = struct.Struct(">4sBBBBQIHHQQIIQII")
assert _HEADER.size == HEADER_FIXED_BYTES
_CDB = struct.Struct(">BBI3sB")
_RUN = np.dtype([("first", ">u4"), ("length_owner", ">u4")])
_CODEC = "GET PAGE MAP changes"


class ChangesStatus(enum.IntEnum):
    """What a changes answer says (byte 5)."""

    CHANGES = 0
    """Runs follow: the changes from FROM GENERATION to TO GENERATION."""
    TOO_OLD = 1
    """The array no longer knows (or never knew) the generation asked about."""
    RESHAPED = 2
    """The volume's size, page size or member set changed since: only a whole map describes it."""
    TOO_LARGE = 3
    """Not even the first generation's changes fit the allocation length."""


@dataclass(frozen=True)
class ChangesSinceCdb:
    """The decoded fields of a GET PAGE MAP CDB of the changes-since form."""

    since_key: int
    """The low 32 bits of the host's generation."""
    allocation_length: int


@dataclass(frozen=True)
class ChangesHeader:
    """The header of one changes answer."""

    status: ChangesStatus
    from_generation: int
    to_generation: int
    current_generation: int
    total_pages: int
    page_size_sectors: int
    run_count: int
    header_length: int
    response_length: int
    members: tuple[Member, ...]


@dataclass(frozen=True)
class ChangesChunk:
    """One decoded answer: its header and its runs (ascending, disjoint, within the volume)."""

    header: ChangesHeader
    first: np.ndarray
    """First page of each run (int64)."""
    length: np.ndarray
    """Pages in each run (int64, >= 1)."""
    owner: np.ndarray
    """Owner index of each run, UNALLOCATED for -1 (int16)."""


# -- CDB ----------------------------------------------------------------------

def build_changes_since_cdb(since_generation: int, allocation_length: int) -> bytes:
    """The 10-byte GET PAGE MAP CDB asking what changed since `since_generation`."""
    if not 0 <= since_generation < 1 << 64:
        raise EncodeError(f"generation must fit in 64 bits, got {since_generation}")
    if not 0 <= allocation_length <= MAX_ALLOCATION_LENGTH:
        raise EncodeError(f"allocation length must be 0..{MAX_ALLOCATION_LENGTH}, got {allocation_length}")
    return _CDB.pack(GET_PAGE_MAP_OPCODE, SERVICE_ACTION_CHANGES_SINCE, since_generation & GENERATION_KEY_MASK,
                     allocation_length.to_bytes(3, "big"), 0)


def is_changes_since_cdb(cdb: bytes) -> bool:
    """Array side: whether a GET PAGE MAP CDB asks for changes (byte 1 is the service action)."""
    return len(cdb) >= 2 and cdb[0] == GET_PAGE_MAP_OPCODE and cdb[1] == SERVICE_ACTION_CHANGES_SINCE


def parse_changes_since_cdb(cdb: bytes) -> ChangesSinceCdb:
    """Array side: decode a changes-since CDB."""
    if len(cdb) < GET_PAGE_MAP_CDB_LEN:
        raise TruncatedError(_CODEC, "CDB length", GET_PAGE_MAP_CDB_LEN, len(cdb))
    opcode, action, key, alloc, _control = _CDB.unpack_from(cdb)
    if opcode != GET_PAGE_MAP_OPCODE:
        raise BadMagicError(_CODEC, "operation code", hex(GET_PAGE_MAP_OPCODE), hex(opcode))
    if action != SERVICE_ACTION_CHANGES_SINCE:
        raise ValueRangeError(_CODEC, "CDB byte 1 (service action)", SERVICE_ACTION_CHANGES_SINCE, action)
    return ChangesSinceCdb(key, int.from_bytes(alloc, "big"))


# -- runs ---------------------------------------------------------------------

def runs_of(pages: np.ndarray, owners: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first, length, owner) of the runs that carry `owners` at ascending, distinct `pages`.

    A run is consecutive pages with one owner, at most MAX_RUN_PAGES long.
    """
    pages = np.asarray(pages, dtype=np.int64)
    owners = np.asarray(owners, dtype=np.int64)
    if pages.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    if pages.shape != owners.shape or pages.ndim != 1:
        raise EncodeError("pages and owners must be 1-D arrays of one length")
    if pages.size > 1 and bool((np.diff(pages) <= 0).any()):
        raise EncodeError("pages must be ascending and distinct")
    starts = np.flatnonzero(np.concatenate(([True], (np.diff(pages) != 1) | (np.diff(owners) != 0))))
    lengths = np.diff(np.append(starts, pages.size))
    first, length, owner = pages[starts], lengths, owners[starts]
    if int(length.max()) > MAX_RUN_PAGES:
        pieces = -(-length // MAX_RUN_PAGES)
        index = np.repeat(np.arange(length.size), pieces)
        within = np.arange(index.size) - np.repeat(np.cumsum(pieces) - pieces, pieces)
        first = first[index] + within * MAX_RUN_PAGES
        length = np.minimum(length[index] - within * MAX_RUN_PAGES, MAX_RUN_PAGES)
        owner = owner[index]
    return first, length, owner


def _generations_ok(from_generation: int, to_generation: int, current: int, runs: int) -> bool:
    """Each answer moves the host on, and never past the array's present; "nothing since" is the one
    answer that stays where it is."""
    if from_generation == to_generation == current:
        return runs == 0
    return from_generation < to_generation <= current


def response_length(member_count: int, run_count: int) -> int:
    """Bytes of a changes answer with `run_count` runs."""
    return HEADER_FIXED_BYTES + MEMBER_RECORD_BYTES * member_count + RUN_BYTES * run_count + TRAILER_BYTES


# -- the answer (array side) -----------------------------------------------------

def encode_changes_response(
    *,
    status: ChangesStatus,
    current_generation: int,
    total_pages: int,
    page_size_sectors: int,
    members: Sequence[Member],
    allocation_length: int,
    from_generation: int = 0,
    to_generation: int = 0,
    pages: np.ndarray | None = None,
    owners: np.ndarray | None = None,
) -> bytes:
    """Array side: a changes answer; `pages` (ascending) took `owners` between the two generations.

    Cut to the allocation length as SCSI truncates; the array chooses how
    many generations to merge so that the answer fits (response_length).
    """
    if not 1 <= len(members) <= MAX_MEMBERS:
        raise EncodeError(f"member count must be 1..{MAX_MEMBERS}, got {len(members)}")
    if len({m.member_id for m in members}) != len(members) or len({m.name for m in members}) != len(members):
        raise EncodeError("member ids and names must be unique")
    if status == ChangesStatus.CHANGES:
        if not _generations_ok(from_generation, to_generation, current_generation, 0 if pages is None else len(pages)):
            raise EncodeError(f"generations must rise: from {from_generation} to {to_generation}, "
                              f"current {current_generation}")
        first, length, owner = runs_of(np.zeros(0) if pages is None else pages,
                                       np.zeros(0) if owners is None else owners)
        if first.size and (int(first[0]) < 0 or int(first[-1] + length[-1]) > total_pages):
            raise EncodeError(f"a changed page is outside the volume's {total_pages} pages")
        if owner.size and (int(owner.max()) >= len(members) or int(owner.min()) < UNALLOCATED):
            raise EncodeError(f"an owner names no member (have {len(members)})")
    else:
        if pages is not None and len(pages):
            raise EncodeError(f"a {status.name} answer carries no runs")
        from_generation = to_generation = 0
        first = length = owner = np.zeros(0, dtype=np.int64)
    header_length = HEADER_FIXED_BYTES + MEMBER_RECORD_BYTES * len(members)
    total_length = response_length(len(members), first.size)
    fixed = _HEADER.pack(MAGIC, FORMAT_VERSION, int(status), len(members), 0, to_generation, page_size_sectors,
                         header_length, 0, total_pages, from_generation, first.size, total_length,
                         current_generation, 0, 0)
    fixed = fixed[:60] + struct.pack(">I", crc32c(fixed[:60]))
    runs = np.empty(first.size, dtype=_RUN)
    runs["first"] = first
    runs["length_owner"] = (length << 8) | np.where(owner < 0, RUN_UNALLOCATED, owner)
    body = fixed + b"".join(_encode_member(m) for m in members) + runs.tobytes()
    return (body + struct.pack(">I", crc32c(body)))[:allocation_length]


# -- the answer (host side) -------------------------------------------------------

def decode_changes_header(data: bytes | memoryview) -> ChangesHeader:
    """Decode and check the fixed header and the member table."""
    data = memoryview(data)
    if len(data) < HEADER_FIXED_BYTES:
        raise TruncatedError(_CODEC, "fixed header", f">= {HEADER_FIXED_BYTES} bytes", len(data))
    (magic, version, status, member_count, flags, to_gen, page_size, header_length, reserved16, total, from_gen,
     run_count, length, current, reserved32, header_crc) = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise BadMagicError(_CODEC, "magic", MAGIC, bytes(magic))
    if crc32c(data[:60]) != header_crc:
        raise ChecksumError(_CODEC, "header CRC", hex(crc32c(data[:60])), hex(header_crc))
    if version != FORMAT_VERSION:
        raise BadMagicError(_CODEC, "format version", FORMAT_VERSION, version)
    if flags or reserved16 or reserved32:
        raise ValueRangeError(_CODEC, "reserved fields", 0, (flags, reserved16, reserved32))
    if status not in ChangesStatus.__members__.values():
        raise ValueRangeError(_CODEC, "status", f"0..{max(ChangesStatus)}", status)
    if not 1 <= member_count <= MAX_MEMBERS:
        raise ValueRangeError(_CODEC, "member count", f"1..{MAX_MEMBERS}", member_count)
    if page_size == 0:
        raise ValueRangeError(_CODEC, "page size", "> 0 sectors", 0)
    if total > MAX_PAGES:
        raise ValueRangeError(_CODEC, "total pages", f"<= {MAX_PAGES}", total)
    if header_length != HEADER_FIXED_BYTES + MEMBER_RECORD_BYTES * member_count:
        raise ValueRangeError(_CODEC, "header length",
                              HEADER_FIXED_BYTES + MEMBER_RECORD_BYTES * member_count, header_length)
    if status != ChangesStatus.CHANGES and run_count:
        raise ValueRangeError(_CODEC, "run count", f"0 with status {ChangesStatus(status).name}", run_count)
    if run_count > total:
        raise ValueRangeError(_CODEC, "run count", f"<= total pages {total}", run_count)
    if length != response_length(member_count, run_count):
        raise ValueRangeError(_CODEC, "response length", response_length(member_count, run_count), length)
    if status == ChangesStatus.CHANGES and not _generations_ok(from_gen, to_gen, current, run_count):
        raise ValueRangeError(_CODEC, "generations", "from < to <= current, or from = to = current with no runs",
                              (from_gen, to_gen, current))
    if len(data) < header_length:
        raise TruncatedError(_CODEC, "member table", f"{header_length} bytes", len(data))
    members = tuple(_decode_member(data, HEADER_FIXED_BYTES + i * MEMBER_RECORD_BYTES, i)
                    for i in range(member_count))
    if len({m.member_id for m in members}) != member_count:
        raise ValueRangeError(_CODEC, "member ids", "unique", [m.member_id for m in members])
    if len({m.name for m in members}) != member_count:
        raise ValueRangeError(_CODEC, "member names", "unique", [m.name for m in members])
    return ChangesHeader(ChangesStatus(status), from_gen, to_gen, current, total, page_size, run_count,
                         header_length, length, members)


def decode_changes_response(data: bytes | memoryview) -> ChangesChunk:
    """Host side: check a whole changes answer and unpack its runs."""
    data = memoryview(data)
    header = decode_changes_header(data)
    if len(data) != header.response_length:
        error = TruncatedError if len(data) < header.response_length else ValueRangeError
        raise error(_CODEC, "response", f"{header.response_length} bytes", len(data))
    end = header.response_length - TRAILER_BYTES
    (crc,) = struct.unpack_from(">I", data, end)
    actual = crc32c(data[:end])
    if actual != crc:
        raise ChecksumError(_CODEC, "response CRC", hex(actual), hex(crc))
    runs = np.frombuffer(data[header.header_length : end], dtype=_RUN)
    first = runs["first"].astype(np.int64)
    packed = runs["length_owner"].astype(np.int64)
    length, raw_owner = packed >> 8, packed & 0xFF
    if length.size:
        if int(length.min()) < 1:
            index = int(np.argmin(length))
            raise ValueRangeError(_CODEC, f"run {index} length", ">= 1", int(length[index]))
        ends = first + length
        if int(ends[-1]) > header.total_pages:
            raise ValueRangeError(_CODEC, f"run {length.size - 1}", f"ending by page {header.total_pages}",
                                  int(ends[-1]))
        overlap = first[1:] < ends[:-1]
        if overlap.any():
            index = int(np.argmax(overlap)) + 1
            raise ChunkOverlapError(_CODEC, f"run {index} first page", f">= {int(ends[index - 1])}",
                                    int(first[index]))
        bad = (raw_owner >= len(header.members)) & (raw_owner != RUN_UNALLOCATED)
        if bad.any():
            index = int(np.argmax(bad))
            raise ValueRangeError(_CODEC, f"run {index} owner",
                                  f"< {len(header.members)} or {RUN_UNALLOCATED} (unallocated)", int(raw_owner[index]))
    owner = np.where(raw_owner == RUN_UNALLOCATED, UNALLOCATED, raw_owner).astype(np.int16)
    return ChangesChunk(header, first, length, owner)


class ChangesAssembler:
    """Applies the chunks of one changes fetch to a copy of the host's map, checking they belong to it.

    `add` raises ChangesUnavailableError when the array says to fetch the
    whole map (or the fetch takes more than MAX_CHUNKS answers), and a
    DecodeError when an answer is not about this map: another geometry or
    member table (GenerationChangedError), another starting generation. The
    caller fetches the whole map either way; `current` is never modified.
    """

    def __init__(self, current: PageMap, *, max_chunks: int = MAX_CHUNKS) -> None:
        self._current = current
        self._since = current.generation
        self._max_chunks = max_chunks
        self._chunks = 0
        self._done = False
        self._pages: list[np.ndarray] = []
        self._owners: list[np.ndarray] = []

    @property
    def since(self) -> int:
        """The generation the next question asks from."""
        return self._since

    @property
    def complete(self) -> bool:
        """True once an answer reached the array's current generation."""
        return self._done

    def add(self, chunk: ChangesChunk) -> None:
        """Take one decoded answer."""
        header, current = chunk.header, self._current
        if header.status != ChangesStatus.CHANGES:
            raise ChangesUnavailableError(header.status.name.lower().replace("_", " "),
                                          header.current_generation)
        if (header.page_size_sectors, header.total_pages, header.members) != (
                current.page_size_sectors, current.total_pages, current.members):
            raise GenerationChangedError(_CODEC, "geometry and member table", "those of the map held",
                                         f"{header.total_pages} pages of {header.page_size_sectors} sectors, "
                                         f"members {[m.member_id for m in header.members]}")
        if header.from_generation != self._since:
            raise ValueRangeError(_CODEC, "from generation", self._since, header.from_generation)
        self._chunks += 1
        if self._chunks > self._max_chunks:
            raise ChangesUnavailableError(f"more than {self._max_chunks} answers", header.current_generation)
        if chunk.length.size:
            starts = np.repeat(chunk.first - np.cumsum(chunk.length) + chunk.length, chunk.length)
            self._pages.append(starts + np.arange(starts.size))
            self._owners.append(np.repeat(chunk.owner, chunk.length))
        self._since = header.to_generation
        self._done = header.to_generation == header.current_generation

    def result(self) -> PageMap:
        """The map at the last answer's generation, with the pages whose owner changed; once complete."""
        if not self._done:
            raise TruncatedError(_CODEC, "answers", "one reaching the current generation", self._chunks)
        current = self._current
        if len(self._pages) == 1:
            pages, owners = self._pages[0], self._owners[0]
        elif self._pages:
            # A page changed in two answers keeps the later owner: the last of each page, in page order.
            all_pages, all_owners = np.concatenate(self._pages), np.concatenate(self._owners)
            reverse = all_pages[::-1]
            pages, last = np.unique(reverse, return_index=True)
            owners = all_owners[::-1][last]
        else:
            pages, owners = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int16)
        owners = owners.astype(owners_dtype(len(current.members)))
        moved = current.owners[pages] != owners
        pages, owners = pages[moved], owners[moved]
        # One copy of the owners (a memcpy): the held map stays as the kernel holds it until the upload.
        new = current.owners.copy()
        new[pages] = owners
        return PageMap(self._since, current.page_size_sectors, current.members, new,
                       changed_since=current.generation, changed_pages=pages.astype(np.uint32))
