"""The page-map protocol: round trips, chunked fetches, and every way a response can be bad."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from crc32c import crc32c
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import pagemap as pm
from protocol.errors import (
    BadMagicError,
    CapacityMismatchError,
    ChecksumError,
    ChunkOverlapError,
    DecodeError,
    EncodeError,
    GenerationChangedError,
    TruncatedError,
    ValueRangeError,
)

MiB = 1 << 20
MEMBERS3 = (pm.Member(11, "member-a"), pm.Member(22, "member-b"), pm.Member(33, "member-c"))


def members(n: int) -> tuple[pm.Member, ...]:
    return tuple(pm.Member(100 + i, f"m{i}") for i in range(n))


def respond(owners, start, alloc, *, generation=7, page=30720, mem=MEMBERS3) -> bytes:
    return pm.encode_page_map_response(np.asarray(owners, dtype=np.int16), generation=generation,
                                       page_size_sectors=page, members=mem, start_page=start,
                                       allocation_length=alloc)


def fetch(owners, alloc, **kw) -> pm.PageMap:
    """The host's chunk loop, over the encoder instead of a SCSI path."""
    asm = pm.PageMapAssembler()
    while True:
        asm.add(pm.decode_page_map_response(respond(owners, asm.next_page, alloc, **kw)))
        if asm.complete:
            return asm.result()


def resign(buf: bytearray) -> bytes:
    """Recompute both CRCs so a test reaches the check behind them."""
    buf[60:64] = struct.pack(">I", crc32c(bytes(buf[:60])))
    buf[-4:] = struct.pack(">I", crc32c(bytes(buf[:-4])))
    return bytes(buf)


def test_crc32c_is_castagnoli():
    assert crc32c(b"123456789") == 0xE3069283


@pytest.mark.parametrize("count,bits", [(1, 1), (2, 2), (3, 2), (4, 4), (15, 4), (16, 8), (255, 8)])
def test_bits_per_entry_leaves_all_ones_free(count, bits):
    assert pm.bits_per_entry(count) == bits


def test_cdb_round_trip_and_layout():
    cdb = pm.build_get_page_map_cdb(0x01020304, 0x0A0B0C)
    assert cdb == bytes([0xC8, 0, 1, 2, 3, 4, 0x0A, 0x0B, 0x0C, 0])
    assert pm.parse_get_page_map_cdb(cdb) == pm.GetPageMapCdb(0x01020304, 0x0A0B0C)


@pytest.mark.parametrize("cdb,error", [
    (bytes(9), TruncatedError),
    (bytes([0xC9]) + bytes(9), BadMagicError),
    (bytes([0xC8, 1]) + bytes(8), ValueRangeError),
])
def test_bad_cdb(cdb, error):
    with pytest.raises(error):
        pm.parse_get_page_map_cdb(cdb)


def test_cdb_builder_rejects_out_of_range():
    with pytest.raises(EncodeError):
        pm.build_get_page_map_cdb(1 << 32, 100)
    with pytest.raises(EncodeError):
        pm.build_get_page_map_cdb(0, 1 << 24)


def test_one_response_round_trip_with_layout_fields():
    owners = [0, 1, 2, -1, 2, 1, 0]
    data = respond(owners, 0, 4096)
    chunk = pm.decode_page_map_response(data)
    h = chunk.header
    assert (h.generation, h.page_size_sectors, h.total_pages, h.bits_per_entry) == (7, 30720, 7, 2)
    assert (h.first_page, h.entry_count, h.header_length) == (0, 7, 64 + 3 * 32)
    assert h.members == MEMBERS3
    assert len(data) == h.response_length == 64 + 96 + 2 + 4
    # LSB first: entries 0..3 = 0,1,2,3 -> 0b11_10_01_00
    assert data[160] == 0b11100100
    assert chunk.entries.tolist() == owners


