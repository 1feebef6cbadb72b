"""GET PAGE MAP's changes-since form: the codec both ways, every way an answer can be bad, the emulator's log."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import pagemap as pm
from protocol import pagemap_changes as pc
from protocol.errors import (
    BadMagicError,
    ChangesUnavailableError,
    ChecksumError,
    ChunkOverlapError,
    DecodeError,
    EncodeError,
    GenerationChangedError,
    TruncatedError,
    ValueRangeError,
)
from protocol.pagemap_changes import ChangesStatus
from protocol.scsi import ScsiStatus
from tests.array.lu import LogicalUnit, LuIdentity
from tests.array.store import SparseStore
from tests.array.volume import ArrayVolume, ChangeLog
from tests.unit.fakes_hostile import forge_changes, resign_page_map

MEMBERS3 = (pm.Member(11, "member-a"), pm.Member(22, "member-b"), pm.Member(33, "member-c"))
PAGES = 1000
ALLOC = 64 * 1024


def held_map(owners=None, generation=5) -> pm.PageMap:
    owners = np.arange(PAGES, dtype=np.int8) % 3 if owners is None else owners
    return pm.PageMap(generation, 2048, MEMBERS3, owners)


def answer(pages=(), owners=(), *, status=ChangesStatus.CHANGES, since=5, to=7, current=7, total=PAGES,
           members=MEMBERS3, alloc=ALLOC, page=2048) -> bytes:
    return pc.encode_changes_response(
        status=status, current_generation=current, total_pages=total, page_size_sectors=page, members=members,
        allocation_length=alloc, from_generation=since, to_generation=to,
        pages=np.asarray(pages, dtype=np.int64), owners=np.asarray(owners, dtype=np.int64))


def apply(current: pm.PageMap, *answers: bytes) -> pm.PageMap:
    asm = pc.ChangesAssembler(current)
    for data in answers:
        asm.add(pc.decode_changes_response(data))
    return asm.result()


# -- CDB ----------------------------------------------------------------------------

def test_cdb_carries_the_service_action_and_the_generations_low_32_bits():
    cdb = pc.build_changes_since_cdb(0x1_2345_6789, 4096)
    assert len(cdb) == pm.GET_PAGE_MAP_CDB_LEN and cdb[0] == pm.GET_PAGE_MAP_OPCODE and cdb[1] == 1
    assert pc.is_changes_since_cdb(cdb) and not pc.is_changes_since_cdb(pm.build_get_page_map_cdb(0, 4096))
    assert pc.parse_changes_since_cdb(cdb) == pc.ChangesSinceCdb(0x2345_6789, 4096)
    with pytest.raises(ValueRangeError):  # a 1.1 array's full-map form is not this
        pc.parse_changes_since_cdb(pm.build_get_page_map_cdb(0, 4096))
    with pytest.raises(EncodeError):
        pc.build_changes_since_cdb(1 << 64, 4096)
    with pytest.raises(EncodeError):
        pc.build_changes_since_cdb(1, 1 << 24)


def test_member_identity_advertises_the_feature_in_a_byte_1_1_left_reserved():
    data = pm.encode_member_identity_vpd(pm.MemberIdentity(7, 9, "m", pc.FEATURE_CHANGES_SINCE))
    assert data[9] == pc.FEATURE_CHANGES_SINCE
    assert pm.decode_member_identity_vpd(data).features == pc.FEATURE_CHANGES_SINCE
    # The byte is all that differs, and it was reserved padding to a 1.1 host's decoder.
    plain = pm.encode_member_identity_vpd(pm.MemberIdentity(7, 9, "m"))
    assert [i for i in range(len(data)) if data[i] != plain[i]] == [9]
    assert struct.unpack(">BBH4sB3xIQ24s", data) == struct.unpack(">BBH4sB3xIQ24s", plain)
    # A 1.1 array's page (byte 9 zero): the host never asks for changes.
    assert pm.decode_member_identity_vpd(pm.encode_member_identity_vpd(pm.MemberIdentity(7, 9, "m"))).features == 0


# -- runs and round trips ---------------------------------------------------------------

def test_runs_join_consecutive_pages_of_one_owner_and_split_past_24_bits():
    first, length, owner = pc.runs_of(np.array([3, 4, 5, 7, 8, 9]), np.array([1, 1, 2, 0, 0, 0]))
    assert first.tolist() == [3, 5, 7] and length.tolist() == [2, 1, 3] and owner.tolist() == [1, 2, 0]
    big = np.arange(pc.MAX_RUN_PAGES + 10)
    first, length, owner = pc.runs_of(big, np.zeros(big.size))
    assert first.tolist() == [0, pc.MAX_RUN_PAGES] and length.tolist() == [pc.MAX_RUN_PAGES, 10]
    with pytest.raises(EncodeError):
        pc.runs_of(np.array([2, 1]), np.array([0, 0]))


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_round_trip_applies_exactly_the_changes(data):
    total = data.draw(st.integers(1, 300))
    old = np.asarray(data.draw(st.lists(st.integers(-1, 2), min_size=total, max_size=total)), dtype=np.int8)
    pages = np.array(sorted(data.draw(st.sets(st.integers(0, total - 1), max_size=total))), dtype=np.int64)
    owners = np.asarray(data.draw(st.lists(st.integers(-1, 2), min_size=pages.size, max_size=pages.size)),
                        dtype=np.int64)
    current = pm.PageMap(5, 2048, MEMBERS3, old)
    result = apply(current, answer(pages, owners, total=total))
    expected = old.copy()
    expected[pages] = owners
    assert np.array_equal(result.owners, expected) and result.generation == 7
    assert result.changed_since == 5
    assert result.changed_pages.tolist() == np.flatnonzero(old != expected).tolist()
    assert np.array_equal(current.owners, old)  # the held map is not touched


def test_chunks_follow_generations_and_a_later_answer_wins():
    current = held_map()
    first = answer([10, 11], [2, 2], since=5, to=6, current=8)
    second = answer([11, 12], [0, 0], since=6, to=8, current=8)
    result = apply(current, first, second)
    assert result.generation == 8 and result.owners[10] == 2 and result.owners[11] == 0
    assert result.owners[12] == 0 and result.changed_pages.tolist() == [10, 11]  # 12 was already 0


def test_nothing_since_is_an_empty_answer_at_the_current_generation():
    result = apply(held_map(), answer(since=5, to=5, current=5))
    assert result.generation == 5 and result.changed_pages.size == 0


# -- what the array may say instead ------------------------------------------------------

@pytest.mark.parametrize("status", [ChangesStatus.TOO_OLD, ChangesStatus.RESHAPED, ChangesStatus.TOO_LARGE])
def test_whole_map_answers_say_so(status):
    chunk = pc.decode_changes_response(answer(status=status, current=42))
    assert chunk.header.status == status and chunk.header.current_generation == 42
    with pytest.raises(ChangesUnavailableError) as error:
        pc.ChangesAssembler(held_map()).add(chunk)
    assert error.value.current_generation == 42


def test_geometry_or_members_unlike_the_held_map_are_refused():
    with pytest.raises(GenerationChangedError):
        apply(held_map(), answer([1], [0], total=PAGES + 1))
    with pytest.raises(GenerationChangedError):
        apply(held_map(), answer([1], [0], page=4096))
    with pytest.raises(GenerationChangedError):
        apply(held_map(), answer([1], [0], members=MEMBERS3[:2]))


def test_an_answer_from_another_generation_is_refused():
    with pytest.raises(ValueRangeError, match="from generation"):
        apply(held_map(generation=4), answer([1], [0]))


def test_generations_from_the_future_or_going_nowhere_are_refused():
    data = answer([1], [0])
    with pytest.raises(ValueRangeError, match="generations"):
        pc.decode_changes_response(forge_changes(data, to_generation=8))  # past the array's current (7)
    with pytest.raises(ValueRangeError, match="generations"):
        pc.decode_changes_response(forge_changes(data, to_generation=5))  # no progress, with runs
    with pytest.raises(ValueRangeError, match="generations"):
        pc.decode_changes_response(forge_changes(data, from_generation=9))
    with pytest.raises(EncodeError):  # the array side refuses to say it, too
        answer([1], [0], since=8, to=7, current=7)


def test_a_trickling_array_is_left_after_max_chunks():
    asm = pc.ChangesAssembler(held_map(generation=0))
    for generation in range(pc.MAX_CHUNKS):
        asm.add(pc.decode_changes_response(answer([1], [generation % 3], since=generation, to=generation + 1,
                                                  current=1000)))
    with pytest.raises(ChangesUnavailableError, match="answers"):
        asm.add(pc.decode_changes_response(answer([1], [0], since=pc.MAX_CHUNKS, to=pc.MAX_CHUNKS + 1,
                                                  current=1000)))


def test_result_before_the_current_generation_is_an_error():
    asm = pc.ChangesAssembler(held_map())
    asm.add(pc.decode_changes_response(answer([1], [0], to=6, current=7)))
    assert not asm.complete and asm.since == 6
    with pytest.raises(TruncatedError):
        asm.result()


# -- bad bytes ----------------------------------------------------------------------------

def _runs_at(data: bytes) -> int:
    return pm.HEADER_FIXED_BYTES + pm.MEMBER_RECORD_BYTES * len(MEMBERS3)


def test_checksums_magic_and_lengths():
    data = answer([1, 2], [0, 1])
    with pytest.raises(ChecksumError):
        pc.decode_changes_response(data[:-1] + bytes([data[-1] ^ 1]))
    bad = bytearray(data)
    bad[0:4] = b"SAPM"
    with pytest.raises(BadMagicError):
        pc.decode_changes_response(resign_page_map(bad))
    with pytest.raises(TruncatedError):
        pc.decode_changes_response(data[:-3])
    with pytest.raises(ValueRangeError):
        pc.decode_changes_response(data + b"\0")
    with pytest.raises(TruncatedError):
        pc.decode_changes_response(data[:40])
    with pytest.raises(ValueRangeError, match="response length"):
        pc.decode_changes_response(forge_changes(data, run_count=3))
    with pytest.raises(ValueRangeError, match="status"):
        pc.decode_changes_response(forge_changes(data, status=9))
    with pytest.raises(ValueRangeError, match="run count"):
        pc.decode_changes_response(forge_changes(data, status=int(ChangesStatus.TOO_OLD)))


def test_oversize_claims_are_refused_before_anything_is_sized_by_them():
    data = answer([1], [0])
    with pytest.raises(ValueRangeError, match="total pages"):
        pc.decode_changes_response(forge_changes(data, total_pages=pm.MAX_PAGES + 1))
    with pytest.raises(ValueRangeError, match="run count"):
        pc.decode_changes_response(forge_changes(data, run_count=PAGES + 1,
                                         response_length=pc.response_length(3, PAGES + 1)))


def _with_run(data: bytes, index: int, first: int, length_owner: int) -> bytes:
    buf = bytearray(data)
    struct.pack_into(">II", buf, _runs_at(data) + 8 * index, first, length_owner)
    return resign_page_map(buf)


def test_runs_outside_the_volume_overlapping_or_naming_no_member_are_refused():
    data = answer([10, 20], [0, 1])
    with pytest.raises(ValueRangeError, match="run 1"):
        pc.decode_changes_response(_with_run(data, 1, PAGES, 1 << 8))  # past the last page
    with pytest.raises(ValueRangeError, match="run 1"):
        pc.decode_changes_response(_with_run(data, 1, PAGES - 1, (2 << 8) | 1))  # runs over the end
    with pytest.raises(ValueRangeError, match="length"):
        pc.decode_changes_response(_with_run(data, 0, 10, 0))  # an empty run
    with pytest.raises(ChunkOverlapError):
        pc.decode_changes_response(_with_run(data, 1, 10, 1 << 8))  # same page twice
    with pytest.raises(ChunkOverlapError):
        pc.decode_changes_response(_with_run(data, 1, 5, 1 << 8))  # out of order
    with pytest.raises(ValueRangeError, match="owner"):
        pc.decode_changes_response(_with_run(data, 0, 10, (1 << 8) | 3))  # member 3 of 3
    unallocated = pc.decode_changes_response(_with_run(data, 0, 10, (1 << 8) | 0xFF))
    assert unallocated.owner.tolist() == [pm.UNALLOCATED, 1]


def test_every_decode_error_is_a_decode_error():
    data = answer([1, 2, 3], [0, 1, 2])
    rng = np.random.default_rng(3)
    for _ in range(300):
        buf = bytearray(data)
        buf[int(rng.integers(0, len(buf)))] = int(rng.integers(0, 256))
        try:
            pc.decode_changes_response(resign_page_map(buf))
        except DecodeError:
            pass


# -- the emulator -------------------------------------------------------------------------

def emulated(tmp_path, **kw) -> LogicalUnit:
    volume = ArrayVolume(size_bytes=256 << 20, page_size_bytes=1 << 20, members=3, layout="random", **kw)
    return LogicalUnit(volume, SparseStore(tmp_path, 256 << 20), LuIdentity.for_volume("vol0"))


def data_in(lu: LogicalUnit, cdb: bytes) -> bytes:
    """The answer past the unit attentions a change raises."""
    for _ in range(10):
        result = lu.handle(0, cdb)
        if result.status == ScsiStatus.GOOD:
            return bytes(result.data_in)
    raise AssertionError(f"no answer: {result}")


def ask(lu: LogicalUnit, since: int, alloc: int = ALLOC) -> pc.ChangesChunk:
    return pc.decode_changes_response(data_in(lu, pc.build_changes_since_cdb(since, alloc)))


def full_map(lu: LogicalUnit) -> pm.PageMap:
    data = data_in(lu, pm.build_get_page_map_cdb(0, ALLOC))
    asm = pm.PageMapAssembler()
    asm.add(pm.decode_page_map_response(data))
    return asm.result()


def test_emulator_answers_what_moves_changed(tmp_path):
    lu = emulated(tmp_path)
    before = full_map(lu)
    lu.volume.move_pages(0.05)
    lu.volume.move_pages(0.05)
    asm = pc.ChangesAssembler(before)
    asm.add(ask(lu, before.generation))
    result = asm.result()
    assert result.generation == lu.volume.generation == 3
    assert np.array_equal(result.owners, lu.volume.owners)
    assert result.changed_pages.tolist() == np.flatnonzero(before.owners != lu.volume.owners).tolist()


def test_emulator_chunks_by_generation_when_all_does_not_fit(tmp_path):
    lu = emulated(tmp_path)
    before = full_map(lu)
    for _ in range(3):
        lu.volume.move_pages(10 / 256)  # 10 pages a generation
    alloc = pc.response_length(3, 12)  # room for one generation's runs, not two
    asm = pc.ChangesAssembler(before)
    answers = 0
    while not asm.complete:
        asm.add(ask(lu, asm.since, alloc))
        answers += 1
    assert answers == 3 and np.array_equal(asm.result().owners, lu.volume.owners)
    assert ask(lu, before.generation, pc.response_length(3, 5)).header.status == ChangesStatus.TOO_LARGE


def test_emulator_log_is_bounded_and_reshapes_reset_it(tmp_path):
    lu = emulated(tmp_path)
    for _ in range(ChangeLog.MAX_GENERATIONS + 1):
        lu.volume.bump_generation()
    assert ask(lu, 1).header.status == ChangesStatus.TOO_OLD
    assert ask(lu, 2).header.status == ChangesStatus.CHANGES
    assert ask(lu, 10_000).header.status == ChangesStatus.TOO_OLD  # a generation it never had
    generation = lu.volume.generation
    lu.volume.resize(300 << 20)
    assert ask(lu, generation).header.status == ChangesStatus.RESHAPED
    generation = lu.volume.generation
    lu.volume.add_member()
    assert ask(lu, generation).header.status == ChangesStatus.RESHAPED
    assert ask(lu, lu.volume.generation).header.to_generation == lu.volume.generation
