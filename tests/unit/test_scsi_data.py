"""READ CAPACITY, MODE SENSE, REPORT REFERRALS and REPORT TARGET PORT GROUPS data."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import BadMagicError, EncodeError, TruncatedError, ValueRangeError
from protocol.scsi import (
    DPOFUA,
    AluaState,
    BlockDescriptor,
    CachingModePage,
    ControlModePage,
    ModePage,
    ModePageCode,
    ModeParameters,
    ReadCapacity10Data,
    ReadCapacity16Data,
    ReferralTargetPortGroup,
    ReportReferralsData,
    ReportTargetPortGroupsData,
    SupportedAluaStates,
    TargetPortGroupDescriptor,
    UserDataSegmentReferral,
    decode_caching_mode_page,
    decode_control_mode_page,
    decode_mode_sense_6,
    decode_mode_sense_10,
    decode_read_capacity_10,
    decode_read_capacity_16,
    decode_report_referrals,
    decode_report_target_port_groups,
    encode_caching_mode_page,
    encode_control_mode_page,
    encode_mode_sense_6,
    encode_mode_sense_10,
    encode_read_capacity_10,
    encode_read_capacity_16,
    encode_report_referrals,
    encode_report_target_port_groups,
)
from tests.unit.test_scsi_sense import hexbytes

# -- READ CAPACITY ---------------------------------------------------------------------------


def test_sg3_utils_read_capacity_16_sample() -> None:
    # inhex/readcap_zbc.hex: last LBA 0x9185fffff, 512-byte blocks, 8 per physical block.
    raw = hexbytes("""
        00 00 00 09 18 5f ff ff  00 00 02 00 00 03 00 00
        00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00""")
    rc = decode_read_capacity_16(raw)
    assert rc == ReadCapacity16Data(returned_lba=0x9185FFFFF, block_length_bytes=512,
                                    logical_blocks_per_physical_block_exponent=3)
    assert rc.capacity_bytes == 0x918600000 * 512
    assert rc.physical_block_length_bytes == 4096
    assert encode_read_capacity_16(rc) == raw


def test_lio_read_capacity_bytes() -> None:
    # sbc_emulate_readcapacity: last LBA clamped to 0xffffffff; _16 sets LBPME (0x80 in byte 14)
    # with emulate_tpu, LBPRZ (0x40) with unmap_zeroes_data.
    rc10 = decode_read_capacity_10(bytes.fromhex("ffffffff00001000"))
    assert rc10.needs_read_capacity_16 and rc10.block_length_bytes == 4096
    small = decode_read_capacity_10(bytes.fromhex("001fffff00000200"))
    assert small.block_count == 0x200000 and small.capacity_bytes == 1 << 30
    assert encode_read_capacity_10(small) == bytes.fromhex("001fffff00000200")
    raw16 = bytes.fromhex("00000001ffffffff" "00000200" "0000c000") + bytes(16)
    rc16 = decode_read_capacity_16(raw16)
    assert rc16.lbpme and rc16.lbprz and rc16.capacity_bytes == 1 << 42
    assert decode_read_capacity_16(raw16[:12]) == ReadCapacity16Data(
        returned_lba=0x1FFFFFFFF, block_length_bytes=512)  # cut-off fields read as 0
    with pytest.raises(TruncatedError):
        decode_read_capacity_16(raw16[:11])
    with pytest.raises(TruncatedError):
        decode_read_capacity_10(b"\0" * 7)


@settings(max_examples=40)
@given(lba=st.integers(0, (1 << 64) - 1), bl=st.integers(0, (1 << 32) - 1),
       ptype=st.integers(0, 7), pie=st.integers(0, 15), lbppbe=st.integers(0, 15),
       lowest=st.integers(0, (1 << 14) - 1), flags=st.lists(st.booleans(), min_size=3,
                                                          max_size=3))
def test_read_capacity_round_trip(lba: int, bl: int, ptype: int, pie: int, lbppbe: int,
                                  lowest: int, flags: list[bool]) -> None:
    rc = ReadCapacity16Data(returned_lba=lba, block_length_bytes=bl, protection_type=ptype,
                            protection_enabled=flags[0], protection_information_exponent=pie,
                            logical_blocks_per_physical_block_exponent=lbppbe,
                            lbpme=flags[1], lbprz=flags[2], lowest_aligned_lba=lowest)
    raw = encode_read_capacity_16(rc)
    assert len(raw) == 32 and decode_read_capacity_16(raw) == rc
    rc10 = ReadCapacity10Data(lba & 0xFFFFFFFF, bl)
    assert decode_read_capacity_10(encode_read_capacity_10(rc10)) == rc10


# -- MODE SENSE ------------------------------------------------------------------------------

# sg3_utils inhex/modes_sdeb.hex: MODE SENSE(10) from scsi_debug, all pages.
SDEB_MODES = hexbytes("""
    00 ee 00 10 00 00 00 08
    00 80 00 00 00 00 02 00
    01 0a c0 0b f0 00 00 00  05 00 ff ff
    02 0e 80 80 00 0a 00 00  00 00 00 00 00 00 00 00
    03 16 00 00 00 00 00 00  00 00 00 3f 02 00 00 00
    00 00 00 00 40 00 00 00
    08 12 14 00 ff ff 00 00  ff ff ff ff 80 14 00 00
    00 00 00 00
    0a 0a 02 00 00 80 00 00  00 00 02 4b
    19 06 06 00 07 d0 00 00
    59 01 00 64 00 06 00 02  00 00 00 00 10 09 08 00
    32 22 22 20 00 00 07 ce  31 11 11 10 00 00 00 01
    02 00 00 00 00 00 00 00  88 99 00 00 00 00 00 00
    00 00 00 00 00 00 00 00  00 01 00 00 10 09 08 00
    32 22 22 20 00 00 07 cf  31 11 11 10 00 00 00 01
    03 00 00 00 00 00 00 00  88 99 00 00 00 00 00 00
    00 00 00 00 00 00 00 00
    59 02 00 0c 00 06 10 00  00 00 00 00 00 00 00 00
    1c 0a 08 00 00 00 00 00  00 00 00 00