def test_chunked_fetch_reassembles_and_each_chunk_fits_its_allocation():
    rng = np.random.default_rng(1)
    owners = rng.integers(-1, 3, size=10_001)
    alloc = 64 + 96 + 4 + 100  # 400 entries per chunk at 2 bits
    asm = pm.PageMapAssembler()
    sizes = []
    while not asm.complete:
        data = respond(owners, asm.next_page, alloc)
        sizes.append(len(data))
        asm.add(pm.decode_page_map_response(data))
    assert max(sizes) <= alloc
    assert len(sizes) == -(-10_001 // 400)
    result = asm.result()
    assert np.array_equal(result.owners, owners)
    assert result.pages_per_member() == {m.member_id: int((owners == i).sum()) for i, m in enumerate(MEMBERS3)}


def test_header_poll_returns_generation_with_a_checked_header():
    owners = np.zeros(1000, dtype=np.int16)
    data = respond(owners, 0, pm.HEADER_FIXED_BYTES, generation=99)
    assert len(data) == pm.HEADER_FIXED_BYTES
    header = pm.decode_page_map_header(data)
    assert (header.generation, header.total_pages, header.entry_count, header.members) == (99, 1000, 0, ())
    with pytest.raises(TruncatedError):
        pm.decode_page_map_response(data)  # a poll is not a chunk


def test_start_equal_to_total_gives_zero_entries_and_past_it_is_refused():
    owners = np.zeros(10, dtype=np.int16)
    assert pm.decode_page_map_response(respond(owners, 10, 4096)).header.entry_count == 0
    with pytest.raises(EncodeError):
        respond(owners, 11, 4096)


def test_empty_volume_is_complete_at_once():
    asm = pm.PageMapAssembler()
    asm.add(pm.decode_page_map_response(respond(np.zeros(0, dtype=np.int16), 0, 4096)))
    assert asm.complete and asm.result().total_pages == 0


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 15, 16, 17, 255])
def test_every_width_round_trips(n):
    rng = np.random.default_rng(n)
    owners = rng.integers(-1, n, size=1237)
    result = fetch(owners, 300, mem=members(n)) if n < 8 else fetch(owners, 64 + 32 * n + 300, mem=members(n))
    assert np.array_equal(result.owners, owners)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 20), st.data())
def test_property_any_map_any_chunking_round_trips(n, data):
    owners = np.array(data.draw(st.lists(st.integers(-1, n - 1), max_size=500)), dtype=np.int16)
    header = 64 + 32 * n
    alloc = data.draw(st.integers(header + 5, header + 200))
    assert np.array_equal(fetch(owners, alloc, mem=members(n)).owners, owners)


# -- what a bad array can send ---------------------------------------------------

def good() -> bytearray:
    return bytearray(respond([0, 1, 2, 0, 1], 0, 4096))


def test_bad_magic():
    buf = good()
    buf[0:4] = b"XXXX"
    with pytest.raises(BadMagicError) as info:
        pm.decode_page_map_response(bytes(buf))
    assert info.value.field == "magic"


def test_header_crc_names_the_field():
    buf = good()
    buf[8] ^= 1  # generation
    with pytest.raises(ChecksumError) as info:
        pm.decode_page_map_response(bytes(buf))
    assert info.value.field == "header CRC"


def test_body_crc():
    buf = good()
    buf[-5] ^= 0x01  # last entry byte; header CRC still good
    with pytest.raises(ChecksumError) as info:
        pm.decode_page_map_response(bytes(buf))
    assert info.value.field == "response CRC"


def test_truncated_response():
    with pytest.raises(TruncatedError) as info:
        pm.decode_page_map_response(bytes(good()[:-1]))
    assert "response" in str(info.value)


def test_entry_out_of_range_names_the_entry():
    buf = good()
    buf[160] = 0b11_10_01_00 | 0  # entries 0..3 = 0,1,2,3(unallocated): fine
    buf[161] = 0b10  # entry 4 = 2: fine
    pm.decode_page_map_response(resign(buf))
    # 4 members -> 4 bits; value 5 names no member and is not 0xF
    four = bytearray(respond([0, 1], 0, 4096, mem=members(4)))
    four[64 + 128] = 0x50
    with pytest.raises(ValueRangeError) as info:
        pm.decode_page_map_response(resign(four))
    assert (info.value.field, info.value.got) == ("entry 1", 5)


