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