""")


def test_decode_scsi_debug_mode_sense_10() -> None:
    params = decode_mode_sense_10(SDEB_MODES)
    assert params.device_specific_parameter == DPOFUA and not params.write_protected
    assert params.block_descriptors == (BlockDescriptor(0x800000, 512),)
    assert [(p.page_code, p.subpage_code) for p in params.pages] == [
        (1, 0), (2, 0), (3, 0), (8, 0), (0x0A, 0), (0x19, 0), (0x19, 1), (0x19, 2), (0x1C, 0)]
    assert len(params.page(0x19, 1).data) == 0x64
    caching = decode_caching_mode_page(params.page(ModePageCode.CACHING))
    assert caching == CachingModePage(write_cache_enabled=True)
    control = decode_control_mode_page(params.page(ModePageCode.CONTROL))
    assert control.global_logging_target_save_disable and not control.descriptor_sense
    assert control.extended_self_test_completion_time_seconds == 0x24B
    assert encode_mode_sense_10(params) == SDEB_MODES


def test_lio_mode_sense_6_bytes() -> None:
    # spc_emulate_modesense, MODE SENSE(6) for the caching page, DPOFUA, short block
    # descriptor (spc_modesense_blockdesc), spc_modesense_caching with WCE and DRA.
    caching = bytes([0x08, 0x12, 0x04]) + bytes(9) + bytes([0x20]) + bytes(7)
    lio = bytes([3 + 8 + 20, 0x00, 0x10, 0x08]) + struct.pack(">II", 0x1FFFFF, 512) + caching
    params = decode_mode_sense_6(lio)
    assert params.block_descriptors == (BlockDescriptor(0x1FFFFF, 512),)
    page = decode_caching_mode_page(params.pages[0])
    assert page == CachingModePage(write_cache_enabled=True, disable_read_ahead=True)
    rebuilt = ModeParameters(pages=(encode_caching_mode_page(page),),
                             block_descriptors=params.block_descriptors,
                             device_specific_parameter=DPOFUA)
    assert encode_mode_sense_6(rebuilt) == lio


def test_lio_control_page_bytes() -> None:
    # spc_modesense_control: GLTSD, D_SENSE, QAM 1, TAS, busy timeout 0xffff, self-test 30 s.
    raw = bytes([0x0A, 0x0A, 0x06, 0x10, 0x00, 0x40, 0, 0, 0xFF, 0xFF, 0, 30])
    page = decode_control_mode_page(decode_mode_sense_6(bytes([3 + 12, 0, 0, 0]) + raw).pages[0])
    assert page == ControlModePage(descriptor_sense=True, global_logging_target_save_disable=True,
                                   queue_algorithm_modifier=1, task_aborted_status=True,
                                   busy_timeout_period_100ms=0xFFFF,
                                   extended_self_test_completion_time_seconds=30)
    assert encode_control_mode_page(page) == ModePage(0x0A, raw[2:])


def test_long_lba_block_descriptor_mode_sense_10() -> None:
    # spc_modesense_long_blockdesc: LONGLBA, 16-byte descriptor.
    params = ModeParameters(block_descriptors=(BlockDescriptor(1 << 33, 4096),), long_lba=True)
    raw = encode_mode_sense_10(params)
    assert raw == bytes.fromhex("0016000001000010" "0000000200000000" "00000000" "00001000")
    assert decode_mode_sense_10(raw) == params
    with pytest.raises(EncodeError):
        encode_mode_sense_6(params)


def test_mode_sense_errors() -> None:
    with pytest.raises(TruncatedError) as e:
        decode_mode_sense_10(SDEB_MODES[:100])
    assert e.value.expected == len(SDEB_MODES)
    with pytest.raises(ValueRangeError):  # block descriptor length not a multiple of 8
        decode_mode_sense_6(bytes([3 + 4, 0, 0, 4]) + bytes(4))
    with pytest.raises(ValueRangeError):  # page runs past the mode data
        decode_mode_sense_6(bytes([3 + 4, 0, 0, 0, 0x08, 0x12, 0, 0]))
    with pytest.raises(ValueRangeError):
        decode_mode_sense_6(bytes([1, 0, 0, 0]))
    with pytest.raises(BadMagicError):
        decode_caching_mode_page(ModePage(0x0A, bytes(10)))
    with pytest.raises(ValueRangeError):
        decode_caching_mode_page(ModePage(0x08, bytes(10)))
    with pytest.raises(EncodeError):
        encode_mode_sense_6(ModeParameters(pages=(ModePage(0x08, bytes(255)),)))
    with pytest.raises(EncodeError):
        encode_mode_sense_10(ModeParameters(block_descriptors=(BlockDescriptor(1 << 32, 512),)))


mode_page = st.builds(ModePage, page_code=st.integers(0, 0x3F), data=st.binary(max_size=30),
                      subpage_code=st.integers(0, 255), parameters_saveable=st.booleans())


@settings(max_examples=40)
@given(pages=st.lists(mode_page, max_size=4), medium=st.integers(0, 255),
       dsp=st.integers(0, 255), blocks=st.lists(st.tuples(st.integers(0, (1 << 32) - 1),
                                                          st.integers(0, (1 << 24) - 1)),
                                                max_size=2))
def test_mode_sense_round_trip(pages: list[ModePage], medium: int, dsp: int,
                               blocks: list[tuple[int, int]]) -> None:
    params = ModeParameters(pages=tuple(pages), medium_type=medium, device_specific_parameter=dsp,
                            block_descriptors=tuple(BlockDescriptor(*b) for b in blocks))
    assert decode_mode_sense_10(encode_mode_sense_10(params)) == params
    assert decode_mode_sense_6(encode_mode_sense_6(params)) == params


@settings(max_examples=30)
@given(flags=st.lists(st.booleans(), min_size=8, max_size=8), tst=st.integers(0, 7),
       qam=st.integers(0, 15), qerr=st.integers(0, 3), ua=st.integers(0, 3),
       busy=st.integers(0, 0xFFFF), self_test=st.integers(0, 0xFFFF))
def test_caching_and_control_round_trip(flags: list[bool], tst: int, qam: int, qerr: int, ua: int,
                                        busy: int, self_test: int) -> None:
    caching = CachingModePage(write_cache_enabled=flags[0], read_cache_disabled=flags[1],
                              disable_read_ahead=flags[2], parameters_saveable=flags[3])
    assert decode_caching_mode_page(encode_caching_mode_page(caching)) == caching
    control = ControlModePage(task_set_type=tst, descriptor_sense=flags[4],
                              global_logging_target_save_disable=flags[5],
                              queue_algorithm_modifier=qam, queue_error_management=qerr,
                              unit_attention_interlocks_control=ua,
                              software_write_protect=flags[6], task_aborted_status=flags[7],
                              busy_timeout_period_100ms=busy,
                              extended_self_test_completion_time_seconds=self_test)
    assert decode_control_mode_page(encode_control_mode_page(control)) == control


# -- REPORT REFERRALS ------------------------------------------------------------------------


def lio_report_referrals(maps: list[tuple[int, int, list[tuple[int, int]]]],
                         data_length: int = 4096) -> bytes:
    """Python transcription of LIO's target_emulate_report_referrals (target_core_alua.c)."""
    buf = bytearray(max(data_length, 4) + 64)
    off, rd_len = 4, 0
    for first, last, members in maps:
        desc_num = off + 3
        off += 4
        if data_length > off:
            buf[off:off + 8] = first.to_bytes(8, "big")
        off += 8
        if data_length > off:
            buf[off:off + 8] = last.to_bytes(8, "big")
        off += 8
        rd_len += 20
        for state, pg_id in members:
            if data_length > off:
                buf[off] = state & 0x0F
            off += 2
            if data_length > off:
                buf[off] = (pg_id >> 8) & 0xFF
            off += 1
            if data_length > off:
                buf[off] = pg_id & 0xFF
            off += 1
            rd_len += 4
        if data_length > desc_num:
            buf[desc_num] = len(members)
    buf[2:4] = rd_len.to_bytes(2, "big")
    return bytes(buf[:min(data_length, rd_len + 4)])


