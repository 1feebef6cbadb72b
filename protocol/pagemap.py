"""The page-map protocol (docs/protocol.md): GET PAGE MAP and VPD 0xC0, both sides.

The array side encodes (the emulator uses it); the host side decodes and
assembles chunks into one PageMap. Entries are handled as numpy arrays:
a 1,572,864-page map must decode in milliseconds, not in a Python loop.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from crc32c import crc32c

from protocol.errors import (
    BadMagicError,
    CapacityMismatchError,
    ChecksumError,
    ChunkOverlapError,
    EncodeError,
    GenerationChangedError,
    TruncatedError,
    ValueRangeError,
)

GET_PAGE_MAP_OPCODE = 0xC8
GET_PAGE_MAP_CDB_LEN = 10
MEMBER_IDENTITY_VPD = 0xC0

MAGIC = b"SAPM"
FORMAT_VERSION = 1
HEADER_FIXED_BYTES = 64
"""Allocation length that returns just the fixed header: the cheap generation poll."""
MEMBER_RECORD_BYTES = 32
MEMBER_NAME_BYTES = 28
TRAILER_BYTES = 4
MAX_ALLOCATION_LENGTH = (1 << 24) - 1
MAX_MEMBERS = 255
MAX_PAGES = 1 << 25
"""More pages than this is refused before anything is allocated: 32M pages cost 32-64 MiB of
owners here and a vmalloc'd region table in the kernel; the seed's largest volume is 1.5M pages."""
MAX_LUN_BYTES = 2**63 - 1
"""The kernel holds a block device's size in bytes as a loff_t (signed 64 bits): no LUN is larger."""
CHUNK_SLACK = 4
"""An array may answer fewer entries than the allocation holds (a transfer limit of its own), down to
1/CHUNK_SLACK of it on average: a fetch takes at most CHUNK_SLACK times the full chunks, plus CHUNK_SLACK."""

UNALLOCATED = -1
"""Decoded owner of a page no member owns yet (the wire's all-ones entry)."""

# magic, version, bits, members, flags, generation, page_size, header_len, rsvd,
# total_pages, first_page, entry_count, response_len, 12 reserved, header CRC
_HEADER = struct.Struct(">4sBBBBQIHHQQII12sI")
assert _HEADER.size == HEADER_FIXED_BYTES
_MEMBER = struct.Struct(">I28s")
_CDB = struct.Struct(">BBI3sB")

_IDENTITY_MAGIC = b"SAMI"
_IDENTITY = struct.Struct(">BBH4sBB2xIQ24s")
IDENTITY_VPD_BYTES = _IDENTITY.size
_CODEC = "GET PAGE MAP"
_ID_CODEC = "VPD 0xC0 member identity"


@dataclass(frozen=True)
class Member:
    """One array member as the page map names it."""

    member_id: int
    name: str


@dataclass(frozen=True)
class GetPageMapCdb:
    """The decoded fields of a GET PAGE MAP CDB."""

    start_page: int
    allocation_length: int


@dataclass(frozen=True)
class PageMapHeader:
    """The header of one GET PAGE MAP response (members empty when only the fixed part came)."""

    generation: int
    page_size_sectors: int
    total_pages: int
    bits_per_entry: int
    member_count: int
    first_page: int
    entry_count: int
    header_length: int
    response_length: int
    members: tuple[Member, ...] = ()

    def same_map_as(self, other: PageMapHeader) -> bool:
        """True when both describe the same generation, geometry and members."""
        return (self.generation, self.page_size_sectors, self.total_pages, self.members) == (
            other.generation, other.page_size_sectors, other.total_pages, other.members)


@dataclass(frozen=True)
class PageMapChunk:
    """One decoded response: its header and its entries (owners_dtype, UNALLOCATED for -1)."""

    header: PageMapHeader
    entries: np.ndarray


