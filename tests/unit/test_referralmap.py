"""protocol/referralmap.py: REPORT REFERRALS segments -> dm-switch regions."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import scsi
from protocol.errors import DecodeError, UnroutableLayoutError, ValueRangeError
from protocol.pagemap import UNALLOCATED
from protocol.referralmap import MAX_REGION_SECTORS, optimized_group, referral_region_map, referrals_generation
from tests.unit.fakes_referrals import segment

GROUPS = (1, 2, 3)


def owners_by_group(page_map) -> list[int]:
    """Each region's TPG id, -1 for don't care."""
    ids = [m.member_id for m in page_map.members]
    return [ids[o] if o != UNALLOCATED else -1 for o in page_map.owners]


def test_even_segments_give_one_region_per_segment():
    segs = [segment(k * 2048, k * 2048 + 2047, GROUPS[k % 3], GROUPS) for k in range(6)]
    m = referral_region_map(segs, capacity_blocks=6 * 2048, block_bytes=512)
    assert m.page_size_sectors == 2048
    assert [x.member_id for x in m.members] == [1, 2, 3]
    assert owners_by_group(m) == [1, 2, 3, 1, 2, 3]


def test_uneven_segments_use_the_gcd_of_their_boundaries():
    # 4 KiB blocks: segments of 3, 1 and 5 MiB and an uncovered tail of 2 MiB.
    mib = 256
    segs = [segment(0, 3 * mib - 1, 2, GROUPS), segment(3 * mib, 4 * mib - 1, 3, GROUPS),
            segment(4 * mib, 9 * mib - 1, 1, GROUPS)]
    m = referral_region_map(segs, capacity_blocks=11 * mib, block_bytes=4096)
    assert m.page_size_sectors == 2048  # 1 MiB
    assert owners_by_group(m) == [2, 2, 2, 3, 1, 1, 1, 1, 1, -1, -1]


def test_a_segment_without_an_optimized_group_is_dont_care():
    segs = [segment(0, 99, 1, GROUPS), segment(100, 199, None, GROUPS), segment(200, 299, 3, GROUPS)]
    m = referral_region_map(segs, capacity_blocks=300, block_bytes=512)
    assert owners_by_group(m) == [1, -1, 3]
    assert [x.member_id for x in m.members] == [1, 3]  # group 2 optimizes nothing: no leg for it


def test_the_first_optimized_group_listed_wins():
    both = scsi.UserDataSegmentReferral(0, 9, (
        scsi.ReferralTargetPortGroup(scsi.AluaState.STANDBY, 1),
        scsi.ReferralTargetPortGroup(scsi.AluaState.ACTIVE_OPTIMIZED, 3),
        scsi.ReferralTargetPortGroup(scsi.AluaState.ACTIVE_OPTIMIZED, 2)))
    assert optimized_group(both) == 3


def test_a_short_last_region_is_allowed():
    segs = [segment(0, 1023, 1, GROUPS), segment(1024, 1500, 2, GROUPS)]
    m = referral_region_map(segs, capacity_blocks=1501, block_bytes=512)
    assert m.page_size_sectors == 1024 and owners_by_group(m) == [1, 2]


def test_descriptors_order_does_not_matter():
    segs = [segment(100, 199, 2, GROUPS), segment(0, 99, 1, GROUPS)]
    assert owners_by_group(referral_region_map(segs, capacity_blocks=200, block_bytes=512)) == [1, 2]


def test_a_multiplier_repeats_the_pattern_over_the_lun():
    # LIO's data path: segment size 1024, multiplier 3 -> period 3072, the pattern repeats.
    segs = [segment(0, 1023, 1, GROUPS), segment(1024, 2047, 2, GROUPS), segment(2048, 3071, 3, GROUPS)]
    m = referral_region_map(segs, capacity_blocks=10 * 1024, block_bytes=512, segment_size_blocks=1024,
                            segment_multiplier=3)
    assert m.page_size_sectors == 1024
    assert owners_by_group(m) == [1, 2, 3, 1, 2, 3, 1, 2, 3, 1]


@pytest.mark.parametrize("segs, match", [
    ([segment(0, 2000, 1, GROUPS)], "LUN"),
    ([segment(0, 99, 1, GROUPS), segment(50, 149, 2, GROUPS)], "overlap"),
    ([], "at least one"),
])
def test_contradictory_descriptors_are_a_clear_error(segs, match):
    with pytest.raises(ValueRangeError, match=match):
        referral_region_map(segs, capacity_blocks=1000, block_bytes=512)


def test_a_layout_needing_too_many_regions_is_refused():
    segs = [segment(0, 0, 1, GROUPS), segment(1, 999_999, 2, GROUPS)]
    with pytest.raises(UnroutableLayoutError, match="regions") as info:
        referral_region_map(segs, capacity_blocks=1_000_000, block_bytes=512, max_regions=1000)
    assert isinstance(info.value, DecodeError)  # the array's answer, not a path's: not retried elsewhere


def test_one_segment_over_a_huge_lun_gets_a_region_size_dm_switch_accepts():
    blocks = 3 * MAX_REGION_SECTORS  # 6 TiB of 512-byte blocks
    m = referral_region_map([segment(0, blocks - 1, 2, GROUPS)], capacity_blocks=blocks, block_bytes=512)
    assert m.page_size_sectors <= MAX_REGION_SECTORS and blocks % m.page_size_sectors == 0
    assert set(owners_by_group(m)) == {2}


def test_generation_stand_in_follows_the_answers():
    a = referrals_generation(b"\x00\xb3", b"abc")
    assert a == referrals_generation(b"\x00\xb3", b"abc")
    assert a != referrals_generation(b"\x00\xb3", b"abd") and a != referrals_generation(b"\x00\xb3a", b"bc")
    assert 0 <= a < 1 << 56


def test_a_big_layout_converts_without_per_region_python(capsys):
    # 3000 segments (LIO's 16-bit RETURN DATA LENGTH allows ~3276) over 1.5M regions.
    rng = np.random.default_rng(1)
    cuts = np.sort(rng.choice(np.arange(1, 1_572_864), 2999, replace=False))
    bounds = np.concatenate([[0], cuts, [1_572_864]]) * 8  # regions of 8 blocks
    segs = [segment(int(a), int(b) - 1, int(rng.integers(1, 5)), (1, 2, 3, 4)) for a, b in zip(bounds, bounds[1:])]
    t = time.perf_counter()
    m = referral_region_map(segs, capacity_blocks=int(bounds[-1]), block_bytes=512)
    print(f"3000 segments -> {m.total_pages} regions in {time.perf_counter() - t:.3f} s")
    assert m.total_pages == 1_572_864 and m.page_size_sectors == 8


@st.composite
def layouts(draw):
    block_bytes = draw(st.sampled_from([512, 4096]))
    sizes = draw(st.lists(st.integers(1, 40), min_size=1, max_size=12))
    unit = draw(st.sampled_from([1, 2, 8, 3]))
    owners = draw(st.lists(st.sampled_from([None, 1, 2, 7]), min_size=len(sizes), max_size=len(sizes)))
    tail = draw(st.integers(0, 17))
    segs, at = [], 0
    for size, owner in zip(sizes, owners):
        segs.append(segment(at, at + size * unit - 1, owner, (1, 2, 7)))
        at += size * unit
    order = draw(st.permutations(range(len(segs))))
    return [segs[i] for i in order], at + tail, block_bytes


@settings(max_examples=300, deadline=None)
@given(layouts())
def test_every_block_routes_to_its_segments_optimized_group(layout):
    segs, capacity, block_bytes = layout
    m = referral_region_map(segs, capacity_blocks=capacity, block_bytes=block_bytes)
    region_blocks = m.page_size_sectors // (block_bytes // 512)
    assert m.total_pages == -(-capacity // region_blocks)
    per_block = np.repeat(np.array(owners_by_group(m)), region_blocks)[:capacity]
    expected = np.full(capacity, -1)
    for s in segs:
        expected[s.first_lba:s.last_lba + 1] = optimized_group(s)
    assert (per_block == expected).all()


# -- what a hostile array can send (issue #13: every byte of every answer is untrusted) ----------

@pytest.mark.parametrize("boundary, capacity, block_bytes", [
    (2**32 - 5, 2**33, 1024),       # a prime: region size 1 block, 2^33 regions
    (2**54 - 33, 2**54 - 1, 512),   # the largest prime below 2^54 on the largest LUN a kernel holds
], ids=["prime 2^32-5", "prime 2^54-33"])
def test_a_prime_boundary_is_refused_in_bounded_time(boundary, capacity, block_bytes):
    segs = [segment(0, boundary - 1, 1, GROUPS), segment(boundary, capacity - 1, 2, GROUPS)]
    t = time.perf_counter()
    with pytest.raises(UnroutableLayoutError, match="region"):
        referral_region_map(segs, capacity_blocks=capacity, block_bytes=block_bytes)
    assert time.perf_counter() - t < 1.0  # one candidate at a time took ~9 minutes for 2^32-5


def test_a_large_boundary_that_fits_after_division_still_converts():
    # gcd 3 x 2^32 blocks of 1 KiB is too big for dm-switch; its divisor 2^31 x 3 / 2 fits.
    segs = [segment(0, 3 * 2**32 - 1, 1, GROUPS), segment(3 * 2**32, 2**34 - 1, 2, GROUPS)]
    m = referral_region_map(segs, capacity_blocks=2**34, block_bytes=1024)
    assert m.page_size_sectors <= MAX_REGION_SECTORS and (3 * 2**32 * 2) % m.page_size_sectors == 0
    assert owners_by_group(m)[:2] == [1, 1] and owners_by_group(m)[-1] == 2


@pytest.mark.parametrize("capacity, block_bytes", [
    (2**64, 512),        # READ CAPACITY(16) with RETURNED LBA 2^64-1
    (2**62, 512),        # a boundary at 2^61-1 needs a LUN past 2^61 blocks
    (2**53 + 1, 1024),   # one block past what a loff_t holds
])
def test_a_lun_no_kernel_can_hold_is_refused(capacity, block_bytes):
    segs = [segment(0, 2**61 - 2, 1, GROUPS), segment(2**61 - 1, capacity - 1, 2, GROUPS)]
    with pytest.raises(ValueRangeError, match="capacity"):
        referral_region_map(segs, capacity_blocks=capacity, block_bytes=block_bytes)


@pytest.mark.parametrize("segs, size, multiplier", [
    ([segment(0, 5, 1, GROUPS), segment(6, 2**64 - 1, 2, GROUPS)], 0, 0),    # last LBA + 1 wraps uint64
    ([segment(2**64 - 1, 2**64 - 1, 1, GROUPS)], 2, 3),                      # first + size wraps
    ([segment(2**63, 2**63, 1, GROUPS)], 0, 0),                              # past int64
    ([segment(0, 0, 1, GROUPS), segment(2**64 - 2, 2**64 - 1, 2, GROUPS)], 2**32 - 1, 2**32 - 1),
])
def test_lbas_at_the_wire_s_limits_are_a_typed_error(segs, size, multiplier):
    with pytest.raises(ValueRangeError, match="segment"):
        referral_region_map(segs, capacity_blocks=1024, block_bytes=512, segment_size_blocks=size,
                            segment_multiplier=multiplier)


@pytest.mark.parametrize("multiplier", [2**28, 2**32 - 1])
def test_a_huge_multiplier_paints_no_more_than_the_lun(multiplier):
    import tracemalloc

    segs = [segment(0, 0, 1, GROUPS), segment(3, 3, 2, GROUPS)]  # size 1: blocks 0 and 3 of each period
    tracemalloc.start()
    try:
        m = referral_region_map(segs, capacity_blocks=1024, block_bytes=512, segment_size_blocks=1,
                                segment_multiplier=multiplier)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # painting the period (2^28 regions) took 548 MiB
    # The period is past the LUN's end: the pattern never repeats within it.
    assert m.total_pages == 1024 and owners_by_group(m)[:5] == [1, -1, -1, 2, -1]
    assert set(owners_by_group(m)[4:]) == {-1}