LIO_MAPS = [
    (0, 0x3FFF, [(AluaState.ACTIVE_OPTIMIZED, 1), (AluaState.STANDBY, 2)]),
    (0x4000, 0x7FFF, [(AluaState.STANDBY, 1), (AluaState.ACTIVE_OPTIMIZED, 2)]),
]


def test_decode_lio_report_referrals() -> None:
    data = decode_report_referrals(lio_report_referrals(LIO_MAPS))
    assert data == ReportReferralsData((
        UserDataSegmentReferral(0, 0x3FFF, (
            ReferralTargetPortGroup(AluaState.ACTIVE_OPTIMIZED, 1),
            ReferralTargetPortGroup(AluaState.STANDBY, 2))),
        UserDataSegmentReferral(0x4000, 0x7FFF, (
            ReferralTargetPortGroup(AluaState.STANDBY, 1),
            ReferralTargetPortGroup(AluaState.ACTIVE_OPTIMIZED, 2))),
    ))
    assert data.segments[1].lba_count == 0x4000
    assert encode_report_referrals(data) == lio_report_referrals(LIO_MAPS)


def test_lio_truncated_referrals_say_how_much_to_ask_for() -> None:
    # LIO fills RETURN DATA LENGTH for everything even when the allocation length is short.
    short = lio_report_referrals(LIO_MAPS, data_length=16)
    with pytest.raises(TruncatedError) as e:
        decode_report_referrals(short)
    assert e.value.expected == 4 + 2 * (20 + 8)
    assert decode_report_referrals(lio_report_referrals(LIO_MAPS, e.value.expected)).segments


