"""CDB builders and parsers (protocol.scsi.cdb) and the constants they use."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import BadMagicError, EncodeError, TruncatedError, ValueRangeError
from protocol.scsi import (
    AdditionalSense,
    InquiryCdb,
    ModeSenseCdb,
    Opcode,
    PageControl,
    ReadCapacity16Cdb,
    ReadCapacity10Cdb,
    ReadWriteCdb,
    ReportReferralsCdb,
    ReportTargetPortGroupsCdb,
    SenseKey,
    RequestSenseCdb,
    StartStopUnitCdb,
    SynchronizeCache10Cdb,
    SynchronizeCache16Cdb,
    additional_sense_text,
    build_inquiry_cdb,
    build_mode_sense_6_cdb,
    build_mode_sense_10_cdb,
    build_read_10_cdb,
    build_read_16_cdb,
    build_read_capacity_10_cdb,
    build_read_capacity_16_cdb,
    build_read_write_cdb,
    build_report_referrals_cdb,
    build_report_target_port_groups_cdb,
    build_request_sense_cdb,
    build_start_stop_unit_cdb,
    build_synchronize_cache_10_cdb,
    build_synchronize_cache_16_cdb,
    build_test_unit_ready_cdb,
    build_write_10_cdb,
    build_write_16_cdb,
    cdb_length_for_opcode,
    parse_inquiry_cdb,
    parse_mode_sense_6_cdb,
    parse_mode_sense_10_cdb,
    parse_read_capacity_10_cdb,
    parse_read_capacity_16_cdb,
    parse_read_write_cdb,
    parse_report_referrals_cdb,
    parse_report_target_port_groups_cdb,
    parse_request_sense_cdb,
    parse_start_stop_unit_cdb,
    parse_synchronize_cache_10_cdb,
    parse_synchronize_cache_16_cdb,
    parse_test_unit_ready_cdb,
)

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, (1 << 64) - 1)


# -- constants --------------------------------------------------------------------


def test_opcodes_and_service_actions_match_scsi_proto_h() -> None:
    assert (Opcode.INQUIRY, Opcode.READ_CAPACITY_10, Opcode.SERVICE_ACTION_IN_16) == (
        0x12, 0x25, 0x9E)
    assert (Opcode.MODE_SENSE_6, Opcode.MODE_SENSE_10, Opcode.MAINTENANCE_IN) == (
        0x1A, 0x5A, 0xA3)
    assert (Opcode.READ_10, Opcode.WRITE_10, Opcode.READ_16, Opcode.WRITE_16) == (
        0x28, 0x2A, 0x88, 0x8A)
    assert Opcode.SYNCHRONIZE_CACHE_10 == 0x35 and Opcode.TEST_UNIT_READY == 0


def test_cdb_length_follows_group_code_like_command_size() -> None:
    assert [cdb_length_for_opcode(op) for op in (0x00, 0x28, 0x5A, 0xA3, 0x9E, 0xC8)] == [
        6, 10, 10, 12, 16, 10]


def test_additional_sense_table_and_text() -> None:
    assert AdditionalSense.INVALID_FIELD_IN_CDB.value == (0x24, 0x00)
    assert AdditionalSense.lookup(0x3F, 0x03) is AdditionalSense.INQUIRY_DATA_HAS_CHANGED
    assert AdditionalSense.lookup(0x2A, 0x09) is AdditionalSense.CAPACITY_DATA_HAS_CHANGED
    assert AdditionalSense.lookup(0x12, 0x34) is None
    assert additional_sense_text(0x29, 0x00) == "POWER ON, RESET, OR BUS DEVICE RESET OCCURRED"
    assert additional_sense_text(0x1A, 0x00) == "PARAMETER LIST LENGTH ERROR"
    assert additional_sense_text(0x80, 0x01) == "VENDOR SPECIFIC ADDITIONAL SENSE"
    assert SenseKey.MEDIUM_ERROR.text == "MEDIUM ERROR"


# -- known bytes ----------------------------------------------------------------------


def test_inquiry_cdb_bytes_as_the_kernel_scan_sends() -> None:
    # scsi_scan.c scsi_probe_lun: 12 00 00 00 24 00 for the first 36-byte pass.
    assert build_inquiry_cdb() == bytes.fromhex("120000002400")
    assert build_inquiry_cdb(evpd=True, page_code=0x83, allocation_length_bytes=0x1000) == (
        bytes.fromhex("120183100000"))


def test_report_referrals_cdb_bytes_as_sg3_utils_builds() -> None:
    # sg_ll_report_referrals: 9e 13, LBA at 2, alloc len at 10, ONE_SEG bit 0 of byte 14.
    cdb = build_report_referrals_cdb(0x0102030405060708, 0x2000, one_segment=True)
    assert cdb == bytes.fromhex("9e13" "0102030405060708" "00002000" "01" "00")
    assert parse_report_referrals_cdb(cdb) == ReportReferralsCdb(0x0102030405060708, 0x2000, True)


def test_read_capacity_cdbs() -> None:
    assert build_read_capacity_10_cdb() == bytes.fromhex("25" + "00" * 9)
    assert build_read_capacity_16_cdb() == bytes.fromhex("9e10" + "00" * 8 + "00000020" + "0000")
    assert parse_read_capacity_10_cdb(build_read_capacity_10_cdb()) == ReadCapacity10Cdb()
    assert parse_read_capacity_16_cdb(build_read_capacity_16_cdb(32)) == ReadCapacity16Cdb(32)


def test_rtpg_cdb_bytes() -> None:
    # sg_rtpg with -e: a3 2a ... ; LIO tests cdb[1] & 0x20 for the extended header.
    cdb = build_report_target_port_groups_cdb(0x1000, extended_header=True)
    assert cdb == bytes.fromhex("a32a" "00000000" "00001000" "0000")
    assert parse_report_target_port_groups_cdb(cdb) == ReportTargetPortGroupsCdb(0x1000, True)
    assert build_report_target_port_groups_cdb(8)[1] == 0x0A


def test_read_write_bytes() -> None:
    assert build_read_10_cdb(0x01020304, 8) == bytes.fromhex("28000102030400000800")
    assert build_write_16_cdb(1 << 40, 0x10000, fua=True) == bytes.fromhex(
        "8a08" "0000010000000000" "00010000" "0000")
    assert build_read_write_cdb(is_write=False, lba=5, transfer_length_blocks=1)[0] == 0x28
    assert build_read_write_cdb(is_write=True, lba=1 << 32, transfer_length_blocks=1)[0] == 0x8A
    assert build_read_write_cdb(is_write=False, lba=0, transfer_length_blocks=1 << 16)[0] == 0x88


def test_mode_sense_bytes_as_lio_parses() -> None:
    # spc_emulate_modesense: DBD = cdb[1] & 0x08, LLBAA = cdb[1] & 0x10, PC = cdb[2] >> 6.
    cdb = build_mode_sense_10_cdb(0x08, page_control=PageControl.CHANGEABLE,
                                  disable_block_descriptors=True, long_lba_accepted=True,
                                  allocation_length_bytes=0x200)
    assert cdb == bytes.fromhex("5a18480000000002" "0000")
    assert build_mode_sense_6_cdb(0x3F, 0xFF) == bytes.fromhex("1a003fffff00")


def test_sync_cache_and_tur() -> None:
    assert build_synchronize_cache_10_cdb(immediate=True) == bytes.fromhex("35020000000000000000")
    assert build_test_unit_ready_cdb() == bytes(6)
    parse_test_unit_ready_cdb(bytes(16))  # iSCSI pads CDBs to 16 bytes


# -- round trips ----------------------------------------------------------------------


@settings(max_examples=40)
@given(evpd=st.booleans(), page=u8, alloc=u16)
def test_inquiry_round_trip(evpd: bool, page: int, alloc: int) -> None:
    page = page if evpd else 0
    cdb = build_inquiry_cdb(evpd=evpd, page_code=page, allocation_length_bytes=alloc)
    assert parse_inquiry_cdb(cdb) == InquiryCdb(evpd, page, alloc)
    assert parse_inquiry_cdb(cdb + bytes(10)) == InquiryCdb(evpd, page, alloc)


@settings(max_examples=40)
@given(lba=u64, alloc=u32, one=st.booleans())
def test_report_referrals_round_trip(lba: int, alloc: int, one: bool) -> None:
    cdb = build_report_referrals_cdb(lba, alloc, one_segment=one)
    assert len(cdb) == 16
    assert parse_report_referrals_cdb(cdb) == ReportReferralsCdb(lba, alloc, one)


@settings(max_examples=60)
@given(op=st.sampled_from([Opcode.READ_10, Opcode.WRITE_10, Opcode.READ_16, Opcode.WRITE_16]),
       data=st.data(), fua=st.booleans(), dpo=st.booleans())
def test_read_write_round_trip(op: Opcode, data: st.DataObject, fua: bool, dpo: bool) -> None:
    ten = op in (Opcode.READ_10, Opcode.WRITE_10)
    lba = data.draw(u32 if ten else u64)
    blocks = data.draw(u16 if ten else u32)
    build = {Opcode.READ_10: build_read_10_cdb, Opcode.WRITE_10: build_write_10_cdb,
             Opcode.READ_16: build_read_16_cdb, Opcode.WRITE_16: build_write_16_cdb}[op]
    cdb = build(lba, blocks, fua=fua, dpo=dpo)
    assert len(cdb) == (10 if ten else 16)
    parsed = parse_read_write_cdb(cdb)
    assert parsed == ReadWriteCdb(op, lba, blocks, fua, dpo)
    assert parsed.is_write == (op in (Opcode.WRITE_10, Opcode.WRITE_16))


@settings(max_examples=40)
@given(page=st.integers(0, 0x3F), sub=u8, pc=st.sampled_from(list(PageControl)),
       dbd=st.booleans(), llbaa=st.booleans(), alloc6=u8, alloc10=u16)
def test_mode_sense_round_trip(page: int, sub: int, pc: PageControl, dbd: bool, llbaa: bool,
                               alloc6: int, alloc10: int) -> None:
    six = build_mode_sense_6_cdb(page, sub, page_control=pc, disable_block_descriptors=dbd,
                                 allocation_length_bytes=alloc6)
    assert parse_mode_sense_6_cdb(six) == ModeSenseCdb(page, sub, pc, dbd, alloc6)
    ten = build_mode_sense_10_cdb(page, sub, page_control=pc, disable_block_descriptors=dbd,
                                  long_lba_accepted=llbaa, allocation_length_bytes=alloc10)
    assert parse_mode_sense_10_cdb(ten) == ModeSenseCdb(page, sub, pc, dbd, alloc10, llbaa, True)


@settings(max_examples=30)
@given(lba=u32, count=u16, immed=st.booleans(), alloc=u32, ext=st.booleans())
def test_sync_cache_and_rtpg_round_trip(lba: int, count: int, immed: bool, alloc: int,
                                        ext: bool) -> None:
    cdb = build_synchronize_cache_10_cdb(lba, count, immediate=immed)
    assert parse_synchronize_cache_10_cdb(cdb) == SynchronizeCache10Cdb(lba, count, immed)
    rtpg = build_report_target_port_groups_cdb(alloc, extended_header=ext)
    assert parse_report_target_port_groups_cdb(rtpg) == ReportTargetPortGroupsCdb(alloc, ext)


@settings(max_examples=30)
@given(lba=u64, count=u32, immed=st.booleans(), desc=st.booleans(), alloc=u8,
       start=st.booleans(), loej=st.booleans(), power=st.integers(0, 15))
def test_sync16_request_sense_start_stop_round_trip(lba: int, count: int, immed: bool,
                                                    desc: bool, alloc: int, start: bool,
                                                    loej: bool, power: int) -> None:
    cdb = build_synchronize_cache_16_cdb(lba, count, immediate=immed)
    assert cdb[0] == 0x91 and len(cdb) == 16
    assert parse_synchronize_cache_16_cdb(cdb) == SynchronizeCache16Cdb(lba, count, immed)
    rs = build_request_sense_cdb(descriptor_format=desc, allocation_length_bytes=alloc)
    assert parse_request_sense_cdb(rs) == RequestSenseCdb(desc, alloc)
    ssu = build_start_stop_unit_cdb(start=start, load_eject=loej, immediate=immed,
                                    power_condition=power)
    assert parse_start_stop_unit_cdb(ssu) == StartStopUnitCdb(start, loej, immed, power)


def test_request_sense_and_start_stop_bytes() -> None:
    # sg_requests --desc: 03 01 00 00 fc 00; sg_start --start: 1b 00 00 00 01 00.
    assert build_request_sense_cdb(descriptor_format=True) == bytes.fromhex("03010000fc00")
    assert build_start_stop_unit_cdb() == bytes.fromhex("1b0000000100")
    assert parse_start_stop_unit_cdb(bytes.fromhex("1b0000000200")) == StartStopUnitCdb(
        start=False, load_eject=True)


# -- rejections --------------------------------------------------------------------------


def test_parsers_reject_wrong_opcode_service_action_and_short_cdbs() -> None:
    with pytest.raises(BadMagicError):
        parse_inquiry_cdb(build_test_unit_ready_cdb())
    with pytest.raises(BadMagicError):
        parse_report_referrals_cdb(build_read_capacity_16_cdb())
    with pytest.raises(BadMagicError):
        parse_read_capacity_16_cdb(build_report_referrals_cdb())
    with pytest.raises(BadMagicError):
        parse_read_write_cdb(build_inquiry_cdb())
    with pytest.raises(TruncatedError) as e:
        parse_read_write_cdb(build_read_16_cdb(0, 1)[:10])
    assert e.value.expected == 16
    with pytest.raises(TruncatedError):
        parse_read_write_cdb(b"")


def test_parsers_reject_fields_a_device_server_must_reject() -> None:
    with pytest.raises(ValueRangeError):  # EVPD=0, PAGE CODE=0x80 (LIO: INVALID FIELD IN CDB)
        parse_inquiry_cdb(bytes.fromhex("120080002400"))
    with pytest.raises(ValueRangeError):  # LBA without PMI (LIO sbc_emulate_readcapacity)
        parse_read_capacity_10_cdb(bytes.fromhex("25000000000100000000"))
    assert parse_read_capacity_10_cdb(bytes.fromhex("25000000000100000100")) == (
        ReadCapacity10Cdb(1, True))
    with pytest.raises(ValueRangeError):
        parse_report_target_port_groups_cdb(bytes.fromhex("a34a" + "00" * 10))


def test_builders_reject_what_does_not_fit() -> None:
    with pytest.raises(EncodeError):
        build_inquiry_cdb(page_code=0x80)
    with pytest.raises(EncodeError):
        build_inquiry_cdb(evpd=True, allocation_length_bytes=1 << 16)
    with pytest.raises(EncodeError):
        build_read_10_cdb(1 << 32, 1)
    with pytest.raises(EncodeError):
        build_write_10_cdb(0, 1 << 16)
    with pytest.raises(EncodeError):
        build_mode_sense_6_cdb(0x40)
    with pytest.raises(EncodeError):
        build_report_referrals_cdb(-1)
    with pytest.raises(EncodeError):
        build_read_16_cdb(True, 1)  # type: ignore[arg-type]
