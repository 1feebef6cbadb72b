"""VPD page 0xC1, MEMBER PORTALS (docs/protocol.md section 7), both sides.

Where a host logs in to reach each member: every member of the volume with
its member id, its target port group, and its iSCSI portals (address, TCP
port, portal group tag, relative target port). The array encodes (the
emulator uses it); the host decodes. Every count and length is checked
against the bytes that came, and a CRC32C covers the page.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Sequence

from crc32c import crc32c

from protocol.errors import (
    BadMagicError,
    ChecksumError,
    EncodeError,
    TruncatedError,
    ValueRangeError,
)
from protocol.pagemap import MAX_MEMBERS

MEMBER_PORTALS_VPD = 0xC1
MAGIC = b"SAMP"
FORMAT_VERSION = 1
MAX_PORTALS_PER_MEMBER = 8
"""Bounds the page: 255 members x 8 portals still fit VPD's 16-bit PAGE LENGTH."""
MAX_PAGE_BYTES = 4 + 0xFFFF

# PQ|PDT, page code, page length, magic, version, member count, reserved, generation
_HEADER = struct.Struct(">BBH4sBBHQ")
HEADER_BYTES = _HEADER.size
# member id, target port group, portal count, reserved
_MEMBER = struct.Struct(">IHBB")
MEMBER_RECORD_BYTES = _MEMBER.size
# address (IPv6; IPv4 as ::ffff:a.b.c.d), TCP port, portal group tag, relative target port, reserved
_PORTAL = struct.Struct(">16sHHHH")
PORTAL_RECORD_BYTES = _PORTAL.size
TRAILER_BYTES = 4
_CODEC = "VPD 0xC1 member portals"

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Portal:
    """One iSCSI portal of a member: where to log in, and which SCSI target port it is."""

    address: Address
    port: int
    portal_group_tag: int
    relative_target_port: int

    @property
    def iscsiadm_portal(self) -> str:
        """``ADDR:PORT`` as iscsiadm's -p takes it (IPv6 in brackets)."""
        if self.address.version == 6:
            return f"[{self.address}]:{self.port}"
        return f"{self.address}:{self.port}"


@dataclass(frozen=True)
class MemberPortals:
    """One member: its id (as in VPD 0xC0 and the page map), target port group, portals."""

    member_id: int
    target_port_group: int
    portals: tuple[Portal, ...]


@dataclass(frozen=True)
class MemberPortalsPage:
    """The whole page: the map generation it describes and every member of the volume."""

    generation: int
    members: tuple[MemberPortals, ...]


def page_length(portal_counts: Sequence[int]) -> int:
    """Total bytes of a page whose members have these portal counts (header and CRC included)."""
    return (HEADER_BYTES + MEMBER_RECORD_BYTES * len(portal_counts)
            + PORTAL_RECORD_BYTES * sum(portal_counts) + TRAILER_BYTES)


def _wire_address(address: Address) -> bytes:
    if address.version == 4:
        return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed).packed
    return address.packed


def _from_wire_address(raw: bytes) -> Address:
    address = ipaddress.IPv6Address(raw)
    return address.ipv4_mapped or address


def _usable(address: Address) -> bool:
    return not (address.is_unspecified or address.is_multicast)


# -- array side ----------------------------------------------------------------


def encode_member_portals_vpd(page: MemberPortalsPage) -> bytes:
    """Array side: the whole VPD page 0xC1 (callers truncate to the allocation length)."""
    members = tuple(page.members)
    if not 1 <= len(members) <= MAX_MEMBERS:
        raise EncodeError(f"{_CODEC}: member count must be 1..{MAX_MEMBERS}, got {len(members)}")
    if not 0 <= page.generation < 1 << 64:
        raise EncodeError(f"{_CODEC}: generation must fit 64 bits, got {page.generation}")
    if len({m.member_id for m in members}) != len(members):
        raise EncodeError(f"{_CODEC}: member ids must be unique: {[m.member_id for m in members]}")
    rtps = [p.relative_target_port for m in members for p in m.portals]
    if len(set(rtps)) != len(rtps):
        raise EncodeError(f"{_CODEC}: relative target ports must be unique: {rtps}")
    body = bytearray()
    for m in members:
        if not 0 <= m.member_id < 1 << 32 or not 0 <= m.target_port_group < 1 << 16:
            raise EncodeError(f"{_CODEC}: member id {m.member_id} / target port group "
                              f"{m.target_port_group} out of range")
        if not 1 <= len(m.portals) <= MAX_PORTALS_PER_MEMBER:
            raise EncodeError(f"{_CODEC}: member {m.member_id} has {len(m.portals)} portals, "
                              f"must have 1..{MAX_PORTALS_PER_MEMBER}")
        body += _MEMBER.pack(m.member_id, m.target_port_group, len(m.portals), 0)
        for p in m.portals:
            if not isinstance(p.address, (ipaddress.IPv4Address, ipaddress.IPv6Address)) \
                    or not _usable(p.address):
                raise EncodeError(f"{_CODEC}: member {m.member_id}: not a usable address: {p.address!r}")
            if not 1 <= p.port < 1 << 16 or not 1 <= p.relative_target_port < 1 << 16 \
                    or not 0 <= p.portal_group_tag < 1 << 16:
                raise EncodeError(f"{_CODEC}: member {m.member_id}: port {p.port}, tag "
                                  f"{p.portal_group_tag}, relative port {p.relative_target_port} "
                                  "out of range")
            body += _PORTAL.pack(_wire_address(p.address), p.port, p.portal_group_tag,
                                 p.relative_target_port, 0)
    total = HEADER_BYTES + len(body) + TRAILER_BYTES
    if total > MAX_PAGE_BYTES:
        raise EncodeError(f"{_CODEC}: {total} bytes exceed a VPD page's {MAX_PAGE_BYTES}")
    head = _HEADER.pack(0, MEMBER_PORTALS_VPD, total - 4, MAGIC, FORMAT_VERSION, len(members), 0,
                        page.generation)
    data = head + bytes(body)
    return data + struct.pack(">I", crc32c(data))