def test_referrals_errors() -> None:
    with pytest.raises(TruncatedError):
        decode_report_referrals(b"\0\0")
    with pytest.raises(ValueRangeError):  # descriptor overruns the declared length
        decode_report_referrals(bytes.fromhex("00000008") + bytes(8))
    with pytest.raises(ValueRangeError):  # group count overruns
        decode_report_referrals(bytes.fromhex("00000014" "00000001") + bytes(16))
    with pytest.raises(ValueRangeError):  # last < first
        decode_report_referrals(bytes.fromhex("00000014" "00000000")
                                + (5).to_bytes(8, "big") + (4).to_bytes(8, "big"))
    with pytest.raises(ValueRangeError):  # reserved access state 5
        decode_report_referrals(bytes.fromhex("00000018" "00000001") + bytes(16)
                                + bytes.fromhex("05000001"))
    with pytest.raises(EncodeError):
        encode_report_referrals(ReportReferralsData((UserDataSegmentReferral(5, 4, ()),)))
    with pytest.raises(EncodeError):
        encode_report_referrals(ReportReferralsData((UserDataSegmentReferral(
            0, 1, (ReferralTargetPortGroup(5, 1),)),)))  # type: ignore[arg-type]


segment = st.builds(
    lambda first, span, groups: UserDataSegmentReferral(first, first + span, tuple(groups)),
    st.integers(0, 1 << 62), st.integers(0, 1 << 40),
    st.lists(st.builds(ReferralTargetPortGroup, st.sampled_from(AluaState),
                       st.integers(0, 0xFFFF)), max_size=4))


@settings(max_examples=40)
@given(segments=st.lists(segment, max_size=5))
def test_report_referrals_round_trip(segments: list[UserDataSegmentReferral]) -> None:
    data = ReportReferralsData(tuple(segments))
    raw = encode_report_referrals(data)
    assert raw[:2] == b"\0\0" and int.from_bytes(raw[2:4], "big") == len(raw) - 4
    assert decode_report_referrals(raw) == data
    assert decode_report_referrals(raw + bytes(7)) == data  # excess ignored


