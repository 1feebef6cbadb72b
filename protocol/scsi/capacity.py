"""READ CAPACITY(10) and (16) parameter data (SBC-3 5.15.2, 5.16.2).

(10): 0-3 RETURNED LOGICAL BLOCK ADDRESS, 4-7 LOGICAL BLOCK LENGTH IN BYTES.
(16): 0-7 RETURNED LOGICAL BLOCK ADDRESS, 8-11 LOGICAL BLOCK LENGTH IN BYTES,
12 P_TYPE (3-1) | PROT_EN (0), 13 P_I_EXPONENT (7-4) | LOGICAL BLOCKS PER
PHYSICAL BLOCK EXPONENT (3-0), 14-15 LBPME (bit 15) | LBPRZ (bit 14) |
LOWEST ALIGNED LOGICAL BLOCK ADDRESS (13-0), 16-31 reserved.
The returned LBA is the *last* LBA, so the block count is one more.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from protocol.scsi._wire import Buffer, check_uint, need

__all__ = [
    "ReadCapacity10Data", "encode_read_capacity_10", "decode_read_capacity_10",
    "ReadCapacity16Data", "encode_read_capacity_16", "decode_read_capacity_16",
    "READ_CAPACITY_10_BYTES", "READ_CAPACITY_16_BYTES",
]

_RC10 = struct.Struct(">II")
_RC16 = struct.Struct(">QIBBH16x")
READ_CAPACITY_10_BYTES = _RC10.size
READ_CAPACITY_16_BYTES = _RC16.size
_RC16_MIN_BYTES = 12  # returned LBA + block length; the rest reads as 0 if cut off
_RC10_OVERFLOW = 0xFFFFFFFF  # "use READ CAPACITY(16)" (SBC-3 5.15.2)


@dataclass(frozen=True)
class ReadCapacity10Data:
    """READ CAPACITY(10) data; ``returned_lba`` 0xFFFFFFFF means "ask READ CAPACITY(16)"."""

    returned_lba: int
    block_length_bytes: int

    @property
    def needs_read_capacity_16(self) -> bool:
        """True when the capacity does not fit in 32 bits of LBA (SBC-3 5.15.2)."""
        return self.returned_lba == _RC10_OVERFLOW

    @property
    def block_count(self) -> int:
        """Number of logical blocks (returned LBA + 1)."""
        return self.returned_lba + 1

    @property
    def capacity_bytes(self) -> int:
        """Capacity in bytes; meaningless when ``needs_read_capacity_16``."""
        return self.block_count * self.block_length_bytes


def encode_read_capacity_10(data: ReadCapacity10Data) -> bytes:
    """Array side: 8 bytes (clamp ``returned_lba`` to 0xFFFFFFFF yourself for large volumes)."""
    codec = "READ CAPACITY(10) data"
    check_uint(codec, "RETURNED LOGICAL BLOCK ADDRESS", data.returned_lba, 32)
    check_uint(codec, "LOGICAL BLOCK LENGTH IN BYTES", data.block_length_bytes, 32)
    return _RC10.pack(data.returned_lba, data.block_length_bytes)


def decode_read_capacity_10(data: Buffer) -> ReadCapacity10Data:
    """Host side: decode 8 bytes of READ CAPACITY(10) data."""
    raw = bytes(data)
    need("READ CAPACITY(10) data", "data", raw, READ_CAPACITY_10_BYTES)
    return ReadCapacity10Data(*_RC10.unpack_from(raw))


@dataclass(frozen=True, kw_only=True)
class ReadCapacity16Data:
    """READ CAPACITY(16) data (SBC-3 5.16.2)."""

    returned_lba: int
    block_length_bytes: int
    protection_enabled: bool = False
    protection_type: int = 0
    protection_information_exponent: int = 0
    logical_blocks_per_physical_block_exponent: int = 0
    lbpme: bool = False
    lbprz: bool = False
    lowest_aligned_lba: int = 0

    @property
    def block_count(self) -> int:
        """Number of logical blocks (returned LBA + 1)."""
        return self.returned_lba + 1

    @property
    def capacity_bytes(self) -> int:
        """Capacity in bytes."""
        return self.block_count * self.block_length_bytes

    @property
    def physical_block_length_bytes(self) -> int:
        """Physical block size: block length << LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT."""
        return self.block_length_bytes << self.logical_blocks_per_physical_block_exponent


def encode_read_capacity_16(data: ReadCapacity16Data) -> bytes:
    """Array side: 32 bytes, as LIO's sbc_emulate_readcapacity_16 returns."""
    codec = "READ CAPACITY(16) data"
    d = data
    check_uint(codec, "RETURNED LOGICAL BLOCK ADDRESS", d.returned_lba, 64)
    check_uint(codec, "LOGICAL BLOCK LENGTH IN BYTES", d.block_length_bytes, 32)
    check_uint(codec, "P_TYPE", d.protection_type, 3)
    check_uint(codec, "P_I_EXPONENT", d.protection_information_exponent, 4)
    check_uint(codec, "LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT",
               d.logical_blocks_per_physical_block_exponent, 4)
    check_uint(codec, "LOWEST ALIGNED LOGICAL BLOCK ADDRESS", d.lowest_aligned_lba, 14)
    return _RC16.pack(
        d.returned_lba, d.block_length_bytes,
        (d.protection_type << 1) | (0x01 if d.protection_enabled else 0),
        (d.protection_information_exponent << 4) | d.logical_blocks_per_physical_block_exponent,
        (0x8000 if d.lbpme else 0) | (0x4000 if d.lbprz else 0) | d.lowest_aligned_lba,
    )


def decode_read_capacity_16(data: Buffer) -> ReadCapacity16Data:
    """Host side: decode READ CAPACITY(16) data; needs 12 bytes, the rest reads as 0 if absent."""
    raw = bytes(data)
    need("READ CAPACITY(16) data", "data", raw, _RC16_MIN_BYTES)
    lba, block_length, b12, b13, b14 = _RC16.unpack(
        raw[:READ_CAPACITY_16_BYTES].ljust(READ_CAPACITY_16_BYTES, b"\x00"))
    return ReadCapacity16Data(
        returned_lba=lba,
        block_length_bytes=block_length,
        protection_enabled=bool(b12 & 0x01),
        protection_type=(b12 >> 1) & 0x07,
        protection_information_exponent=b13 >> 4,
        logical_blocks_per_physical_block_exponent=b13 & 0x0F,
        lbpme=bool(b14 & 0x8000),
        lbprz=bool(b14 & 0x4000),
        lowest_aligned_lba=b14 & 0x3FFF,
    )