@pytest.mark.parametrize("offset,value,field", [
    (4, 2, "format version"),
    (5, 4, "bits per entry"),
    (6, 0, "member count"),
    (20, 0, "header length"),
    (44, 0, "response length"),
    (50, 1, "reserved fields"),
    (16, 0, "page size"),
])
def test_header_field_checks(offset, value, field):
    buf = good()
    if offset in (20, 44):
        struct.pack_into(">H" if offset == 20 else ">I", buf, offset, value)
    elif offset == 16:
        struct.pack_into(">I", buf, offset, value)
    else:
        buf[offset] = value
    with pytest.raises(DecodeError) as info:
        pm.decode_page_map_response(resign(buf))
    assert info.value.field == field


def test_chunk_past_total_pages():
    buf = good()
    struct.pack_into(">Q", buf, 32, 1)  # first page 1 + 5 entries > 5 pages
    with pytest.raises(ValueRangeError) as info:
        pm.decode_page_map_response(resign(buf))
    assert info.value.field == "first page + entry count"


def test_duplicate_member_ids():
    buf = bytearray(respond([0, 1], 0, 4096))
    struct.pack_into(">I", buf, 64 + 32, 11)  # member 1 gets member 0's id
    with pytest.raises(ValueRangeError) as info:
        pm.decode_page_map_response(resign(buf))
    assert info.value.field == "member ids"


def test_generation_change_mid_fetch():
    owners = np.zeros(1000, dtype=np.int16)
    asm = pm.PageMapAssembler()
    asm.add(pm.decode_page_map_response(respond(owners, 0, 300, generation=1)))
    with pytest.raises(GenerationChangedError) as info:
        asm.add(pm.decode_page_map_response(respond(owners, asm.next_page, 300, generation=2)))
    assert (info.value.expected, info.value.got) == (1, 2)


def test_chunk_overlap_and_gap():
    owners = np.zeros(1000, dtype=np.int16)
    asm = pm.PageMapAssembler()
    asm.add(pm.decode_page_map_response(respond(owners, 0, 300)))
    with pytest.raises(ChunkOverlapError):
        asm.add(pm.decode_page_map_response(respond(owners, asm.next_page - 1, 300)))
    with pytest.raises(ChunkOverlapError):
        asm.add(pm.decode_page_map_response(respond(owners, asm.next_page + 1, 300)))


def test_no_progress_chunk_is_an_error_not_a_hang():
    owners = np.zeros(1000, dtype=np.int16)
    asm = pm.PageMapAssembler()
    with pytest.raises(ChunkOverlapError):
        asm.add(pm.decode_page_map_response(respond(owners, 0, 64 + 96 + 4)))


def test_result_before_complete():
    with pytest.raises(TruncatedError):
        pm.PageMapAssembler().result()


def test_encoder_refuses_what_it_cannot_say():
    with pytest.raises(EncodeError):
        respond([3], 0, 4096)  # owner 3 with 3 members
    with pytest.raises(EncodeError):
        respond([0], 0, 4096, mem=(pm.Member(1, "x" * 29),))
    with pytest.raises(EncodeError):
        respond([0], 0, 4096, mem=(pm.Member(1, "a"), pm.Member(1, "b")))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_response_decoder_raises_only_decode_errors(blob):
    try:
        pm.decode_page_map_response(blob)
    except DecodeError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_mutated_valid_responses(data):
    buf = bytearray(respond(list(range(3)) * 20, 0, 4096))
    for _ in range(data.draw(st.integers(1, 4))):
        buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        resign(buf)
    try:
        chunk = pm.decode_page_map_response(bytes(buf))
    except DecodeError:
        return
    assert chunk.entries.min() >= pm.UNALLOCATED
    assert chunk.entries.max(initial=0) < chunk.header.member_count


# -- VPD 0xC0 -------------------------------------------------------------------