# -- REPORT TARGET PORT GROUPS ---------------------------------------------------------------

LIO_SUPPORTED = SupportedAluaStates(0xCF)  # T_SUP O_SUP U_SUP S_SUP AN_SUP AO_SUP (LIO default)


def test_decode_lio_rtpg_length_only() -> None:
    # target_emulate_report_target_port_groups: PREF|state, supported, id, -, status, 0, count,
    # then 2 obsolete bytes + RTPI per port; RETURN DATA LENGTH at 0.
    body = (bytes([0x80 | 0x00, 0xCF, 0x00, 0x01, 0x00, 0x02, 0x00, 0x02])
            + bytes.fromhex("00000001" "00000002")
            + bytes([0x02, 0xCF, 0x00, 0x02, 0x00, 0x00, 0x00, 0x01])
            + bytes.fromhex("00000003"))
    raw = len(body).to_bytes(4, "big") + body
    data = decode_report_target_port_groups(raw)
    assert data == ReportTargetPortGroupsData((
        TargetPortGroupDescriptor(target_port_group_id=1,
                                  asymmetric_access_state=AluaState.ACTIVE_OPTIMIZED,
                                  preferred=True, supported_states=LIO_SUPPORTED,
                                  status_code=2, relative_target_port_ids=(1, 2)),
        TargetPortGroupDescriptor(target_port_group_id=2, asymmetric_access_state=AluaState.STANDBY,
                                  supported_states=LIO_SUPPORTED, relative_target_port_ids=(3,)),
    ))
    assert SupportedAluaStates.S_SUP in data.groups[1].supported_states
    assert data.implicit_transition_time_seconds is None
    assert encode_report_target_port_groups(data) == raw


def test_extended_header_round_trip_and_lio_quirk() -> None:
    group = TargetPortGroupDescriptor(target_port_group_id=7,
                                      asymmetric_access_state=AluaState.TRANSITIONING,
                                      relative_target_port_ids=(9,))
    data = ReportTargetPortGroupsData((group,), implicit_transition_time_seconds=30)
    raw = encode_report_target_port_groups(data)
    assert raw[:8] == bytes.fromhex("00000010" "101e0000")  # length counts the ext header
    assert decode_report_target_port_groups(raw) == data
    # LIO leaves the 4 extended-header bytes out of RETURN DATA LENGTH: rejected, not misread.
    lio = (12).to_bytes(4, "big") + raw[4:]
    with pytest.raises(ValueRangeError):
        decode_report_target_port_groups(lio)


def test_rtpg_errors() -> None:
    with pytest.raises(TruncatedError) as e:
        decode_report_target_port_groups(bytes.fromhex("0000000c" "0000"))
    assert e.value.expected == 16
    with pytest.raises(ValueRangeError):  # format type 2
        decode_report_target_port_groups(bytes.fromhex("00000008" "20000000" "00000000"))
    with pytest.raises(ValueRangeError):  # port count overruns
        decode_report_target_port_groups(bytes.fromhex("00000008" "00000001" "00000005"))
    with pytest.raises(ValueRangeError):  # reserved state 7
        decode_report_target_port_groups(bytes.fromhex("00000008" "07000001" "00000000"))
    with pytest.raises(EncodeError):
        encode_report_target_port_groups(ReportTargetPortGroupsData((
            TargetPortGroupDescriptor(target_port_group_id=1 << 16,
                                      asymmetric_access_state=AluaState.STANDBY),)))


rtpg_group = st.builds(
    TargetPortGroupDescriptor, target_port_group_id=st.integers(0, 0xFFFF),
    asymmetric_access_state=st.sampled_from(AluaState), preferred=st.booleans(),
    supported_states=st.integers(0, 255).map(SupportedAluaStates),
    status_code=st.integers(0, 255), vendor_specific=st.integers(0, 255),
    relative_target_port_ids=st.lists(st.integers(0, 0xFFFF), max_size=4).map(tuple))


@settings(max_examples=40)
@given(groups=st.lists(rtpg_group, max_size=4), itt=st.none() | st.integers(0, 255))
def test_rtpg_round_trip(groups: list[TargetPortGroupDescriptor], itt: int | None) -> None:
    data = ReportTargetPortGroupsData(tuple(groups), itt)
    assert decode_report_target_port_groups(encode_report_target_port_groups(data)) == data