@dataclass(frozen=True, eq=False)
class PageMap:
    """A whole volume's page map: owners[p] is an index into members, or UNALLOCATED."""

    generation: int
    page_size_sectors: int
    members: tuple[Member, ...]
    owners: np.ndarray
    changed_since: int | None = None
    """Set when this map was built from generation `changed_since`'s by a changes-since answer
    (protocol.pagemap_changes): then `changed_pages` are the only pages whose owner differs from it."""
    changed_pages: np.ndarray | None = None

    @property
    def total_pages(self) -> int:
        """Number of pages in the volume."""
        return int(self.owners.size)

    def pages_per_member(self) -> dict[int, int]:
        """Pages owned by each member id (unallocated pages are not counted)."""
        counts = np.bincount(self.owners[self.owners >= 0], minlength=len(self.members))
        return {m.member_id: int(counts[i]) for i, m in enumerate(self.members)}

    def owner_of_page(self, page: int) -> Member | None:
        """The member owning a page, or None when it is unallocated."""
        index = int(self.owners[page])
        return None if index == UNALLOCATED else self.members[index]


@dataclass(frozen=True)
class MemberIdentity:
    """VPD page 0xC0: which member answered on this path."""

    member_id: int
    generation: int
    name: str
    features: int = 0
    """Byte 9 (reserved, 0, before version 1.2): bit 0, the array answers GET PAGE MAP's
    changes-since form (protocol.pagemap_changes.FEATURE_CHANGES_SINCE)."""


def bits_per_entry(member_count: int) -> int:
    """The smallest of 1, 2, 4, 8 bits that leaves the all-ones value free for UNALLOCATED."""
    if not 1 <= member_count <= MAX_MEMBERS:
        raise EncodeError(f"member count must be 1..{MAX_MEMBERS}, got {member_count}")
    return _BITS_FOR[member_count]


# A table: every generation poll decodes a header, and a generator here cost more than the CRC.
_BITS_FOR = tuple(next((b for b in (1, 2, 4, 8) if (1 << b) > n), 0) for n in range(MAX_MEMBERS + 1))


# -- CDB ----------------------------------------------------------------------

def build_get_page_map_cdb(start_page: int, allocation_length: int) -> bytes:
    """The 10-byte GET PAGE MAP CDB."""
    if not 0 <= start_page < 1 << 32:
        raise EncodeError(f"starting page must fit in 32 bits, got {start_page}")
    if not 0 <= allocation_length <= MAX_ALLOCATION_LENGTH:
        raise EncodeError(f"allocation length must be 0..{MAX_ALLOCATION_LENGTH}, got {allocation_length}")
    return _CDB.pack(GET_PAGE_MAP_OPCODE, 0, start_page, allocation_length.to_bytes(3, "big"), 0)


def parse_get_page_map_cdb(cdb: bytes) -> GetPageMapCdb:
    """Decode a GET PAGE MAP CDB (array side); the reserved byte must be 0."""
    if len(cdb) < GET_PAGE_MAP_CDB_LEN:
        raise TruncatedError(_CODEC, "CDB length", GET_PAGE_MAP_CDB_LEN, len(cdb))
    opcode, reserved, start, alloc, _control = _CDB.unpack_from(cdb)
    if opcode != GET_PAGE_MAP_OPCODE:
        raise BadMagicError(_CODEC, "operation code", hex(GET_PAGE_MAP_OPCODE), hex(opcode))
    if reserved:
        raise ValueRangeError(_CODEC, "CDB byte 1 (reserved)", 0, reserved)
    return GetPageMapCdb(start, int.from_bytes(alloc, "big"))


# -- entries ------------------------------------------------------------------