def test_member_identity_round_trip():
    ident = pm.MemberIdentity(member_id=0xDEAD, generation=5, name="member-b")
    data = pm.encode_member_identity_vpd(ident)
    assert data[1] == 0xC0 and struct.unpack(">H", data[2:4])[0] == len(data) - 4
    assert pm.decode_member_identity_vpd(data) == ident


@pytest.mark.parametrize("mutate,error", [
    (lambda b: b[:20], TruncatedError),
    (lambda b: b[:1] + b"\xc1" + b[2:], BadMagicError),
    (lambda b: b[:4] + b"XXXX" + b[8:], BadMagicError),
    (lambda b: b[:24] + b"\x01" * 24, ValueRangeError),
])
def test_member_identity_rejects(mutate, error):
    data = pm.encode_member_identity_vpd(pm.MemberIdentity(1, 1, "m"))
    with pytest.raises(error):
        pm.decode_member_identity_vpd(mutate(data))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=80))
def test_fuzz_member_identity(blob):
    try:
        pm.decode_member_identity_vpd(blob)
    except DecodeError:
        pass


@pytest.mark.parametrize("count,dtype", [(3, np.int8), (127, np.int8), (128, np.int16), (255, np.int16)])
def test_decoded_owners_are_as_narrow_as_the_member_count_allows(count, dtype):
    owners = np.arange(-1, 299) % (count + 1) - 1  # every member index and UNALLOCATED
    page_map = fetch(owners, 1 << 16, mem=members(count))
    assert page_map.owners.dtype == dtype
    assert np.array_equal(page_map.owners, owners)


# -- the first chunk's geometry, checked before it sizes anything (issue #13) ---------------------

def forged(total: int, *, page: int = 2048) -> pm.PageMapChunk:
    buf = bytearray(respond([0, 1, 2], 0, 4096, page=page))
    struct.pack_into(">Q", buf, 24, total)
    return pm.decode_page_map_response(resign(buf))


def test_more_pages_than_the_cap_are_refused_before_allocating():
    with pytest.raises(ValueRangeError, match="total pages") as info:
        pm.PageMapAssembler().add(forged(2**40))  # was numpy's MemoryError: untyped, nothing recorded
    assert info.value.got == 2**40
    pm.PageMapAssembler(max_pages=3).add(forged(3))


@pytest.mark.parametrize("capacity, ok", [(3 * MiB, True), (3 * MiB - 512, True), (2 * MiB, False),
                                          (3 * MiB + 512, False)])
def test_the_pages_must_cover_exactly_the_luns_capacity(capacity, ok):
    asm = pm.PageMapAssembler(capacity_bytes=capacity)
    if ok:
        asm.add(forged(3))  # 3 pages of 1 MiB; the last may be partial
        assert asm.complete
    else:
        with pytest.raises(CapacityMismatchError, match="total pages"):
            asm.add(forged(3))


@pytest.mark.parametrize("block, page_sectors, ok", [(4096, 8, True), (4096, 16, True), (4096, 4, False),
                                                     (4096, 12, False), (512, 1, True)])
def test_pages_are_whole_logical_blocks(block, page_sectors, ok):
    asm = pm.PageMapAssembler(capacity_bytes=3 * page_sectors * 512, logical_block_bytes=block)
    if ok:
        asm.add(forged(3, page=page_sectors))
    else:
        with pytest.raises(ValueRangeError, match="page size"):
            asm.add(forged(3, page=page_sectors))


def test_a_lun_past_a_loff_t_is_refused():
    with pytest.raises(ValueRangeError, match="capacity"):
        pm.PageMapAssembler(capacity_bytes=2**64 * 512)


def test_chunks_are_capped_by_what_the_allocation_holds():
    owners = np.zeros(1000, dtype=np.int16)
    asm = pm.PageMapAssembler(allocation_length=64 + 96 + 4 + 250)  # 1000 entries a chunk at 2 bits
    with pytest.raises(ValueRangeError, match="chunks") as info:
        while True:  # the array answers 10 entries a chunk
            asm.add(pm.decode_page_map_response(respond(owners, asm.next_page, 64 + 96 + 4 + 3)))
    assert info.value.got == 2 * pm.CHUNK_SLACK + 1
