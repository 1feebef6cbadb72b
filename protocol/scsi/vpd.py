"""VPD pages: the generic header and pages 0x00, 0x80, 0x83, 0xB0 and 0xB3.

Every VPD page starts with the same 4-byte header (SPC-4 7.8.1):
0 PERIPHERAL QUALIFIER (7-5) | PERIPHERAL DEVICE TYPE (4-0), 1 PAGE CODE,
2-3 PAGE LENGTH (bytes after the header). ``encode_vpd_page`` /
``decode_vpd_page`` handle just that, so vendor pages (0xC0, see
protocol/pagemap.py) can be built on top.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from protocol.errors import BadMagicError, EncodeError, ValueRangeError
from protocol.scsi._wire import (
    Buffer,
    check_bytes,
    check_uint,
    decode_ascii,
    encode_ascii,
    enum_or_int,
    need,
)
from protocol.scsi.constants import (
    Association,
    CodeSet,
    DesignatorType,
    ProtocolId,
    VpdPageCode,
)

__all__ = [
    "VpdPage", "encode_vpd_page", "decode_vpd_page",
    "SupportedVpdPages", "encode_supported_vpd_pages", "decode_supported_vpd_pages",
    "UnitSerialNumberVpd", "encode_unit_serial_number_vpd", "decode_unit_serial_number_vpd",
    "NaaIdentifier", "T10VendorIdentifier", "Designator", "DeviceIdentificationVpd",
    "encode_device_identification_vpd", "decode_device_identification_vpd",
    "naa_designator", "t10_vendor_id_designator", "relative_target_port_designator",
    "target_port_group_designator", "logical_unit_group_designator",
    "scsi_name_string_designator",
    "BlockLimitsVpd", "encode_block_limits_vpd", "decode_block_limits_vpd",
    "ReferralsVpd", "encode_referrals_vpd", "decode_referrals_vpd",
]

_HEADER = struct.Struct(">BBH")


# -- generic header ------------------------------------------------------------


@dataclass(frozen=True)
class VpdPage:
    """A VPD page split into header fields and payload (the bytes after the header)."""

    page_code: int
    payload: bytes
    peripheral_device_type: int = 0
    peripheral_qualifier: int = 0


def encode_vpd_page(page_code: int, payload: bytes, *, peripheral_device_type: int = 0,
                    peripheral_qualifier: int = 0) -> bytes:
    """Header + payload; PAGE LENGTH is ``len(payload)``."""
    codec = f"VPD page {page_code:#04x}" if isinstance(page_code, int) else "VPD page"
    check_uint(codec, "PAGE CODE", page_code, 8)
    check_uint(codec, "PERIPHERAL DEVICE TYPE", peripheral_device_type, 5)
    check_uint(codec, "PERIPHERAL QUALIFIER", peripheral_qualifier, 3)
    body = check_bytes(codec, "payload", payload, 0xFFFF)
    return _HEADER.pack((peripheral_qualifier << 5) | peripheral_device_type, page_code,
                        len(body)) + body


def decode_vpd_page(data: Buffer, expected_page_code: int | None = None) -> VpdPage:
    """Split a VPD page; BadMagicError if the page code is not ``expected_page_code``.

    TruncatedError (``expected`` = 4 + PAGE LENGTH) if the data stops short;
    bytes past the page are ignored.
    """
    raw = bytes(data)
    codec = "VPD page" if expected_page_code is None else f"VPD page {expected_page_code:#04x}"
    need(codec, "header", raw, _HEADER.size)
    b0, page_code, length = _HEADER.unpack_from(raw)
    if expected_page_code is not None and page_code != expected_page_code:
        raise BadMagicError(codec, "PAGE CODE", hex(expected_page_code), hex(page_code))
    need(codec, f"page (PAGE LENGTH {length})", raw, _HEADER.size + length)
    return VpdPage(page_code, raw[4:4 + length], b0 & 0x1F, b0 >> 5)


# -- 0x00 supported VPD pages (SPC-4 7.8.14) -------------------------------------


@dataclass(frozen=True)
class SupportedVpdPages:
    """VPD page 0x00: the page codes the device supports, ascending."""

    page_codes: tuple[int, ...]


def encode_supported_vpd_pages(page: SupportedVpdPages, *,
                               peripheral_device_type: int = 0) -> bytes:
    """Array side: VPD 0x00; the list must be strictly ascending (SPC-4 7.8.14)."""
    codes = tuple(page.page_codes)
    for code in codes:
        check_uint("VPD page 0x00", "page code", code, 8)
    if any(a >= b for a, b in zip(codes, codes[1:])):
        raise EncodeError(f"VPD page 0x00: page codes must be strictly ascending: {codes}")
    return encode_vpd_page(VpdPageCode.SUPPORTED_VPD_PAGES, bytes(codes),
                           peripheral_device_type=peripheral_device_type)


def decode_supported_vpd_pages(data: Buffer) -> SupportedVpdPages:
    """Host side: decode VPD 0x00 (order as sent; not checked)."""
    return SupportedVpdPages(tuple(decode_vpd_page(data, VpdPageCode.SUPPORTED_VPD_PAGES).payload))


# -- 0x80 unit serial number (SPC-4 7.8.15) --------------------------------------


@dataclass(frozen=True)
class UnitSerialNumberVpd:
    """VPD page 0x80: PRODUCT SERIAL NUMBER, trimmed of padding."""

    serial_number: str


def encode_unit_serial_number_vpd(page: UnitSerialNumberVpd, *,
                                  peripheral_device_type: int = 0) -> bytes:
    """Array side: VPD 0x80 carrying the serial as printable ASCII, unpadded."""
    raw = encode_ascii("VPD page 0x80", "PRODUCT SERIAL NUMBER", page.serial_number)
    if len(raw) > 0xFFFF:
        raise EncodeError("VPD page 0x80: serial number too long")
    return encode_vpd_page(VpdPageCode.UNIT_SERIAL_NUMBER, raw,
                           peripheral_device_type=peripheral_device_type)


def decode_unit_serial_number_vpd(data: Buffer) -> UnitSerialNumberVpd:
    """Host side: decode VPD 0x80; NUL-terminated (LIO) and space-padded serials both trim."""
    payload = decode_vpd_page(data, VpdPageCode.UNIT_SERIAL_NUMBER).payload
    return UnitSerialNumberVpd(decode_ascii(payload).lstrip(" "))


# -- 0x83 device identification (SPC-4 7.8.6) -----------------------------------

_DI_CODEC = "VPD page 0x83"
_DESIGNATOR_HEADER = struct.Struct(">BBxB")  # proto|code set, PIV|assoc|type, -, length


@dataclass(frozen=True)
class NaaIdentifier:
    """An NAA designator value (SPC-4 7.8.6.6).

    Formats: 2 (IEEE extended, 8 bytes), 3 (locally assigned, 8 bytes),
    5 (IEEE registered, 8 bytes), 6 (IEEE registered extended, 16 bytes).
    ``company_id`` is the 24-bit IEEE OUI (0 for format 3);
    ``vendor_specific_id`` is 36 bits (60 for format 3; for format 2 it is
    VENDOR SPECIFIC IDENTIFIER A (12 bits) then B (24 bits));
    ``vendor_specific_extension`` is the 64-bit extension of format 6.
    """

    naa_format: int
    company_id: int
    vendor_specific_id: int
    vendor_specific_extension: int = 0

    def to_bytes(self) -> bytes:
        """The 8- or 16-byte designator value."""
        f = self.naa_format
        if f == 3:
            check_uint(_DI_CODEC, "NAA 3 locally administered value", self.vendor_specific_id, 60)
            if self.company_id or self.vendor_specific_extension:
                raise EncodeError(f"{_DI_CODEC}: NAA 3 has no company id or extension")
            return ((3 << 60) | self.vendor_specific_id).to_bytes(8, "big")
        if f not in (2, 5, 6):
            raise EncodeError(f"{_DI_CODEC}: NAA format must be 2, 3, 5 or 6, got {f!r}")
        check_uint(_DI_CODEC, "NAA IEEE COMPANY ID", self.company_id, 24)
        check_uint(_DI_CODEC, "NAA VENDOR SPECIFIC IDENTIFIER", self.vendor_specific_id, 36)
        check_uint(_DI_CODEC, "NAA VENDOR SPECIFIC IDENTIFIER EXTENSION",
                   self.vendor_specific_extension, 64)
        if f != 6 and self.vendor_specific_extension:
            raise EncodeError(f"{_DI_CODEC}: only NAA 6 has an extension")
        if f == 2:
            vs_a, vs_b = self.vendor_specific_id >> 24, self.vendor_specific_id & 0xFFFFFF
            return ((2 << 60) | (vs_a << 48) | (self.company_id << 24) | vs_b).to_bytes(8, "big")
        head = ((f << 60) | (self.company_id << 36) | self.vendor_specific_id).to_bytes(8, "big")
        return head + (self.vendor_specific_extension.to_bytes(8, "big") if f == 6 else b"")

    @classmethod
    def from_bytes(cls, value: bytes) -> NaaIdentifier:
        """Decode an NAA value; a length not matching its format is ValueRangeError."""
        if not value:
            raise ValueRangeError(_DI_CODEC, "NAA designator length", "8 or 16", 0)
        f = value[0] >> 4
        expected = {2: 8, 3: 8, 5: 8, 6: 16}.get(f)
        if expected is None:
            raise ValueRangeError(_DI_CODEC, "NAA field", "2, 3, 5 or 6", f)
        if len(value) != expected:
            raise ValueRangeError(_DI_CODEC, f"NAA {f} designator length", expected, len(value))
        head = int.from_bytes(value[:8], "big")
        if f == 3:
            return cls(3, 0, head & ((1 << 60) - 1))
        if f == 2:
            vs_a, oui, vs_b = (head >> 48) & 0xFFF, (head >> 24) & 0xFFFFFF, head & 0xFFFFFF
            return cls(2, oui, (vs_a << 24) | vs_b)
        ext = int.from_bytes(value[8:16], "big") if f == 6 else 0
        return cls(f, (head >> 36) & 0xFFFFFF, head & ((1 << 36) - 1), ext)

    @property
    def hex(self) -> str:
        """Lower-case hex of the value, e.g. ``6001405...`` (32 digits for NAA 6)."""
        return self.to_bytes().hex()

    @property
    def wwid(self) -> str:
        """The identifier as udev/multipath show it: ``3`` (NAA type) followed by the hex."""
        return "3" + self.hex


@dataclass(frozen=True)
class T10VendorIdentifier:
    """A T10 vendor ID designator value: 8-char vendor, then vendor-specific bytes."""

    vendor: str
    vendor_specific_identifier: bytes


@dataclass(frozen=True, kw_only=True)
class Designator:
    """One designation descriptor of VPD 0x83, with its raw value.

    Typed views (``naa``, ``relative_target_port_id``, ...) decode the value
    on access and raise BadMagicError for the wrong designator type and
    ValueRangeError for a malformed value.
    """

    designator_type: DesignatorType | int
    value: bytes
    association: Association | int = Association.LOGICAL_UNIT
    code_set: CodeSet | int = CodeSet.BINARY
    protocol_id: ProtocolId | int = 0
    piv: bool = False

    def _expect(self, designator_type: DesignatorType) -> bytes:
        if self.designator_type != designator_type:
            raise BadMagicError(_DI_CODEC, "DESIGNATOR TYPE", designator_type.name,
                                self.designator_type)
        return self.value

    def _port_u16(self, designator_type: DesignatorType) -> int:
        value = self._expect(designator_type)
        if len(value) != 4:
            raise ValueRangeError(_DI_CODEC, f"{designator_type.name} DESIGNATOR LENGTH", 4,
                                  len(value))
        return int.from_bytes(value[2:4], "big")

    @property
    def naa(self) -> NaaIdentifier:
        """The NAA value of an NAA designator (type 3)."""
        return NaaIdentifier.from_bytes(self._expect(DesignatorType.NAA))

    @property
    def t10_vendor_id(self) -> T10VendorIdentifier:
        """The vendor and vendor-specific part of a T10 vendor ID designator (type 1)."""
        value = self._expect(DesignatorType.T10_VENDOR_ID)
        if len(value) < 8:
            raise ValueRangeError(_DI_CODEC, "T10 VENDOR ID DESIGNATOR LENGTH", ">= 8",
                                  len(value))
        return T10VendorIdentifier(decode_ascii(value[:8]), value[8:])

    @property
    def relative_target_port_id(self) -> int:
        """RELATIVE TARGET PORT IDENTIFIER of a type 4 designator (bytes 2-3)."""
        return self._port_u16(DesignatorType.RELATIVE_TARGET_PORT)

    @property
    def target_port_group_id(self) -> int:
        """TARGET PORT GROUP of a type 5 designator (bytes 2-3)."""
        return self._port_u16(DesignatorType.TARGET_PORT_GROUP)

    @property
    def logical_unit_group_id(self) -> int:
        """LOGICAL UNIT GROUP of a type 6 designator (bytes 2-3)."""
        return self._port_u16(DesignatorType.LOGICAL_UNIT_GROUP)

    @property
    def scsi_name(self) -> str:
        """The UTF-8 SCSI NAME STRING of a type 8 designator, without its NUL padding."""
        value = self._expect(DesignatorType.SCSI_NAME_STRING)
        try:
            return value.split(b"\x00", 1)[0].decode("utf-8")
        except UnicodeDecodeError:
            raise ValueRangeError(_DI_CODEC, "SCSI NAME STRING", "UTF-8", value.hex()) from None


@dataclass(frozen=True)
class DeviceIdentificationVpd:
    """VPD page 0x83: the designation descriptors, in the order sent."""

    designators: tuple[Designator, ...]

    def find(self, designator_type: int, association: int | None = None
             ) -> tuple[Designator, ...]:
        """Designators of a type (and, if given, an association)."""
        return tuple(d for d in self.designators if d.designator_type == designator_type
                     and (association is None or d.association == association))

    def logical_unit_naa(self) -> NaaIdentifier | None:
        """The logical unit's NAA, preferring format 6, then 5, 2, 3 (as udev's scsi_id ranks)."""
        rank = {6: 0, 5: 1, 2: 2, 3: 3}
        best = None
        for d in self.find(DesignatorType.NAA, Association.LOGICAL_UNIT):
            naa = d.naa
            if best is None or rank[naa.naa_format] < rank[best.naa_format]:
                best = naa
        return best

    def relative_target_port_id(self) -> int | None:
        """The relative target port identifier of the port that answered, if reported."""
        found = self.find(DesignatorType.RELATIVE_TARGET_PORT, Association.TARGET_PORT)
        return found[0].relative_target_port_id if found else None

    def target_port_group_id(self) -> int | None:
        """The target port group of the port that answered, if reported."""
        found = self.find(DesignatorType.TARGET_PORT_GROUP, Association.TARGET_PORT)
        return found[0].target_port_group_id if found else None


def naa_designator(naa: NaaIdentifier, *, association: int = Association.LOGICAL_UNIT
                   ) -> Designator:
    """A binary NAA designator (type 3), by default for the logical unit (as LIO sends)."""
    return Designator(designator_type=DesignatorType.NAA, value=naa.to_bytes(),
                      association=association, code_set=CodeSet.BINARY)


def t10_vendor_id_designator(vendor: str, vendor_specific_identifier: bytes | str
                             ) -> Designator:
    """An ASCII T10 vendor ID designator (type 1): vendor padded to 8, then the identifier."""
    vsi = vendor_specific_identifier
    if isinstance(vsi, str):
        vsi = encode_ascii(_DI_CODEC, "VENDOR SPECIFIC IDENTIFIER", vsi)
    value = encode_ascii(_DI_CODEC, "T10 VENDOR IDENTIFICATION", vendor, 8) + bytes(vsi)
    return Designator(designator_type=DesignatorType.T10_VENDOR_ID, value=value,
                      code_set=CodeSet.ASCII)


def _port_designator(designator_type: DesignatorType, field: str, number: int,
                     association: int, protocol_id: int, piv: bool) -> Designator:
    check_uint(_DI_CODEC, field, number, 16)
    return Designator(designator_type=designator_type, value=number.to_bytes(4, "big"),
                      association=association, code_set=CodeSet.BINARY,
                      protocol_id=protocol_id, piv=piv)


def relative_target_port_designator(relative_target_port_id: int, *,
                                    protocol_id: int = ProtocolId.ISCSI,
                                    piv: bool = True) -> Designator:
    """Relative target port designator (type 4, association target port), as LIO sends."""
    return _port_designator(DesignatorType.RELATIVE_TARGET_PORT,
                            "RELATIVE TARGET PORT IDENTIFIER", relative_target_port_id,
                            Association.TARGET_PORT, protocol_id, piv)


def target_port_group_designator(target_port_group_id: int, *,
                                 protocol_id: int = ProtocolId.ISCSI,
                                 piv: bool = True) -> Designator:
    """Target port group designator (type 5, association target port), as LIO sends."""
    return _port_designator(DesignatorType.TARGET_PORT_GROUP, "TARGET PORT GROUP",
                            target_port_group_id, Association.TARGET_PORT, protocol_id, piv)


def logical_unit_group_designator(logical_unit_group_id: int) -> Designator:
    """Logical unit group designator (type 6, association logical unit)."""
    return _port_designator(DesignatorType.LOGICAL_UNIT_GROUP, "LOGICAL UNIT GROUP",
                            logical_unit_group_id, Association.LOGICAL_UNIT, 0, False)


def scsi_name_string_designator(name: str, *, association: int = Association.TARGET_PORT,
                                protocol_id: int = ProtocolId.ISCSI,
                                piv: bool = True) -> Designator:
    """SCSI name string designator (type 8): UTF-8, NUL-terminated, padded to 4, <= 256 bytes.

    E.g. ``"iqn.2003-01.org.example:vol,t,0x0001"`` for a target port, or the
    bare IQN with ``association=Association.TARGET_DEVICE`` (LIO sends both).
    """
    if not isinstance(name, str) or "\x00" in name:
        raise EncodeError(f"{_DI_CODEC}: SCSI NAME STRING must be a str without NUL")
    raw = name.encode("utf-8") + b"\x00"
    raw += bytes(-len(raw) % 4)
    if len(raw) > 256:
        raise EncodeError(f"{_DI_CODEC}: SCSI NAME STRING is {len(raw)} bytes padded, max 256")
    return Designator(designator_type=DesignatorType.SCSI_NAME_STRING, value=raw,
                      association=association, code_set=CodeSet.UTF8,
                      protocol_id=protocol_id, piv=piv)


def encode_device_identification_vpd(page: DeviceIdentificationVpd, *,
                                     peripheral_device_type: int = 0) -> bytes:
    """Array side: VPD 0x83 from its designators."""
    body = bytearray()
    for i, d in enumerate(page.designators):
        field = f"designator {i}"
        check_uint(_DI_CODEC, f"{field} PROTOCOL IDENTIFIER", d.protocol_id, 4)
        check_uint(_DI_CODEC, f"{field} CODE SET", d.code_set, 4)
        check_uint(_DI_CODEC, f"{field} ASSOCIATION", d.association, 2)
        check_uint(_DI_CODEC, f"{field} DESIGNATOR TYPE", d.designator_type, 4)
        value = check_bytes(_DI_CODEC, f"{field} value", d.value, 255)
        body += _DESIGNATOR_HEADER.pack(
            (d.protocol_id << 4) | d.code_set,
            (0x80 if d.piv else 0) | (d.association << 4) | d.designator_type,
            len(value),
        ) + value
    if len(body) > 0xFFFF:
        raise EncodeError(f"{_DI_CODEC}: {len(body)} bytes of designators exceed 65535")
    return encode_vpd_page(VpdPageCode.DEVICE_IDENTIFICATION, bytes(body),
                           peripheral_device_type=peripheral_device_type)


def decode_device_identification_vpd(data: Buffer) -> DeviceIdentificationVpd:
    """Host side: split VPD 0x83 into designators; a descriptor overrunning the page raises."""
    payload = decode_vpd_page(data, VpdPageCode.DEVICE_IDENTIFICATION).payload
    designators: list[Designator] = []
    offset = 0
    while offset < len(payload):
        field = f"designator {len(designators)}"
        if offset + _DESIGNATOR_HEADER.size > len(payload):
            raise ValueRangeError(_DI_CODEC, f"{field} header", "4 bytes", len(payload) - offset)
        b0, b1, length = _DESIGNATOR_HEADER.unpack_from(payload, offset)
        offset += _DESIGNATOR_HEADER.size
        if offset + length > len(payload):
            raise ValueRangeError(_DI_CODEC, f"{field} DESIGNATOR LENGTH",
                                  f"<= {len(payload) - offset}", length)
        designators.append(Designator(
            designator_type=enum_or_int(DesignatorType, b1 & 0x0F),
            value=payload[offset:offset + length],
            association=enum_or_int(Association, (b1 >> 4) & 0x03),
            code_set=enum_or_int(CodeSet, b0 & 0x0F),
            protocol_id=enum_or_int(ProtocolId, b0 >> 4),
            piv=bool(b1 & 0x80),
        ))
        offset += length
    return DeviceIdentificationVpd(tuple(designators))


# -- 0xB0 block limits (SBC-3 6.5.3) --------------------------------------------

_BL_CODEC = "VPD page 0xb0"
# WSNZ, MAX COMPARE AND WRITE, OTLG, MTL, OTL, max prefetch, max unmap LBA count,
# max unmap descriptor count, optimal unmap granularity, UGAVALID|alignment, max write same
_BLOCK_LIMITS = struct.Struct(">BBHIIIIIIIQ")
BLOCK_LIMITS_PAGE_LENGTH = 0x3C
_BL_MIN_PAGE_LENGTH = 0x0C  # SBC-2 era pages stop after OPTIMAL TRANSFER LENGTH


@dataclass(frozen=True, kw_only=True)
class BlockLimitsVpd:
    """VPD page 0xB0 (SBC-3 6.5.3); 0 means "not reported" for every limit."""

    write_same_non_zero: bool = False
    maximum_compare_and_write_length_blocks: int = 0
    optimal_transfer_length_granularity_blocks: int = 0
    maximum_transfer_length_blocks: int = 0
    optimal_transfer_length_blocks: int = 0
    maximum_prefetch_length_blocks: int = 0
    maximum_unmap_lba_count: int = 0
    maximum_unmap_block_descriptor_count: int = 0
    optimal_unmap_granularity_blocks: int = 0
    unmap_granularity_alignment_valid: bool = False
    unmap_granularity_alignment_blocks: int = 0
    maximum_write_same_length_blocks: int = 0


def encode_block_limits_vpd(page: BlockLimitsVpd, *, peripheral_device_type: int = 0) -> bytes:
    """Array side: VPD 0xB0 with PAGE LENGTH 0x3C (64 bytes, as LIO with thin provisioning)."""
    p = page
    c = _BL_CODEC
    check_uint(c, "MAXIMUM COMPARE AND WRITE LENGTH", p.maximum_compare_and_write_length_blocks, 8)
    check_uint(c, "OPTIMAL TRANSFER LENGTH GRANULARITY",
               p.optimal_transfer_length_granularity_blocks, 16)
    for name, value in (
        ("MAXIMUM TRANSFER LENGTH", p.maximum_transfer_length_blocks),
        ("OPTIMAL TRANSFER LENGTH", p.optimal_transfer_length_blocks),
        ("MAXIMUM PREFETCH LENGTH", p.maximum_prefetch_length_blocks),
        ("MAXIMUM UNMAP LBA COUNT", p.maximum_unmap_lba_count),
        ("MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT", p.maximum_unmap_block_descriptor_count),
        ("OPTIMAL UNMAP GRANULARITY", p.optimal_unmap_granularity_blocks),
    ):
        check_uint(c, name, value, 32)
    check_uint(c, "UNMAP GRANULARITY ALIGNMENT", p.unmap_granularity_alignment_blocks, 31)
    check_uint(c, "MAXIMUM WRITE SAME LENGTH", p.maximum_write_same_length_blocks, 64)
    body = _BLOCK_LIMITS.pack(
        0x01 if p.write_same_non_zero else 0,
        p.maximum_compare_and_write_length_blocks,
        p.optimal_transfer_length_granularity_blocks,
        p.maximum_transfer_length_blocks,
        p.optimal_transfer_length_blocks,
        p.maximum_prefetch_length_blocks,
        p.maximum_unmap_lba_count,
        p.maximum_unmap_block_descriptor_count,
        p.optimal_unmap_granularity_blocks,
        (0x80000000 if p.unmap_granularity_alignment_valid else 0)
        | p.unmap_granularity_alignment_blocks,
        p.maximum_write_same_length_blocks,
    )
    body = body.ljust(BLOCK_LIMITS_PAGE_LENGTH, b"\x00")
    return encode_vpd_page(VpdPageCode.BLOCK_LIMITS, body,
                           peripheral_device_type=peripheral_device_type)


def decode_block_limits_vpd(data: Buffer) -> BlockLimitsVpd:
    """Host side: decode VPD 0xB0; fields past a short PAGE LENGTH (LIO's 0x10) read as 0."""
    payload = decode_vpd_page(data, VpdPageCode.BLOCK_LIMITS).payload
    if len(payload) < _BL_MIN_PAGE_LENGTH:
        raise ValueRangeError(_BL_CODEC, "PAGE LENGTH", f">= {_BL_MIN_PAGE_LENGTH}",
                              len(payload))
    padded = payload[:_BLOCK_LIMITS.size].ljust(_BLOCK_LIMITS.size, b"\x00")
    (wsnz, mcawl, otlg, mtl, otl, prefetch, unmap_lbas, unmap_descs, oug, uga,
     mwsl) = _BLOCK_LIMITS.unpack(padded)
    return BlockLimitsVpd(
        write_same_non_zero=bool(wsnz & 0x01),
        maximum_compare_and_write_length_blocks=mcawl,
        optimal_transfer_length_granularity_blocks=otlg,
        maximum_transfer_length_blocks=mtl,
        optimal_transfer_length_blocks=otl,
        maximum_prefetch_length_blocks=prefetch,
        maximum_unmap_lba_count=unmap_lbas,
        maximum_unmap_block_descriptor_count=unmap_descs,
        optimal_unmap_granularity_blocks=oug,
        unmap_granularity_alignment_valid=bool(uga & 0x80000000),
        unmap_granularity_alignment_blocks=uga & 0x7FFFFFFF,
        maximum_write_same_length_blocks=mwsl,
    )


# -- 0xB3 referrals (SBC-3 6.5.5) -------------------------------------------------

_REF_CODEC = "VPD page 0xb3"
_REFERRALS = struct.Struct(">4xII")  # reserved, USER DATA SEGMENT SIZE, ... MULTIPLIER
REFERRALS_PAGE_LENGTH = _REFERRALS.size  # 0x0C, as LIO's spc_emulate_evpd_b3


@dataclass(frozen=True)
class ReferralsVpd:
    """VPD page 0xB3: how user data segments are laid out (SBC-3 4.26.4).

    With a multiplier of 0 the segment boundaries come only from REPORT
    REFERRALS; otherwise segments of ``user_data_segment_size_blocks`` repeat
    every ``size * multiplier`` blocks.
    """

    user_data_segment_size_blocks: int
    user_data_segment_multiplier: int


def encode_referrals_vpd(page: ReferralsVpd, *, peripheral_device_type: int = 0) -> bytes:
    """Array side: VPD 0xB3 (16 bytes)."""
    check_uint(_REF_CODEC, "USER DATA SEGMENT SIZE", page.user_data_segment_size_blocks, 32)
    check_uint(_REF_CODEC, "USER DATA SEGMENT MULTIPLIER", page.user_data_segment_multiplier, 32)
    body = _REFERRALS.pack(page.user_data_segment_size_blocks, page.user_data_segment_multiplier)
    return encode_vpd_page(VpdPageCode.REFERRALS, body,
                           peripheral_device_type=peripheral_device_type)


def decode_referrals_vpd(data: Buffer) -> ReferralsVpd:
    """Host side: decode VPD 0xB3."""
    payload = decode_vpd_page(data, VpdPageCode.REFERRALS).payload
    if len(payload) < REFERRALS_PAGE_LENGTH:
        raise ValueRangeError(_REF_CODEC, "PAGE LENGTH", f">= {REFERRALS_PAGE_LENGTH}",
                              len(payload))
    size, multiplier = _REFERRALS.unpack_from(payload)
    return ReferralsVpd(size, multiplier)
