"""Damaged GET PAGE MAP responses, for `corrupt-next-map KIND`: each kind trips one host-side check.

- bad-crc: the trailer CRC (or, for a header-only poll, the header CRC) is wrong.
- truncated: the data stops short of RESPONSE LENGTH (a header-only poll loses its CRC).
- entry-out-of-range: one entry names no member; with 1 or 3 members every
  value is a member or "unallocated", so FIRST PAGE + ENTRY COUNT is pushed
  past TOTAL PAGES instead. Both CRCs are recomputed, so only that check trips.
- generation-churn is not a byte edit: the array bumps its generation before
  each affected response (tests/array/lu.py), so chunks of one fetch disagree.
"""

from __future__ import annotations

import struct

from crc32c import crc32c

from protocol.pagemap import HEADER_FIXED_BYTES, TRAILER_BYTES

_HEADER_CRC_OFFSET = 60
_FIRST_PAGE_OFFSET = 32


def corrupt(response: bytes, kind: str) -> bytes:
    """`response` damaged the way `kind` names (a complete or header-only response)."""
    data = bytearray(response)
    complete = _is_complete(data)
    if kind == "bad-crc":
        offset = len(data) - TRAILER_BYTES if complete else _HEADER_CRC_OFFSET
        data[offset] ^= 0xFF
        return bytes(data)
    if kind == "truncated":
        cut = TRAILER_BYTES + 1 if complete and len(data) > HEADER_FIXED_BYTES + TRAILER_BYTES else 4
        return bytes(data[:-cut])
    if kind == "entry-out-of-range":
        if complete:
            _entry_out_of_range(data)
        return bytes(data)
    raise ValueError(f"not a byte-level corruption: {kind!r}")


def _is_complete(data: bytearray) -> bool:
    if len(data) < HEADER_FIXED_BYTES:
        return False
    (response_length,) = struct.unpack_from(">I", data, 44)
    return len(data) == response_length


def _entry_out_of_range(data: bytearray) -> None:
    bits, members = data[5], data[6]
    header_length, = struct.unpack_from(">H", data, 20)
    total, first, count = struct.unpack_from(">QQI", data, 24)
    if count and (1 << bits) - 1 > members:
        # A value above the last member and below "unallocated" (all ones).
        index = count // 2
        bit = index * bits
        byte = header_length + bit // 8
        shift = bit % 8
        mask = ((1 << bits) - 1) << shift
        data[byte] = (data[byte] & ~mask & 0xFF) | (members << shift)
    else:
        struct.pack_into(">Q", data, _FIRST_PAGE_OFFSET, total - count + 1)
        struct.pack_into(">I", data, _HEADER_CRC_OFFSET, crc32c(bytes(data[:_HEADER_CRC_OFFSET])))
    end = len(data) - TRAILER_BYTES
    struct.pack_into(">I", data, end, crc32c(bytes(data[:end])))
