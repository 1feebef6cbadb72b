"""CDB builders (host side) and parsers (emulated array side).

Layouts are SPC-4 section 6 / SBC-3 section 5, cross-checked against
sg3_utils lib/sg_cmds_*.c (builders) and the kernel target's
drivers/target/target_core_{spc,sbc}.c (parsers). Parsers accept a buffer
longer than the CDB (an iSCSI SCSI Command PDU pads every CDB to 16 bytes)
and ignore the excess and the CONTROL byte. Reserved bits are not checked;
the field combinations SPC/SBC tell a device server to reject are, with
ValueRangeError, which an array maps to INVALID FIELD IN CDB.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from protocol.errors import BadMagicError, EncodeError, ValueRangeError
from protocol.scsi._wire import Buffer, check_uint, need
from protocol.scsi.constants import MaintenanceIn, Opcode, PageControl, ServiceActionIn16

__all__ = [
    "InquiryCdb", "build_inquiry_cdb", "parse_inquiry_cdb",
    "build_test_unit_ready_cdb", "parse_test_unit_ready_cdb",
    "ReadCapacity10Cdb", "build_read_capacity_10_cdb", "parse_read_capacity_10_cdb",
    "ReadCapacity16Cdb", "build_read_capacity_16_cdb", "parse_read_capacity_16_cdb",
    "ReportReferralsCdb", "build_report_referrals_cdb", "parse_report_referrals_cdb",
    "ReadWriteCdb", "build_read_10_cdb", "build_write_10_cdb", "build_read_16_cdb",
    "build_write_16_cdb", "build_read_write_cdb", "parse_read_write_cdb",
    "SynchronizeCache10Cdb", "build_synchronize_cache_10_cdb",
    "parse_synchronize_cache_10_cdb",
    "SynchronizeCache16Cdb", "build_synchronize_cache_16_cdb",
    "parse_synchronize_cache_16_cdb",
    "RequestSenseCdb", "build_request_sense_cdb", "parse_request_sense_cdb",
    "StartStopUnitCdb", "build_start_stop_unit_cdb", "parse_start_stop_unit_cdb",
    "ModeSenseCdb", "build_mode_sense_6_cdb", "build_mode_sense_10_cdb",
    "parse_mode_sense_6_cdb", "parse_mode_sense_10_cdb",
    "ReportTargetPortGroupsCdb", "build_report_target_port_groups_cdb",
    "parse_report_target_port_groups_cdb",
]


def _cdb(codec: str, cdb: Buffer, opcode: int, length: int) -> bytes:
    """Check the opcode and length of a CDB; return its first ``length`` bytes."""
    raw = bytes(cdb)
    need(codec, "CDB", raw, length)
    if raw[0] != opcode:
        raise BadMagicError(codec, "OPERATION CODE", hex(opcode), hex(raw[0]))
    return raw[:length]


def _service_action(codec: str, raw: bytes, service_action: int) -> None:
    """Check SERVICE ACTION, CDB byte 1 bits 4-0 (SPC-4 4.2.5.2)."""
    if raw[1] & 0x1F != service_action:
        raise BadMagicError(codec, "SERVICE ACTION", hex(service_action), hex(raw[1] & 0x1F))


# -- INQUIRY (SPC-4 6.6.1) ---------------------------------------------------

_INQUIRY = struct.Struct(">BBBHB")  # opcode, EVPD (bit 0), page code, allocation length, control


@dataclass(frozen=True)
class InquiryCdb:
    """INQUIRY CDB: standard data (evpd False) or the VPD page ``page_code``."""

    evpd: bool
    page_code: int
    allocation_length_bytes: int


def build_inquiry_cdb(
    *, evpd: bool = False, page_code: int = 0, allocation_length_bytes: int = 36
) -> bytes:
    """6-byte INQUIRY. EVPD 0 with a non-zero page code is invalid (SPC-4 6.6.1)."""
    codec = "INQUIRY CDB"
    check_uint(codec, "PAGE CODE", page_code, 8)
    check_uint(codec, "ALLOCATION LENGTH", allocation_length_bytes, 16)
    if not evpd and page_code:
        raise EncodeError(f"{codec}: PAGE CODE must be 0 without EVPD, got {page_code:#x}")
    return _INQUIRY.pack(Opcode.INQUIRY, int(bool(evpd)), page_code, allocation_length_bytes, 0)


def parse_inquiry_cdb(cdb: Buffer) -> InquiryCdb:
    """Parse INQUIRY; EVPD 0 with PAGE CODE != 0 is ValueRangeError (LIO spc_emulate_inquiry)."""
    codec = "INQUIRY CDB"
    raw = _cdb(codec, cdb, Opcode.INQUIRY, 6)
    _, flags, page_code, allocation_length, _ = _INQUIRY.unpack(raw)
    evpd = bool(flags & 0x01)
    if not evpd and page_code:
        raise ValueRangeError(codec, "PAGE CODE (EVPD=0)", 0, page_code)
    return InquiryCdb(evpd, page_code, allocation_length)


# -- TEST UNIT READY (SPC-4 6.47) ---------------------------------------------


def build_test_unit_ready_cdb() -> bytes:
    """6-byte TEST UNIT READY: opcode 0 and five zero bytes."""
    return bytes(6)


def parse_test_unit_ready_cdb(cdb: Buffer) -> None:
    """Check that ``cdb`` is a TEST UNIT READY (it carries no fields)."""
    _cdb("TEST UNIT READY CDB", cdb, Opcode.TEST_UNIT_READY, 6)


# -- READ CAPACITY (10) (SBC-3 5.15) -----------------------------------------

_RC10 = struct.Struct(">BBIHBB")  # opcode, reserved, LBA (obsolete), reserved, PMI (bit 0), control


@dataclass(frozen=True)
class ReadCapacity10Cdb:
    """READ CAPACITY(10) CDB; ``lba`` and ``pmi`` are obsolete in SBC-3 and normally 0."""

    lba: int = 0
    pmi: bool = False


def build_read_capacity_10_cdb() -> bytes:
    """10-byte READ CAPACITY(10) with LBA 0 and PMI 0."""
    return _RC10.pack(Opcode.READ_CAPACITY_10, 0, 0, 0, 0, 0)


def parse_read_capacity_10_cdb(cdb: Buffer) -> ReadCapacity10Cdb:
    """Parse READ CAPACITY(10); a non-zero LBA without PMI is ValueRangeError (SBC-3 5.15.1)."""
    codec = "READ CAPACITY(10) CDB"
    raw = _cdb(codec, cdb, Opcode.READ_CAPACITY_10, 10)
    _, _, lba, _, pmi_byte, _ = _RC10.unpack(raw)
    pmi = bool(pmi_byte & 0x01)
    if lba and not pmi:
        raise ValueRangeError(codec, "LOGICAL BLOCK ADDRESS (PMI=0)", 0, lba)
    return ReadCapacity10Cdb(lba, pmi)


# -- SERVICE ACTION IN(16): READ CAPACITY(16), REPORT REFERRALS ---------------

# opcode, service action, LBA, allocation length, flags (PMI / ONE_SEG bit 0), control
_SAI16 = struct.Struct(">BBQIBB")


@dataclass(frozen=True)
class ReadCapacity16Cdb:
    """READ CAPACITY(16) CDB (SBC-3 5.16)."""

    allocation_length_bytes: int
    lba: int = 0
    pmi: bool = False


def build_read_capacity_16_cdb(allocation_length_bytes: int = 32) -> bytes:
    """16-byte READ CAPACITY(16) (SERVICE ACTION IN(16), service action 0x10)."""
    check_uint("READ CAPACITY(16) CDB", "ALLOCATION LENGTH", allocation_length_bytes, 32)
    return _SAI16.pack(
        Opcode.SERVICE_ACTION_IN_16, ServiceActionIn16.READ_CAPACITY_16, 0,
        allocation_length_bytes, 0, 0,
    )


def parse_read_capacity_16_cdb(cdb: Buffer) -> ReadCapacity16Cdb:
    """Parse READ CAPACITY(16); a non-zero LBA without PMI is ValueRangeError."""
    codec = "READ CAPACITY(16) CDB"
    raw = _cdb(codec, cdb, Opcode.SERVICE_ACTION_IN_16, 16)
    _service_action(codec, raw, ServiceActionIn16.READ_CAPACITY_16)
    _, _, lba, allocation_length, flags, _ = _SAI16.unpack(raw)
    pmi = bool(flags & 0x01)
    if lba and not pmi:
        raise ValueRangeError(codec, "LOGICAL BLOCK ADDRESS (PMI=0)", 0, lba)
    return ReadCapacity16Cdb(allocation_length, lba, pmi)


@dataclass(frozen=True)
class ReportReferralsCdb:
    """REPORT REFERRALS CDB (SBC-3 5.21): segments from ``lba`` on, or just its own."""

    lba: int
    allocation_length_bytes: int
    one_segment: bool = False


def build_report_referrals_cdb(
    lba: int = 0, allocation_length_bytes: int = 4096, *, one_segment: bool = False
) -> bytes:
    """16-byte REPORT REFERRALS (sa 0x13), as sg3_utils sg_ll_report_referrals builds it."""
    codec = "REPORT REFERRALS CDB"
    check_uint(codec, "LOGICAL BLOCK ADDRESS", lba, 64)
    check_uint(codec, "ALLOCATION LENGTH", allocation_length_bytes, 32)
    return _SAI16.pack(
        Opcode.SERVICE_ACTION_IN_16, ServiceActionIn16.REPORT_REFERRALS, lba,
        allocation_length_bytes, 0x01 if one_segment else 0, 0,
    )


def parse_report_referrals_cdb(cdb: Buffer) -> ReportReferralsCdb:
    """Parse REPORT REFERRALS (SERVICE ACTION IN(16), service action 0x13)."""
    codec = "REPORT REFERRALS CDB"
    raw = _cdb(codec, cdb, Opcode.SERVICE_ACTION_IN_16, 16)
    _service_action(codec, raw, ServiceActionIn16.REPORT_REFERRALS)
    _, _, lba, allocation_length, flags, _ = _SAI16.unpack(raw)
    return ReportReferralsCdb(lba, allocation_length, bool(flags & 0x01))


# -- READ/WRITE (10) and (16) (SBC-3 5.11, 5.13, 5.32, 5.34) -------------------

_RW10 = struct.Struct(">BBIBHB")  # opcode, flags, LBA, group number, transfer length, control
_RW16 = struct.Struct(">BBQIBB")  # opcode, flags, LBA, transfer length, group number, control
_DPO = 0x10  # byte 1 bit 4
_FUA = 0x08  # byte 1 bit 3
_RW_SHAPES = {
    Opcode.READ_10: (_RW10, 32, 16),
    Opcode.WRITE_10: (_RW10, 32, 16),
    Opcode.READ_16: (_RW16, 64, 32),
    Opcode.WRITE_16: (_RW16, 64, 32),
}


@dataclass(frozen=True)
class ReadWriteCdb:
    """A READ or WRITE (10)/(16) CDB. A transfer length of 0 moves no blocks."""

    opcode: Opcode
    lba: int
    transfer_length_blocks: int
    fua: bool = False
    dpo: bool = False
    group_number: int = 0

    @property
    def is_write(self) -> bool:
        """True for WRITE(10)/(16)."""
        return self.opcode in (Opcode.WRITE_10, Opcode.WRITE_16)


def _build_rw(
    opcode: Opcode, lba: int, transfer_length_blocks: int, fua: bool, dpo: bool
) -> bytes:
    shape, lba_bits, length_bits = _RW_SHAPES[opcode]
    codec = f"{opcode.name} CDB"
    check_uint(codec, "LOGICAL BLOCK ADDRESS", lba, lba_bits)
    check_uint(codec, "TRANSFER LENGTH", transfer_length_blocks, length_bits)
    flags = (_FUA if fua else 0) | (_DPO if dpo else 0)
    if shape is _RW10:
        return shape.pack(opcode, flags, lba, 0, transfer_length_blocks, 0)
    return shape.pack(opcode, flags, lba, transfer_length_blocks, 0, 0)


def build_read_10_cdb(lba: int, transfer_length_blocks: int, *, fua: bool = False,
                      dpo: bool = False) -> bytes:
    """10-byte READ(10): 32-bit LBA, 16-bit transfer length."""
    return _build_rw(Opcode.READ_10, lba, transfer_length_blocks, fua, dpo)


def build_write_10_cdb(lba: int, transfer_length_blocks: int, *, fua: bool = False,
                       dpo: bool = False) -> bytes:
    """10-byte WRITE(10): 32-bit LBA, 16-bit transfer length."""
    return _build_rw(Opcode.WRITE_10, lba, transfer_length_blocks, fua, dpo)


def build_read_16_cdb(lba: int, transfer_length_blocks: int, *, fua: bool = False,
                      dpo: bool = False) -> bytes:
    """16-byte READ(16): 64-bit LBA, 32-bit transfer length."""
    return _build_rw(Opcode.READ_16, lba, transfer_length_blocks, fua, dpo)


def build_write_16_cdb(lba: int, transfer_length_blocks: int, *, fua: bool = False,
                       dpo: bool = False) -> bytes:
    """16-byte WRITE(16): 64-bit LBA, 32-bit transfer length."""
    return _build_rw(Opcode.WRITE_16, lba, transfer_length_blocks, fua, dpo)


def build_read_write_cdb(*, is_write: bool, lba: int, transfer_length_blocks: int,
                         fua: bool = False) -> bytes:
    """READ/WRITE(10) when the LBA fits 32 bits and the length 16 bits, else READ/WRITE(16)."""
    if lba <= 0xFFFFFFFF and transfer_length_blocks <= 0xFFFF:
        opcode = Opcode.WRITE_10 if is_write else Opcode.READ_10
    else:
        opcode = Opcode.WRITE_16 if is_write else Opcode.READ_16
    return _build_rw(opcode, lba, transfer_length_blocks, fua, False)


def parse_read_write_cdb(cdb: Buffer) -> ReadWriteCdb:
    """Parse READ(10), WRITE(10), READ(16) or WRITE(16); other opcodes are BadMagicError."""
    codec = "READ/WRITE CDB"
    raw = bytes(cdb)
    need(codec, "CDB", raw, 1)
    try:
        opcode = Opcode(raw[0])
        shape = _RW_SHAPES[opcode][0]
    except (ValueError, KeyError):
        raise BadMagicError(codec, "OPERATION CODE", "0x28, 0x2a, 0x88 or 0x8a",
                            hex(raw[0])) from None
    raw = _cdb(codec, raw, opcode, shape.size)
    if shape is _RW10:
        _, flags, lba, group, length, _ = shape.unpack(raw)
    else:
        _, flags, lba, length, group, _ = shape.unpack(raw)
    return ReadWriteCdb(opcode, lba, length, bool(flags & _FUA), bool(flags & _DPO),
                        group & 0x3F)


# -- SYNCHRONIZE CACHE (10) (SBC-3 5.22) ---------------------------------------

_SYNC10 = struct.Struct(">BBIBHB")  # opcode, IMMED (bit 1), LBA, group, number of blocks, control


@dataclass(frozen=True)
class SynchronizeCache10Cdb:
    """SYNCHRONIZE CACHE(10); ``block_count`` 0 means through the last LBA."""

    lba: int = 0
    block_count: int = 0
    immediate: bool = False


def build_synchronize_cache_10_cdb(lba: int = 0, block_count: int = 0, *,
                                   immediate: bool = False) -> bytes:
    """10-byte SYNCHRONIZE CACHE(10); the defaults flush the whole cache."""
    codec = "SYNCHRONIZE CACHE(10) CDB"
    check_uint(codec, "LOGICAL BLOCK ADDRESS", lba, 32)
    check_uint(codec, "NUMBER OF LOGICAL BLOCKS", block_count, 16)
    return _SYNC10.pack(Opcode.SYNCHRONIZE_CACHE_10, 0x02 if immediate else 0, lba, 0,
                        block_count, 0)


def parse_synchronize_cache_10_cdb(cdb: Buffer) -> SynchronizeCache10Cdb:
    """Parse SYNCHRONIZE CACHE(10)."""
    raw = _cdb("SYNCHRONIZE CACHE(10) CDB", cdb, Opcode.SYNCHRONIZE_CACHE_10, 10)
    _, flags, lba, _, block_count, _ = _SYNC10.unpack(raw)
    return SynchronizeCache10Cdb(lba, block_count, bool(flags & 0x02))


# -- SYNCHRONIZE CACHE (16) (SBC-3 5.23) ---------------------------------------

_SYNC16 = struct.Struct(">BBQIBB")  # opcode, IMMED (bit 1), LBA, number of blocks, group, control


@dataclass(frozen=True)
class SynchronizeCache16Cdb:
    """SYNCHRONIZE CACHE(16); ``block_count`` 0 means through the last LBA."""

    lba: int = 0
    block_count: int = 0
    immediate: bool = False


def build_synchronize_cache_16_cdb(lba: int = 0, block_count: int = 0, *,
                                   immediate: bool = False) -> bytes:
    """16-byte SYNCHRONIZE CACHE(16): 64-bit LBA, 32-bit block count."""
    codec = "SYNCHRONIZE CACHE(16) CDB"
    check_uint(codec, "LOGICAL BLOCK ADDRESS", lba, 64)
    check_uint(codec, "NUMBER OF LOGICAL BLOCKS", block_count, 32)
    return _SYNC16.pack(Opcode.SYNCHRONIZE_CACHE_16, 0x02 if immediate else 0, lba,
                        block_count, 0, 0)


def parse_synchronize_cache_16_cdb(cdb: Buffer) -> SynchronizeCache16Cdb:
    """Parse SYNCHRONIZE CACHE(16)."""
    raw = _cdb("SYNCHRONIZE CACHE(16) CDB", cdb, Opcode.SYNCHRONIZE_CACHE_16, 16)
    _, flags, lba, block_count, _, _ = _SYNC16.unpack(raw)
    return SynchronizeCache16Cdb(lba, block_count, bool(flags & 0x02))


# -- REQUEST SENSE (SPC-4 6.39) ----------------------------------------------------

_REQUEST_SENSE = struct.Struct(">BBxxBB")  # opcode, DESC (bit 0), -, allocation length, control


@dataclass(frozen=True)
class RequestSenseCdb:
    """REQUEST SENSE: ``descriptor_format`` is the DESC bit (which sense format to return)."""

    descriptor_format: bool
    allocation_length_bytes: int


def build_request_sense_cdb(*, descriptor_format: bool = False,
                            allocation_length_bytes: int = 252) -> bytes:
    """6-byte REQUEST SENSE; 252 is the allocation length SPC-4 recommends."""
    check_uint("REQUEST SENSE CDB", "ALLOCATION LENGTH", allocation_length_bytes, 8)
    return _REQUEST_SENSE.pack(Opcode.REQUEST_SENSE, 0x01 if descriptor_format else 0,
                               allocation_length_bytes, 0)


def parse_request_sense_cdb(cdb: Buffer) -> RequestSenseCdb:
    """Parse REQUEST SENSE."""
    raw = _cdb("REQUEST SENSE CDB", cdb, Opcode.REQUEST_SENSE, 6)
    _, flags, allocation_length, _ = _REQUEST_SENSE.unpack(raw)
    return RequestSenseCdb(bool(flags & 0x01), allocation_length)


# -- START STOP UNIT (SBC-3 5.25) --------------------------------------------------

# opcode, IMMED (bit 0), -, POWER CONDITION MODIFIER (3-0), POWER CONDITION (7-4)|LOEJ|START,
# control
_START_STOP = struct.Struct(">BBxBBB")


@dataclass(frozen=True)
class StartStopUnitCdb:
    """START STOP UNIT: ``start``/``load_eject`` bits and the POWER CONDITION field."""

    start: bool
    load_eject: bool = False
    immediate: bool = False
    power_condition: int = 0


def build_start_stop_unit_cdb(*, start: bool = True, load_eject: bool = False,
                              immediate: bool = False, power_condition: int = 0) -> bytes:
    """6-byte START STOP UNIT."""
    check_uint("START STOP UNIT CDB", "POWER CONDITION", power_condition, 4)
    byte4 = (power_condition << 4) | (0x02 if load_eject else 0) | (0x01 if start else 0)
    return _START_STOP.pack(Opcode.START_STOP_UNIT, 0x01 if immediate else 0, 0, byte4, 0)


def parse_start_stop_unit_cdb(cdb: Buffer) -> StartStopUnitCdb:
    """Parse START STOP UNIT."""
    raw = _cdb("START STOP UNIT CDB", cdb, Opcode.START_STOP_UNIT, 6)
    _, flags, _, byte4, _ = _START_STOP.unpack(raw)
    return StartStopUnitCdb(bool(byte4 & 0x01), bool(byte4 & 0x02), bool(flags & 0x01),
                            byte4 >> 4)


# -- MODE SENSE (6)/(10) (SPC-4 6.11, 6.12) ------------------------------------

_MS6 = struct.Struct(">BBBBBB")  # opcode, DBD (bit 3), PC|page, subpage, allocation length, control
_MS10 = struct.Struct(">BBBB3xHB")  # opcode, LLBAA (bit 4)|DBD, PC|page, subpage, -, alloc, control
_DBD = 0x08
_LLBAA = 0x10


@dataclass(frozen=True)
class ModeSenseCdb:
    """MODE SENSE(6) or (10); ``long_lba_accepted`` (LLBAA) exists only in the 10-byte form."""

    page_code: int
    subpage_code: int
    page_control: PageControl
    disable_block_descriptors: bool
    allocation_length_bytes: int
    long_lba_accepted: bool = False
    ten_byte: bool = False


def _page_byte(codec: str, page_code: int, subpage_code: int, page_control: int) -> int:
    check_uint(codec, "PAGE CODE", page_code, 6)
    check_uint(codec, "SUBPAGE CODE", subpage_code, 8)
    check_uint(codec, "PC", page_control, 2)
    return (page_control << 6) | page_code


def build_mode_sense_6_cdb(
    page_code: int, subpage_code: int = 0, *, page_control: int = PageControl.CURRENT,
    disable_block_descriptors: bool = False, allocation_length_bytes: int = 255,
) -> bytes:
    """6-byte MODE SENSE(6); the answer is at most 255 bytes."""
    codec = "MODE SENSE(6) CDB"
    page = _page_byte(codec, page_code, subpage_code, page_control)
    check_uint(codec, "ALLOCATION LENGTH", allocation_length_bytes, 8)
    return _MS6.pack(Opcode.MODE_SENSE_6, _DBD if disable_block_descriptors else 0, page,
                     subpage_code, allocation_length_bytes, 0)


def build_mode_sense_10_cdb(
    page_code: int, subpage_code: int = 0, *, page_control: int = PageControl.CURRENT,
    disable_block_descriptors: bool = False, long_lba_accepted: bool = False,
    allocation_length_bytes: int = 4096,
) -> bytes:
    """10-byte MODE SENSE(10)."""
    codec = "MODE SENSE(10) CDB"
    page = _page_byte(codec, page_code, subpage_code, page_control)
    check_uint(codec, "ALLOCATION LENGTH", allocation_length_bytes, 16)
    flags = (_DBD if disable_block_descriptors else 0) | (_LLBAA if long_lba_accepted else 0)
    return _MS10.pack(Opcode.MODE_SENSE_10, flags, page, subpage_code,
                      allocation_length_bytes, 0)


def parse_mode_sense_6_cdb(cdb: Buffer) -> ModeSenseCdb:
    """Parse MODE SENSE(6)."""
    raw = _cdb("MODE SENSE(6) CDB", cdb, Opcode.MODE_SENSE_6, 6)
    _, flags, page, subpage, allocation_length, _ = _MS6.unpack(raw)
    return ModeSenseCdb(page & 0x3F, subpage, PageControl(page >> 6), bool(flags & _DBD),
                        allocation_length)


def parse_mode_sense_10_cdb(cdb: Buffer) -> ModeSenseCdb:
    """Parse MODE SENSE(10)."""
    raw = _cdb("MODE SENSE(10) CDB", cdb, Opcode.MODE_SENSE_10, 10)
    _, flags, page, subpage, allocation_length, _ = _MS10.unpack(raw)
    return ModeSenseCdb(page & 0x3F, subpage, PageControl(page >> 6), bool(flags & _DBD),
                        allocation_length, bool(flags & _LLBAA), ten_byte=True)


# -- REPORT TARGET PORT GROUPS (SPC-4 6.36) ------------------------------------

_RTPG = struct.Struct(">BB4xIxB")  # opcode, format|service action, -, allocation length, -, control
_RTPG_EXTENDED = 0x20  # byte 1 bits 7-5 = 001b: extended header (target_core_alua.c ext_hdr)


@dataclass(frozen=True)
class ReportTargetPortGroupsCdb:
    """REPORT TARGET PORT GROUPS (MAINTENANCE IN, service action 0x0A)."""

    allocation_length_bytes: int
    extended_header: bool = False


def build_report_target_port_groups_cdb(allocation_length_bytes: int = 4096, *,
                                        extended_header: bool = False) -> bytes:
    """12-byte REPORT TARGET PORT GROUPS; ``extended_header`` asks for format 001b."""
    check_uint("REPORT TARGET PORT GROUPS CDB", "ALLOCATION LENGTH",
               allocation_length_bytes, 32)
    byte1 = MaintenanceIn.REPORT_TARGET_PORT_GROUPS | (_RTPG_EXTENDED if extended_header else 0)
    return _RTPG.pack(Opcode.MAINTENANCE_IN, byte1, allocation_length_bytes, 0)


def parse_report_target_port_groups_cdb(cdb: Buffer) -> ReportTargetPortGroupsCdb:
    """Parse REPORT TARGET PORT GROUPS; a PARAMETER DATA FORMAT other than 0 or 1 is invalid."""
    codec = "REPORT TARGET PORT GROUPS CDB"
    raw = _cdb(codec, cdb, Opcode.MAINTENANCE_IN, 12)
    _service_action(codec, raw, MaintenanceIn.REPORT_TARGET_PORT_GROUPS)
    _, byte1, allocation_length, _ = _RTPG.unpack(raw)
    data_format = byte1 >> 5
    if data_format > 1:
        raise ValueRangeError(codec, "PARAMETER DATA FORMAT", "0 or 1", data_format)
    return ReportTargetPortGroupsCdb(allocation_length, data_format == 1)
