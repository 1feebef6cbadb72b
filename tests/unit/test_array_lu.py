"""The emulated array's logical-unit core: every command, sense on bad input, counters, unit attentions, page map."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from protocol import pagemap, pagemap_changes, portals, scsi
from protocol.errors import ChecksumError, DecodeError, TruncatedError, ValueRangeError
from protocol.scsi import ScsiStatus, SenseKey
from tests.array.lu import PRODUCT, VENDOR, LogicalUnit, LuIdentity, ScsiResult
from tests.array.store import SparseStore
from tests.array.volume import ArrayVolume

MIB = 1 << 20
GOOD = ScsiStatus.GOOD
CHECK = ScsiStatus.CHECK_CONDITION


@pytest.fixture
def lu(tmp_path) -> LogicalUnit:
    volume = ArrayVolume(size_bytes=64 * MIB, page_size_bytes=MIB, members=3)
    return LogicalUnit(volume, SparseStore(tmp_path, volume.size_bytes), LuIdentity.for_volume("vol0"))


def sense_of(result: ScsiResult) -> tuple[int, int, int]:
    assert result.status == CHECK
    sense = scsi.decode_sense(result.sense)
    return sense.key, sense.asc, sense.ascq


def ok(result: ScsiResult) -> bytes:
    assert result.status == GOOD, scsi.decode_sense(result.sense) if result.sense else result
    return bytes(result.data_in)


# -- identity ------------------------------------------------------------------------

def test_standard_inquiry_is_the_same_on_every_member(lu) -> None:
    cdb = scsi.build_inquiry_cdb(allocation_length_bytes=96)
    answers = {ok(lu.handle(m, cdb)) for m in range(3)}
    assert len(answers) == 1
    inquiry = scsi.decode_standard_inquiry(answers.pop())
    assert (inquiry.vendor, inquiry.product) == (VENDOR, PRODUCT)
    assert inquiry.tpgs == scsi.Tpgs.NOT_SUPPORTED


def test_inquiry_truncated_to_allocation_length(lu) -> None:
    assert len(ok(lu.handle(0, scsi.build_inquiry_cdb(allocation_length_bytes=5)))) == 5


def test_supported_vpd_pages(lu) -> None:
    data = ok(lu.handle(0, scsi.build_inquiry_cdb(evpd=True, page_code=0, allocation_length_bytes=255)))
    assert scsi.decode_supported_vpd_pages(data).page_codes == (0x00, 0x80, 0x83, 0xB0, 0xB1, 0xC0, 0xC1)


# -- VPD 0xC1 member portals ----------------------------------------------------------

def member_portals(lu: LogicalUnit, member: int, length: int = 1024) -> portals.MemberPortalsPage:
    cdb = scsi.build_inquiry_cdb(evpd=True, page_code=portals.MEMBER_PORTALS_VPD,
                                 allocation_length_bytes=length)
    return portals.decode_member_portals_vpd(ok(lu.handle(member, cdb)))


def listed(page: portals.MemberPortalsPage) -> list[tuple[int, int, str, int, int]]:
    return [(m.member_id, m.target_port_group, p.iscsiadm_portal, p.portal_group_tag,
             p.relative_target_port) for m in page.members for p in m.portals]


def test_member_portals_list_every_member_the_same_on_every_path(lu) -> None:
    pages = [member_portals(lu, m) for m in range(3)]
    assert pages[0] == pages[1] == pages[2]
    assert pages[0].generation == lu.volume.generation
    assert listed(pages[0]) == [(1, 1, "127.0.0.1:3260", 1, 1), (2, 2, "127.0.0.2:3260", 2, 2),
                                (3, 3, "127.0.0.3:3260", 3, 3)]


def test_member_portals_agree_with_each_paths_own_identity(lu) -> None:
    page = member_portals(lu, 0)
    for number in range(3):
        cdb = scsi.build_inquiry_cdb(evpd=True, page_code=0x83, allocation_length_bytes=255)
        vpd83 = scsi.decode_device_identification_vpd(ok(lu.handle(number, cdb)))
        record = next(m for m in page.members if m.target_port_group == vpd83.target_port_group_id())
        assert record.portals[0].relative_target_port == vpd83.relative_target_port_id()
        assert str(record.portals[0].address) == lu.volume.member(number).portal_ip


def test_member_portals_follow_add_and_remove_member(lu) -> None:
    new = lu.volume.add_member()
    page = member_portals(lu, new.number)
    assert [m.member_id for m in page.members] == [1, 2, 3, 4]
    assert listed(page)[-1] == (4, 4, "127.0.0.4:3260", 4, 4)
    lu.volume.remove_member(1)
    # The retired member still answers while it drains, with the list it is no longer in.
    for number in (0, 1, 3):
        page = member_portals(lu, number)
        assert [m.member_id for m in page.members] == [1, 3, 4]
        assert page.generation == lu.volume.generation


def test_member_portals_truncated_to_allocation_length_says_the_full_length(lu) -> None:
    cdb = scsi.build_inquiry_cdb(evpd=True, page_code=portals.MEMBER_PORTALS_VPD, allocation_length_bytes=24)
    data = ok(lu.handle(0, cdb))
    assert len(data) == 24
    with pytest.raises(TruncatedError) as info:
        portals.decode_member_portals_vpd(data)
    assert info.value.expected == portals.page_length([1, 1, 1])
    assert len(member_portals(lu, 0, info.value.expected).members) == 3


def test_protocol_1_0_array_neither_lists_nor_answers_member_portals(tmp_path) -> None:
    volume = ArrayVolume(size_bytes=8 * MIB, page_size_bytes=MIB, members=2)
    old = LogicalUnit(volume, SparseStore(tmp_path, volume.size_bytes), LuIdentity.for_volume("vol0"),
                      member_portals=False)
    data = ok(old.handle(0, scsi.build_inquiry_cdb(evpd=True, page_code=0, allocation_length_bytes=255)))
    assert portals.MEMBER_PORTALS_VPD not in scsi.decode_supported_vpd_pages(data).page_codes
    cdb = scsi.build_inquiry_cdb(evpd=True, page_code=portals.MEMBER_PORTALS_VPD, allocation_length_bytes=255)
    assert sense_of(old.handle(0, cdb)) == (SenseKey.ILLEGAL_REQUEST, 0x24, 0x00)


def test_serial_and_naa_shared_ports_distinct(lu) -> None:
    serials, naas, ports, groups = set(), set(), set(), set()
    for m in range(3):
        serials.add(scsi.decode_unit_serial_number_vpd(ok(lu.handle(
            m, scsi.build_inquiry_cdb(evpd=True, page_code=0x80, allocation_length_bytes=255)))).serial_number)
        page = scsi.decode_device_identification_vpd(ok(lu.handle(
            m, scsi.build_inquiry_cdb(evpd=True, page_code=0x83, allocation_length_bytes=255))))
        naas.add(page.logical_unit_naa().wwid)
        ports.add(page.relative_target_port_id())
        groups.add(page.target_port_group_id())
    assert serials == {lu.identity.serial}
    assert naas == {lu.identity.wwid}
    assert lu.identity.wwid.startswith("36")
    assert ports == {1, 2, 3}
    assert groups == {m.member_id for m in lu.volume.members}


def test_member_identity_vpd(lu) -> None:
    data = ok(lu.handle(2, scsi.build_inquiry_cdb(evpd=True, page_code=0xC0, allocation_length_bytes=255)))
    identity = pagemap.decode_member_identity_vpd(data)
    assert identity == pagemap.MemberIdentity(3, 1, "m2", features=pagemap_changes.FEATURE_CHANGES_SINCE)


def test_block_limits(lu) -> None:
    data = ok(lu.handle(0, scsi.build_inquiry_cdb(evpd=True, page_code=0xB0, allocation_length_bytes=255)))
    assert scsi.decode_block_limits_vpd(data).maximum_transfer_length_blocks == 2048


def test_unknown_vpd_page_and_bad_evpd(lu) -> None:
    bad_page = scsi.build_inquiry_cdb(evpd=True, page_code=0xB3, allocation_length_bytes=255)
    assert sense_of(lu.handle(0, bad_page)) == (SenseKey.ILLEGAL_REQUEST, 0x24, 0)
    assert sense_of(lu.handle(0, bytes([0x12, 0, 0x83, 0, 255, 0])))[1:] == (0x24, 0)


# -- capacity, mode, simple commands ------------------------------------------------------------

def test_read_capacity(lu) -> None:
    rc10 = scsi.decode_read_capacity_10(ok(lu.handle(0, scsi.build_read_capacity_10_cdb())))
    assert rc10.capacity_bytes == 64 * MIB
    rc16 = scsi.decode_read_capacity_16(ok(lu.handle(0, scsi.build_read_capacity_16_cdb(32))))
    assert rc16.capacity_bytes == 64 * MIB and rc16.block_length_bytes == 512


def test_read_capacity_10_overflows_for_large_volumes(tmp_path) -> None:
    volume = ArrayVolume(size_bytes=45 * (1 << 40) // 2, page_size_bytes=15 * MIB, members=3)
    big = LogicalUnit(volume, SparseStore(tmp_path, volume.size_bytes), LuIdentity.for_volume("big"))
    assert scsi.decode_read_capacity_10(ok(big.handle(0, scsi.build_read_capacity_10_cdb()))).needs_read_capacity_16
    rc16 = scsi.decode_read_capacity_16(ok(big.handle(0, scsi.build_read_capacity_16_cdb())))
    assert rc16.capacity_bytes == volume.size_bytes


def test_other_service_actions_are_invalid(lu) -> None:
    cdb = scsi.build_report_referrals_cdb()
    assert sense_of(lu.handle(0, cdb)) == (SenseKey.ILLEGAL_REQUEST, 0x24, 0)


@pytest.mark.parametrize("ten", [False, True])
def test_mode_sense(lu, ten) -> None:
    build = scsi.build_mode_sense_10_cdb if ten else scsi.build_mode_sense_6_cdb
    decode = scsi.decode_mode_sense_10 if ten else scsi.decode_mode_sense_6
    params = decode(ok(lu.handle(0, build(0x3F, allocation_length_bytes=255))))
    assert {p.page_code for p in params.pages} == {0x08, 0x0A}
    assert params.block_descriptors[0].block_length_bytes == 512
    assert scsi.decode_caching_mode_page(params.page(0x08)).write_cache_enabled
    assert params.device_specific_parameter == scsi.DPOFUA
    assert not scsi.decode_control_mode_page(params.page(0x0A)).descriptor_sense
    only_caching = decode(ok(lu.handle(0, build(0x08, disable_block_descriptors=True))))
    assert [p.page_code for p in only_caching.pages] == [0x08] and not only_caching.block_descriptors
    assert sense_of(lu.handle(0, build(0x19)))[1:] == (0x24, 0)
    assert sense_of(lu.handle(0, build(0x08, page_control=scsi.PageControl.SAVED)))[1:] == (0x39, 0)


def test_test_unit_ready_start_stop_and_sync(lu) -> None:
    assert ok(lu.handle(0, scsi.build_test_unit_ready_cdb())) == b""
    assert ok(lu.handle(0, scsi.build_start_stop_unit_cdb())) == b""
    assert ok(lu.handle(0, scsi.build_synchronize_cache_10_cdb())) == b""
    assert ok(lu.handle(0, scsi.build_synchronize_cache_16_cdb())) == b""
    past = scsi.build_synchronize_cache_10_cdb(lba=lu.volume.total_blocks, block_count=1)
    assert sense_of(lu.handle(0, past))[1:] == (0x21, 0)


def test_request_sense_without_pending_condition(lu) -> None:
    sense = scsi.decode_sense(ok(lu.handle(0, scsi.build_request_sense_cdb())))
    assert sense.key == SenseKey.NO_SENSE


@pytest.mark.parametrize("opcode", [0x04, 0x42, 0x8F, 0xA3, 0xC0, 0xFF])
def test_unknown_opcodes(lu, opcode) -> None:
    cdb = bytes([opcode]) + bytes(15)
    assert sense_of(lu.handle(0, cdb)) == (SenseKey.ILLEGAL_REQUEST, 0x20, 0)


# -- data -------------------------------------------------------------------------------

def test_write_then_read_on_any_member(lu) -> None:
    data = bytes(range(256)) * 16  # 8 blocks
    ok(lu.handle(0, scsi.build_write_10_cdb(100, 8), data))
    assert ok(lu.handle(1, scsi.build_read_10_cdb(100, 8))) == data
    assert ok(lu.handle(2, scsi.build_read_16_cdb(100, 8))) == data
    ok(lu.handle(2, scsi.build_write_16_cdb(lu.volume.total_blocks - 1, 1), b"z" * 512))
    assert ok(lu.handle(0, scsi.build_read_10_cdb(lu.volume.total_blocks - 1, 1))) == b"z" * 512


def test_protection_fields_are_refused(lu) -> None:
    for build in (scsi.build_read_10_cdb, scsi.build_read_16_cdb):
        cdb = bytearray(build(0, 1))
        cdb[1] |= 0x20  # RDPROTECT 001b
        assert sense_of(lu.handle(0, bytes(cdb)))[1:] == (0x24, 0)
    cdb = bytearray(scsi.build_write_10_cdb(0, 1))
    cdb[1] |= 0x60
    assert sense_of(lu.handle(0, bytes(cdb), bytes(512)))[1:] == (0x24, 0)


def test_block_device_characteristics(lu) -> None:
    data = ok(lu.handle(0, scsi.build_inquiry_cdb(evpd=True, page_code=0xB1, allocation_length_bytes=255)))
    assert data[1] == 0xB1 and int.from_bytes(data[2:4], "big") == 60 and data[4:6] == b"\0\x01"


def test_lba_out_of_range(lu) -> None:
    end = lu.volume.total_blocks
    assert sense_of(lu.handle(0, scsi.build_read_10_cdb(end, 1)))[1:] == (0x21, 0)
    assert sense_of(lu.handle(0, scsi.build_read_16_cdb(end - 1, 2)))[1:] == (0x21, 0)
    assert sense_of(lu.handle(0, scsi.build_write_16_cdb(2**63, 1), b"x" * 512))[1:] == (0x21, 0)
    assert ok(lu.handle(0, scsi.build_read_10_cdb(end, 0))) == b""


def test_short_write_is_refused_and_changes_nothing(lu) -> None:
    ok(lu.handle(0, scsi.build_write_10_cdb(0, 2), b"a" * 1024))
    assert sense_of(lu.handle(0, scsi.build_write_10_cdb(0, 2), b"b" * 1000))[1:] == (0x0E, 0x03)
    assert ok(lu.handle(0, scsi.build_read_10_cdb(0, 2))) == b"a" * 1024


def test_counters_direct_and_forwarded_per_page_portion(lu) -> None:
    blocks_per_page = MIB // 512
    # Member 1 owns page 1 (striped): a write spanning pages 0..2 from member 1.
    lba = blocks_per_page // 2
    ok(lu.handle(1, scsi.build_write_10_cdb(lba, 2 * blocks_per_page), bytes(2 * MIB)))
    counters = lu.volume.member(1).counters
    assert (counters.direct_cmds, counters.direct_bytes) == (1, MIB)
    assert (counters.forwarded_cmds, counters.forwarded_bytes) == (2, MIB)
    ok(lu.handle(0, scsi.build_read_10_cdb(0, 8)))
    assert lu.volume.member(0).counters.direct_bytes == 4096
    # Non-I/O commands are not counted.
    ok(lu.handle(2, scsi.build_inquiry_cdb()))
    assert lu.volume.member(2).counters.direct_cmds == 0


# -- unit attentions --------------------------------------------------------------------

def test_unit_attention_once_per_member_and_inquiry_exempt(lu) -> None:
    lu.volume.move_pages(0.1)
    assert ok(lu.handle(0, scsi.build_inquiry_cdb())) != b""  # INQUIRY neither reports nor clears
    assert sense_of(lu.handle(0, scsi.build_test_unit_ready_cdb())) == (SenseKey.UNIT_ATTENTION, 0x3F, 0x03)
    ok(lu.handle(0, scsi.build_test_unit_ready_cdb()))
    # Any command reports it, even a read, which then does not run.
    assert sense_of(lu.handle(1, scsi.build_read_10_cdb(0, 1)))[0] == SenseKey.UNIT_ATTENTION
    assert lu.volume.member(1).counters.direct_cmds == 0
    lu.volume.resize(96 * MIB)
    assert sense_of(lu.handle(2, scsi.build_read_capacity_10_cdb()))[1:] == (0x3F, 0x03)
    assert sense_of(lu.handle(2, scsi.build_read_capacity_10_cdb()))[1:] == (0x2A, 0x09)
    rc = scsi.decode_read_capacity_10(ok(lu.handle(2, scsi.build_read_capacity_10_cdb())))
    assert rc.capacity_bytes == 96 * MIB


def test_request_sense_reports_and_clears_unit_attention(lu) -> None:
    lu.volume.resize(32 * MIB)
    sense = scsi.decode_sense(ok(lu.handle(0, scsi.build_request_sense_cdb())))
    assert (sense.key, sense.asc, sense.ascq) == (SenseKey.UNIT_ATTENTION, 0x2A, 0x09)
    ok(lu.handle(0, scsi.build_test_unit_ready_cdb()))


def test_retired_member_still_answers_and_owns_nothing(lu) -> None:
    lu.volume.remove_member(1)
    ok(lu.handle(1, scsi.build_test_unit_ready_cdb()))
    ok(lu.handle(1, scsi.build_read_10_cdb(0, 8)))
    assert lu.volume.member(1).counters.forwarded_cmds == 1
    data = ok(lu.handle(1, scsi.build_inquiry_cdb(evpd=True, page_code=0xC0, allocation_length_bytes=255)))
    assert pagemap.decode_member_identity_vpd(data).member_id == 2


# -- GET PAGE MAP ----------------------------------------------------------------------------

def fetch_map(lu: LogicalUnit, member: int, allocation: int) -> pagemap.PageMap:
    asm = pagemap.PageMapAssembler()
    while not asm.complete:
        data = ok(lu.handle(member, pagemap.build_get_page_map_cdb(asm.next_page, allocation)))
        asm.add(pagemap.decode_page_map_response(data))
    return asm.result()


@pytest.mark.parametrize("allocation", [64 + 3 * 32 + 4 + 1, 200, 4096])
def test_page_map_in_chunks_matches_owners(lu, allocation) -> None:
    result = fetch_map(lu, 1, allocation)
    assert np.array_equal(result.owners, lu.volume.owners)
    assert result.page_size_sectors == MIB // 512
    assert [m.member_id for m in result.members] == [1, 2, 3]
    assert result.generation == 1


def test_page_map_header_poll_and_bad_cdbs(lu) -> None:
    header = pagemap.decode_page_map_header(ok(lu.handle(0, pagemap.build_get_page_map_cdb(0, 64))))
    assert (header.generation, header.total_pages) == (1, 64)
    end = ok(lu.handle(0, pagemap.build_get_page_map_cdb(64, 4096)))
    assert pagemap.decode_page_map_response(end).header.entry_count == 0
    assert sense_of(lu.handle(0, pagemap.build_get_page_map_cdb(65, 4096)))[1:] == (0x24, 0)
    bad = bytearray(pagemap.build_get_page_map_cdb(0, 4096))
    bad[1] = 2  # no such service action
    assert sense_of(lu.handle(0, bytes(bad)))[1:] == (0x24, 0)
    lu.volume.answers_changes = False  # a 1.1 array: the changes-since form is a bad CDB too
    bad[1] = pagemap_changes.SERVICE_ACTION_CHANGES_SINCE
    assert sense_of(lu.handle(0, bytes(bad)))[1:] == (0x24, 0)


def test_page_map_follows_changes(lu) -> None:
    lu.volume.move_pages(0.5)
    lu.volume.remove_member(0)
    lu.handle(1, scsi.build_test_unit_ready_cdb())  # consume the unit attentions
    lu.handle(1, scsi.build_test_unit_ready_cdb())
    result = fetch_map(lu, 1, 4096)
    assert result.generation == 3
    assert [m.name for m in result.members] == ["m1", "m2"]
    assert np.array_equal(result.owners, lu.volume.owners)


@pytest.mark.parametrize("kind,error", [
    ("bad-crc", ChecksumError), ("truncated", TruncatedError), ("entry-out-of-range", ValueRangeError)])
@pytest.mark.parametrize("members", [2, 3, 4])
def test_corrupt_next_map(tmp_path, kind, error, members) -> None:
    volume = ArrayVolume(size_bytes=64 * MIB, page_size_bytes=MIB, members=members)
    lu = LogicalUnit(volume, SparseStore(tmp_path, volume.size_bytes), LuIdentity.for_volume("vol0"))
    volume.corrupt_next_map(kind)
    with pytest.raises(error):
        pagemap.decode_page_map_response(ok(lu.handle(0, pagemap.build_get_page_map_cdb(0, 4096))))
    # Only the next response: the one after is fine.
    pagemap.decode_page_map_response(ok(lu.handle(0, pagemap.build_get_page_map_cdb(0, 4096))))


def test_corrupt_header_poll(lu) -> None:
    lu.volume.corrupt_next_map("bad-crc")
    with pytest.raises(ChecksumError):
        pagemap.decode_page_map_header(ok(lu.handle(0, pagemap.build_get_page_map_cdb(0, 64))))
    lu.volume.corrupt_next_map("truncated")
    with pytest.raises(DecodeError):
        pagemap.decode_page_map_header(ok(lu.handle(0, pagemap.build_get_page_map_cdb(0, 64))))


def test_generation_churn_breaks_a_chunked_fetch_then_settles(lu) -> None:
    lu.volume.corrupt_next_map("generation-churn", count=3)
    allocation = 64 + 3 * 32 + 6 + 4  # 24 entries a chunk: three chunks
    with pytest.raises(DecodeError):
        fetch_map(lu, 0, allocation)
    result = fetch_map(lu, 0, allocation)
    assert result.generation == 4
    assert np.array_equal(result.owners, lu.volume.owners)


def test_wants_data_out() -> None:
    assert LogicalUnit.wants_data_out(scsi.build_write_10_cdb(0, 1))
    assert LogicalUnit.wants_data_out(scsi.build_write_16_cdb(0, 1))
    assert not LogicalUnit.wants_data_out(scsi.build_read_10_cdb(0, 1))
    assert not LogicalUnit.wants_data_out(b"")


def test_identity_is_stable_and_ours() -> None:
    a, b = LuIdentity.for_volume("vol0"), LuIdentity.for_volume("vol0")
    assert a == b != LuIdentity.for_volume("vol1")
    assert a.naa.company_id == 0x025341
    assert struct.unpack(">B", a.naa.to_bytes()[:1])[0] >> 4 == 6