# -- host side -----------------------------------------------------------------


def decode_member_portals_vpd(data: bytes | bytearray | memoryview) -> MemberPortalsPage:
    """Host side: check and decode VPD page 0xC1.

    A TruncatedError's ``expected`` is the byte count the page needs (an
    int), so the caller can ask again with that allocation length. Bytes past
    the page are ignored, as for every VPD page.
    """
    raw = bytes(data)
    if len(raw) < HEADER_BYTES:
        # Ask for at least the header; once it came, its PAGE LENGTH says the rest.
        expected = 4 + struct.unpack_from(">H", raw, 2)[0] if len(raw) >= 4 else HEADER_BYTES
        raise TruncatedError(_CODEC, "header", max(expected, HEADER_BYTES), len(raw))
    _pq, code, length, magic, version, count, reserved, generation = _HEADER.unpack_from(raw)
    if code != MEMBER_PORTALS_VPD:
        raise BadMagicError(_CODEC, "page code", hex(MEMBER_PORTALS_VPD), hex(code))
    if magic != MAGIC:
        raise BadMagicError(_CODEC, "magic", MAGIC, magic)
    if version != FORMAT_VERSION:
        raise BadMagicError(_CODEC, "format version", FORMAT_VERSION, version)
    total = 4 + length
    if len(raw) < total:
        raise TruncatedError(_CODEC, f"page (PAGE LENGTH {length})", total, len(raw))
    if total < HEADER_BYTES + TRAILER_BYTES:
        raise ValueRangeError(_CODEC, "page length", f">= {HEADER_BYTES + TRAILER_BYTES - 4}", length)
    (crc,) = struct.unpack_from(">I", raw, total - TRAILER_BYTES)
    actual = crc32c(raw[:total - TRAILER_BYTES])
    if actual != crc:
        raise ChecksumError(_CODEC, "page CRC", hex(actual), hex(crc))
    if reserved:
        raise ValueRangeError(_CODEC, "reserved bytes 10-11", 0, reserved)
    if not 1 <= count <= MAX_MEMBERS:
        raise ValueRangeError(_CODEC, "member count", f"1..{MAX_MEMBERS}", count)
    end = total - TRAILER_BYTES
    offset = HEADER_BYTES
    members: list[MemberPortals] = []
    for index in range(count):
        field = f"member {index}"
        if offset + MEMBER_RECORD_BYTES > end:
            raise ValueRangeError(_CODEC, f"{field} record", f"within the page ({end} bytes)",
                                  offset + MEMBER_RECORD_BYTES)
        member_id, group, portal_count, rsvd = _MEMBER.unpack_from(raw, offset)
        offset += MEMBER_RECORD_BYTES
        if rsvd:
            raise ValueRangeError(_CODEC, f"{field} reserved byte", 0, rsvd)
        if not 1 <= portal_count <= MAX_PORTALS_PER_MEMBER:
            raise ValueRangeError(_CODEC, f"{field} portal count", f"1..{MAX_PORTALS_PER_MEMBER}",
                                  portal_count)
        if offset + portal_count * PORTAL_RECORD_BYTES > end:
            raise ValueRangeError(_CODEC, f"{field} portals", f"within the page ({end} bytes)",
                                  offset + portal_count * PORTAL_RECORD_BYTES)
        portals = []
        for p in range(portal_count):
            address_raw, port, tag, rtp, rsvd = _PORTAL.unpack_from(raw, offset)
            offset += PORTAL_RECORD_BYTES
            pfield = f"{field} portal {p}"
            address = _from_wire_address(address_raw)
            if not _usable(address):
                raise ValueRangeError(_CODEC, f"{pfield} address", "a unicast address", str(address))
            if port == 0:
                raise ValueRangeError(_CODEC, f"{pfield} TCP port", "1..65535", 0)
            if rtp == 0:
                raise ValueRangeError(_CODEC, f"{pfield} relative target port", "1..65535", 0)
            if rsvd:
                raise ValueRangeError(_CODEC, f"{pfield} reserved bytes", 0, rsvd)
            portals.append(Portal(address, port, tag, rtp))
        members.append(MemberPortals(member_id, group, tuple(portals)))
    if offset != end:
        raise ValueRangeError(_CODEC, "page length", f"{offset - 4 + TRAILER_BYTES} (the records)",
                              length)
    ids = [m.member_id for m in members]
    if len(set(ids)) != len(ids):
        raise ValueRangeError(_CODEC, "member ids", "unique", ids)
    rtps = [p.relative_target_port for m in members for p in m.portals]
    if len(set(rtps)) != len(rtps):
        raise ValueRangeError(_CODEC, "relative target ports", "unique", rtps)
    return MemberPortalsPage(generation, tuple(members))
