"""Standard INQUIRY data (SPC-4 6.6.2), the 36-byte form every device returns.

  0 PERIPHERAL QUALIFIER (7-5) | PERIPHERAL DEVICE TYPE (4-0)   1 RMB (bit 7)
  2 VERSION   3 NORMACA (bit 5) | HISUP (bit 4) | RESPONSE DATA FORMAT (3-0)
  4 ADDITIONAL LENGTH (n - 4)   5 SCCS (7) ACC (6) TPGS (5-4) 3PC (3) PROTECT (0)
  6 ENCSERV (6) MULTIP (4)   7 CMDQUE (bit 1)
  8-15 T10 VENDOR IDENTIFICATION   16-31 PRODUCT IDENTIFICATION
  32-35 PRODUCT REVISION LEVEL

The encoder writes what LIO's spc_emulate_inquiry_std writes: 36 bytes,
ADDITIONAL LENGTH 31, space-padded strings.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from protocol.errors import EncodeError
from protocol.scsi._wire import Buffer, check_uint, decode_ascii, encode_ascii, enum_or_int, need
from protocol.scsi.constants import PeripheralDeviceType, Tpgs

__all__ = ["StandardInquiry", "encode_standard_inquiry", "decode_standard_inquiry",
           "STANDARD_INQUIRY_BYTES", "VERSION_SPC4"]

_CODEC = "standard INQUIRY data"
_LAYOUT = struct.Struct(">BBBBBBBB8s16s4s")
STANDARD_INQUIRY_BYTES = _LAYOUT.size
"""36: the length the kernel asks for first and assumes valid (scsi_scan.c scsi_probe_lun)."""
VERSION_SPC4 = 0x06
"""VERSION field value claiming SPC-4 (LIO claims SPC-3, 0x05)."""


@dataclass(frozen=True, kw_only=True)
class StandardInquiry:
    """The fields of standard INQUIRY data that a host or an emulated array cares about."""

    vendor: str
    product: str
    revision: str
    peripheral_device_type: PeripheralDeviceType | int = PeripheralDeviceType.DIRECT_ACCESS
    peripheral_qualifier: int = 0
    removable: bool = False
    version: int = VERSION_SPC4
    response_data_format: int = 2
    normaca: bool = False
    hisup: bool = False
    sccs: bool = False
    acc: bool = False
    tpgs: Tpgs = Tpgs.NOT_SUPPORTED
    third_party_copy: bool = False
    protect: bool = False
    enclosure_services: bool = False
    multi_port: bool = False
    command_queueing: bool = True
    version_descriptors: tuple[int, ...] = ()
    """Up to 8 standards the device claims (SPC-4 table 140, e.g. 0x0460 SPC-4, 0x04C0 SBC-3);
    when given, the data is 96 bytes long with them at bytes 58-73."""


# SPC-4 6.4.2: bytes 36-55 vendor specific, 56-57 reserved, 58-73 eight version
# descriptors, 74-95 reserved.
EXTENDED_INQUIRY_BYTES = 96
_DESCRIPTORS_AT = 58
MAX_VERSION_DESCRIPTORS = 8


def encode_standard_inquiry(inquiry: StandardInquiry) -> bytes:
    """Array side: standard INQUIRY data: 36 bytes, or 96 with version descriptors."""
    i = inquiry
    if len(i.version_descriptors) > MAX_VERSION_DESCRIPTORS:
        raise EncodeError(f"at most {MAX_VERSION_DESCRIPTORS} version descriptors, got {len(i.version_descriptors)}")
    for d in i.version_descriptors:
        check_uint(_CODEC, "VERSION DESCRIPTOR", d, 16)
    length = EXTENDED_INQUIRY_BYTES if i.version_descriptors else STANDARD_INQUIRY_BYTES
    check_uint(_CODEC, "PERIPHERAL DEVICE TYPE", i.peripheral_device_type, 5)
    check_uint(_CODEC, "PERIPHERAL QUALIFIER", i.peripheral_qualifier, 3)
    check_uint(_CODEC, "VERSION", i.version, 8)
    check_uint(_CODEC, "RESPONSE DATA FORMAT", i.response_data_format, 4)
    check_uint(_CODEC, "TPGS", i.tpgs, 2)
    head = _LAYOUT.pack(
        (i.peripheral_qualifier << 5) | i.peripheral_device_type,
        0x80 if i.removable else 0,
        i.version,
        (0x20 if i.normaca else 0) | (0x10 if i.hisup else 0) | i.response_data_format,
        length - 5,
        (0x80 if i.sccs else 0) | (0x40 if i.acc else 0) | (i.tpgs << 4)
        | (0x08 if i.third_party_copy else 0) | (0x01 if i.protect else 0),
        (0x40 if i.enclosure_services else 0) | (0x10 if i.multi_port else 0),
        0x02 if i.command_queueing else 0,
        encode_ascii(_CODEC, "T10 VENDOR IDENTIFICATION", i.vendor, 8),
        encode_ascii(_CODEC, "PRODUCT IDENTIFICATION", i.product, 16),
        encode_ascii(_CODEC, "PRODUCT REVISION LEVEL", i.revision, 4),
    )
    if not i.version_descriptors:
        return head
    tail = bytearray(EXTENDED_INQUIRY_BYTES - STANDARD_INQUIRY_BYTES)
    for k, d in enumerate(i.version_descriptors):
        struct.pack_into(">H", tail, _DESCRIPTORS_AT - STANDARD_INQUIRY_BYTES + 2 * k, d)
    return head + bytes(tail)


def decode_standard_inquiry(data: Buffer) -> StandardInquiry:
    """Host side: decode the first 36 bytes of standard INQUIRY data.

    Like the kernel, the first 36 bytes are taken as valid whatever
    ADDITIONAL LENGTH says; strings are sanitized and right-trimmed.
    """
    raw = bytes(data)
    need(_CODEC, "data", raw, STANDARD_INQUIRY_BYTES)
    b0, b1, version, b3, additional, b5, b6, b7, vendor, product, revision = _LAYOUT.unpack_from(raw)
    # Version descriptors only where both the data and ADDITIONAL LENGTH reach them; 0 is "none".
    end = min(len(raw), additional + 5, _DESCRIPTORS_AT + 2 * MAX_VERSION_DESCRIPTORS)
    count = max(0, (end - _DESCRIPTORS_AT) // 2)
    descriptors = tuple(d for d in struct.unpack_from(f">{count}H", raw, _DESCRIPTORS_AT) if d) if count else ()
    return StandardInquiry(
        vendor=decode_ascii(vendor),
        product=decode_ascii(product),
        revision=decode_ascii(revision),
        peripheral_device_type=enum_or_int(PeripheralDeviceType, b0 & 0x1F),
        peripheral_qualifier=b0 >> 5,
        removable=bool(b1 & 0x80),
        version=version,
        response_data_format=b3 & 0x0F,
        normaca=bool(b3 & 0x20),
        hisup=bool(b3 & 0x10),
        sccs=bool(b5 & 0x80),
        acc=bool(b5 & 0x40),
        tpgs=Tpgs((b5 >> 4) & 0x03),
        third_party_copy=bool(b5 & 0x08),
        protect=bool(b5 & 0x01),
        enclosure_services=bool(b6 & 0x40),
        multi_port=bool(b6 & 0x10),
        command_queueing=bool(b7 & 0x02),
        version_descriptors=descriptors,
    )