def pack_entries(owners: np.ndarray, bits: int) -> bytes:
    """Pack owner indexes (UNALLOCATED -> all ones) at `bits` per entry, LSB first."""
    per_byte = 8 // bits
    values = np.asarray(owners, dtype=np.int64)
    values = np.where(values < 0, (1 << bits) - 1, values).astype(np.uint8)
    padded = np.zeros(-(-values.size // per_byte) * per_byte, dtype=np.uint8)
    padded[: values.size] = values
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits)
    packed = np.bitwise_or.reduce(padded.reshape(-1, per_byte) << shifts, axis=1)
    return bytes(packed.astype(np.uint8).tobytes())


def owners_dtype(member_count: int) -> np.dtype:
    """The smallest signed dtype for owners (member indexes and UNALLOCATED): int8 below 128 members.

    A daemon keeps every routed LUN's owners: with many LUNs the width is its memory.
    """
    return np.dtype(np.int8 if member_count < 128 else np.int16)


def unpack_entries(data: bytes | memoryview, count: int, bits: int, member_count: int) -> np.ndarray:
    """Unpack `count` entries; raise ValueRangeError on a value that names no member."""
    per_byte = 8 // bits
    raw = np.frombuffer(data, dtype=np.uint8, count=-(-count * bits // 8))
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    values = ((raw[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)[:count]
    reserved = (1 << bits) - 1
    bad = (values >= member_count) & (values != reserved)
    if bad.any():
        index = int(np.argmax(bad))
        raise ValueRangeError(_CODEC, f"entry {index}", f"< {member_count} or {reserved} (unallocated)",
                              int(values[index]))
    entries = values.astype(owners_dtype(member_count))
    entries[values == reserved] = UNALLOCATED
    return entries


# -- response -----------------------------------------------------------------

def _encode_member(member: Member) -> bytes:
    name = member.name.encode("ascii")
    if len(name) > MEMBER_NAME_BYTES:
        raise EncodeError(f"member name longer than {MEMBER_NAME_BYTES} bytes: {member.name!r}")
    return _MEMBER.pack(member.member_id, name)


def encode_page_map_response(
    owners: np.ndarray,
    *,
    generation: int,
    page_size_sectors: int,
    members: Sequence[Member],
    start_page: int,
    allocation_length: int,
) -> bytes:
    """Array side: the response to GET PAGE MAP(start_page, allocation_length).

    Fits as many entries as the allocation length allows; when not even the
    trailer fits, returns the truncated zero-entry response (SCSI truncation).
    """
    total = int(owners.size)
    if not 0 <= start_page <= total:
        raise EncodeError(f"starting page {start_page} is past the last page ({total})")
    if len({m.member_id for m in members}) != len(members) or len({m.name for m in members}) != len(members):
        raise EncodeError("member ids and names must be unique")
    bits = bits_per_entry(len(members))
    if total and (owners.max() >= len(members)):
        raise EncodeError(f"owner {int(owners.max())} names no member (have {len(members)})")
    header_length = HEADER_FIXED_BYTES + MEMBER_RECORD_BYTES * len(members)
    room_bits = max(0, allocation_length - header_length - TRAILER_BYTES) * 8
    count = min(total - start_page, room_bits // bits)
    entry_bytes = pack_entries(owners[start_page : start_page + count], bits)
    response_length = header_length + len(entry_bytes) + TRAILER_BYTES
    fixed = _HEADER.pack(MAGIC, FORMAT_VERSION, bits, len(members), 0, generation, page_size_sectors,
                         header_length, 0, total, start_page, count, response_length, bytes(12), 0)
    fixed = fixed[:60] + struct.pack(">I", crc32c(fixed[:60]))
    body = fixed + b"".join(_encode_member(m) for m in members) + entry_bytes
    return (body + struct.pack(">I", crc32c(body)))[:allocation_length]


def decode_page_map_header(data: bytes | memoryview) -> PageMapHeader:
    """Decode and check the fixed header (64 bytes suffice: the generation poll).

    The member table is decoded too when the data holds it.
    """
    data = memoryview(data)
    if len(data) < HEADER_FIXED_BYTES:
        raise TruncatedError(_CODEC, "fixed header", f">= {HEADER_FIXED_BYTES} bytes", len(data))
    (magic, version, bits, member_count, flags, generation, page_size, header_length, reserved16,
     total, first, count, response_length, reserved, header_crc) = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise BadMagicError(_CODEC, "magic", MAGIC, bytes(magic))
    if crc32c(data[:60]) != header_crc:
        raise ChecksumError(_CODEC, "header CRC", hex(crc32c(data[:60])), hex(header_crc))
    if version != FORMAT_VERSION:
        raise BadMagicError(_CODEC, "format version", FORMAT_VERSION, version)
    if flags or reserved16 or any(reserved):
        raise ValueRangeError(_CODEC, "reserved fields", 0, (flags, reserved16, bytes(reserved).hex()))
    if not 1 <= member_count <= MAX_MEMBERS:
        raise ValueRangeError(_CODEC, "member count", f"1..{MAX_MEMBERS}", member_count)
    if bits != bits_per_entry(member_count):
        raise ValueRangeError(_CODEC, "bits per entry", bits_per_entry(member_count), bits)
    if page_size == 0:
        raise ValueRangeError(_CODEC, "page size", "> 0 sectors", 0)
    if header_length != HEADER_FIXED_BYTES + MEMBER_RECORD_BYTES * member_count:
        raise ValueRangeError(_CODEC, "header length",
                              HEADER_FIXED_BYTES + MEMBER_RECORD_BYTES * member_count, header_length)
    if first + count > total:
        raise ValueRangeError(_CODEC, "first page + entry count", f"<= total pages {total}", first + count)
    expected_length = header_length + -(-count * bits // 8) + TRAILER_BYTES
    if response_length != expected_length:
        raise ValueRangeError(_CODEC, "response length", expected_length, response_length)
    members: tuple[Member, ...] = ()
    if len(data) >= header_length:
        members = tuple(_decode_member(data, HEADER_FIXED_BYTES + i * MEMBER_RECORD_BYTES, i)
                        for i in range(member_count))
        if len({m.member_id for m in members}) != member_count:
            raise ValueRangeError(_CODEC, "member ids", "unique", [m.member_id for m in members])
        if len({m.name for m in members}) != member_count:
            raise ValueRangeError(_CODEC, "member names", "unique", [m.name for m in members])
    return PageMapHeader(generation, page_size, total, bits, member_count, first, count,
                         header_length, response_length, members)


def _decode_member(data: memoryview, offset: int, index: int) -> Member:
    member_id, raw_name = _MEMBER.unpack_from(data, offset)
    return Member(member_id, _decode_name(raw_name, _CODEC, f"member {index} name"))


def _decode_name(raw: bytes, codec: str, field: str) -> str:
    name = bytes(raw).rstrip(b"\0")
    if b"\0" in name or not name.isascii() or not name.decode("ascii").isprintable():
        raise ValueRangeError(codec, field, "printable ASCII, NUL-padded", bytes(raw))
    return name.decode("ascii")


def decode_page_map_response(data: bytes | memoryview) -> PageMapChunk:
    """Host side: check a whole GET PAGE MAP response and unpack its entries."""
    data = memoryview(data)
    header = decode_page_map_header(data)
    if len(data) < header.response_length:
        raise TruncatedError(_CODEC, "response", f"{header.response_length} bytes", len(data))
    if len(data) > header.response_length:
        raise ValueRangeError(_CODEC, "response", f"{header.response_length} bytes", len(data))
    end = header.response_length - TRAILER_BYTES
    (crc,) = struct.unpack_from(">I", data, end)
    actual = crc32c(data[:end])
    if actual != crc:
        raise ChecksumError(_CODEC, "response CRC", hex(actual), hex(crc))
    entries = unpack_entries(data[header.header_length : end], header.entry_count,
                             header.bits_per_entry, header.member_count)
    return PageMapChunk(header, entries)


class PageMapAssembler:
    """Joins the chunks of one fetch into a PageMap, checking they belong together.

    Raises GenerationChangedError when a chunk describes another map (the
    caller starts over) and ChunkOverlapError when it is not the next one.
    The first chunk's geometry is checked before anything is allocated: at
    most `max_pages` pages; with `capacity_bytes` (READ CAPACITY(16) of the
    same path) exactly the pages that cover it (CapacityMismatchError), of a
    whole number of `logical_block_bytes`; with `allocation_length`, at most
    CHUNK_SLACK times the chunks a full answer needs (an array trickling one
    entry per chunk is stopped).
    """

    def __init__(self, *, capacity_bytes: int | None = None, logical_block_bytes: int = 512,
                 allocation_length: int | None = None, max_pages: int = MAX_PAGES) -> None:
        if capacity_bytes is not None and not 0 <= capacity_bytes <= MAX_LUN_BYTES:
            raise ValueRangeError(_CODEC, "LUN capacity", f"0..{MAX_LUN_BYTES} bytes (the kernel's loff_t)",
                                  capacity_bytes)
        if logical_block_bytes < 512 or logical_block_bytes % 512:
            raise ValueRangeError(_CODEC, "logical block length", "a multiple of 512 bytes", logical_block_bytes)
        self._capacity_bytes = capacity_bytes
        self._block_bytes = logical_block_bytes
        self._allocation_length = allocation_length
        self._max_pages = max_pages
        self._max_chunks: int | None = None
        self._chunks = 0
        self._first: PageMapHeader | None = None
        self._owners: np.ndarray | None = None
        self._next_page = 0

    @property
    def next_page(self) -> int:
        """The page the next chunk must start at."""
        return self._next_page

    @property
    def complete(self) -> bool:
        """True once every page has an entry."""
        return self._first is not None and self._next_page == self._first.total_pages

    def add(self, chunk: PageMapChunk) -> None:
        """Append one decoded chunk."""
        header = chunk.header
        if self._first is None:
            self._check_geometry(header)
            self._first = header
            self._owners = np.empty(header.total_pages, dtype=owners_dtype(header.member_count))
        elif not header.same_map_as(self._first):
            raise GenerationChangedError(_CODEC, "map generation/geometry",
                                         self._first.generation, header.generation)
        self._chunks += 1
        if self._max_chunks is not None and self._chunks > self._max_chunks:
            raise ValueRangeError(_CODEC, "chunks", f"<= {self._max_chunks} for {header.total_pages} pages",
                                  self._chunks)
        if header.first_page != self._next_page:
            raise ChunkOverlapError(_CODEC, "first page", self._next_page, header.first_page)
        if header.entry_count == 0 and not self.complete:
            raise ChunkOverlapError(_CODEC, "entry count", "> 0 while pages remain", 0)
        assert self._owners is not None
        self._owners[header.first_page : header.first_page + header.entry_count] = chunk.entries
        self._next_page += header.entry_count

    def _check_geometry(self, header: PageMapHeader) -> None:
        """The first chunk's claims, against the LUN, before they size anything."""
        total, page_bytes = header.total_pages, header.page_size_sectors * 512
        if page_bytes % self._block_bytes:
            raise ValueRangeError(_CODEC, "page size",
                                  f"a multiple of the LUN's {self._block_bytes}-byte logical block", page_bytes)
        if self._capacity_bytes is not None and total != -(-self._capacity_bytes // page_bytes):
            raise CapacityMismatchError(
                _CODEC, "total pages", f"{-(-self._capacity_bytes // page_bytes)} pages of {page_bytes} bytes "
                f"for the LUN's {self._capacity_bytes} bytes", total)
        if total > self._max_pages:
            raise ValueRangeError(_CODEC, "total pages", f"<= {self._max_pages}", total)
        if self._allocation_length is not None:
            per_chunk = (self._allocation_length - header.header_length - TRAILER_BYTES) * 8 // header.bits_per_entry
            if per_chunk > 0:
                self._max_chunks = CHUNK_SLACK * -(-total // per_chunk) + CHUNK_SLACK

    def result(self) -> PageMap:
        """The assembled map; only once complete."""
        if not self.complete:
            raise TruncatedError(_CODEC, "pages fetched",
                                 self._first.total_pages if self._first else "a first chunk",
                                 self._next_page)
        assert self._first is not None and self._owners is not None
        return PageMap(self._first.generation, self._first.page_size_sectors,
                       self._first.members, self._owners)


# -- VPD 0xC0 -----------------------------------------------------------------

def encode_member_identity_vpd(identity: MemberIdentity) -> bytes:
    """Array side: VPD page 0xC0 for the member answering on this path."""
    name = identity.name.encode("ascii")
    if len(name) > 24:
        raise EncodeError(f"member name longer than 24 bytes: {identity.name!r}")
    return _IDENTITY.pack(0, MEMBER_IDENTITY_VPD, IDENTITY_VPD_BYTES - 4, _IDENTITY_MAGIC,
                          FORMAT_VERSION, identity.features, identity.member_id, identity.generation, name)


def decode_member_identity_vpd(data: bytes | memoryview) -> MemberIdentity:
    """Host side: decode VPD page 0xC0."""
    if len(data) < IDENTITY_VPD_BYTES:
        raise TruncatedError(_ID_CODEC, "page", f">= {IDENTITY_VPD_BYTES} bytes", len(data))
    _pq, page, length, magic, version, features, member_id, generation, raw_name = _IDENTITY.unpack_from(data)
    if page != MEMBER_IDENTITY_VPD:
        raise BadMagicError(_ID_CODEC, "page code", hex(MEMBER_IDENTITY_VPD), hex(page))
    if length < IDENTITY_VPD_BYTES - 4:
        raise TruncatedError(_ID_CODEC, "page length", IDENTITY_VPD_BYTES - 4, length)
    if magic != _IDENTITY_MAGIC:
        raise BadMagicError(_ID_CODEC, "magic", _IDENTITY_MAGIC, bytes(magic))
    if version != FORMAT_VERSION:
        raise BadMagicError(_ID_CODEC, "format version", FORMAT_VERSION, version)
    return MemberIdentity(member_id, generation, _decode_name(raw_name, _ID_CODEC, "member name"), features)
