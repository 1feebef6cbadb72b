"""REPORT REFERRALS -> a region map dm-switch can carry (a PageMap). Pure, numpy, no I/O.

SBC-3 referrals describe user data segments by first and last LBA, each with
the target port groups (TPGs) that reach it and their asymmetric access
state. dm-switch wants fixed-size regions. The region size here is the
largest one every segment boundary falls on (the gcd of the boundaries, the
LUN's end excepted: dm-switch's last region may be short). Each region's
owner is the segment's active/optimized group; a segment with none, and LBAs
no segment covers, are "don't care" (UNALLOCATED): any path serves them.

Members of the resulting PageMap are the TPGs optimized for at least one
segment, by ascending id; member_id is the TPG id, name "tpg<id>". The
topology side identifies each path's TPG from VPD 0x83.

Segment multiplier (VPD 0xB3): when it is nonzero, the descriptors are read
as LIO's data path reads them (target_core_alua.c,
core_alua_state_lba_dependent): each describes a segment of USER DATA SEGMENT
SIZE blocks at its first LBA within a period of size * multiplier blocks,
and the pattern repeats over the whole LUN. docs/referrals.md has the detail.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

from protocol.errors import UnroutableLayoutError, ValueRangeError
from protocol.pagemap import MAX_LUN_BYTES, MAX_MEMBERS, MAX_PAGES, UNALLOCATED, Member, PageMap, owners_dtype
from protocol.scsi.constants import AluaState
from protocol.scsi.referrals import UserDataSegmentReferral

__all__ = ["MAX_REGIONS", "MAX_REGION_SECTORS", "optimized_group", "referral_region_map", "referrals_generation"]

_CODEC = "REPORT REFERRALS layout"
MAX_REGIONS = MAX_PAGES
"""More regions than this is refused (the page map's own cap, protocol.pagemap.MAX_PAGES)."""
MAX_REGION_SECTORS = 2**32 - 1
"""dm-switch's region_size is an unsigned int (switch_ctr)."""
_DIVISOR_BLOCK = 1 << 20
"""Divisor candidates tried per numpy step (8 MiB of int64)."""


def optimized_group(segment: UserDataSegmentReferral) -> int:
    """The first active/optimized TPG listed for the segment, or -1 when it has none."""
    for group in segment.target_port_groups:
        if group.asymmetric_access_state == AluaState.ACTIVE_OPTIMIZED:
            return group.target_port_group_id
    return -1


def referrals_generation(*parts: bytes) -> int:
    """Referrals carry no generation: a 56-bit digest of the raw answers stands in for one."""
    digest = hashlib.blake2b(digest_size=7)
    for part in parts:
        digest.update(len(part).to_bytes(4, "big"))
        digest.update(part)
    return int.from_bytes(digest.digest(), "big")


def referral_region_map(segments: Sequence[UserDataSegmentReferral], *, capacity_blocks: int,
                        block_bytes: int, segment_size_blocks: int = 0, segment_multiplier: int = 0,
                        generation: int = 0, max_regions: int = MAX_REGIONS) -> PageMap:
    """The region map of a LUN of `capacity_blocks` blocks from its referral descriptors.

    Raises ValueRangeError for descriptors that contradict each other or the
    LUN (past its end, overlapping) and for a LUN no kernel can hold,
    UnroutableLayoutError when no dm-switch region size fits the layout within
    `max_regions`. Every input is the array's: the work is bounded by
    `max_regions` whatever it says (under a second), and no error but these escapes.
    """
    if block_bytes < 512 or block_bytes % 512:
        raise ValueRangeError(_CODEC, "logical block length", "a multiple of 512", block_bytes)
    if capacity_blocks < 1:
        raise ValueRangeError(_CODEC, "capacity", ">= 1 block", capacity_blocks)
    if capacity_blocks * block_bytes > MAX_LUN_BYTES:
        raise ValueRangeError(_CODEC, "capacity", f"<= {MAX_LUN_BYTES} bytes (the kernel's loff_t)",
                              f"{capacity_blocks} blocks of {block_bytes} bytes")
    if not segments:
        raise ValueRangeError(_CODEC, "segments", "at least one user data segment", 0)
    # Python ints until every value is known to lie within the LUN: the wire's 64-bit LBAs
    # (2^64-1, first + size) overflow numpy's uint64 and int64.
    tiled = segment_multiplier > 0 and segment_size_blocks > 0
    period = segment_size_blocks * segment_multiplier if tiled else capacity_blocks
    if tiled:
        ends_py = [s.first_lba + segment_size_blocks for s in segments]  # LIO's data path: size, not LAST LBA
        what = f"within the period of {period} blocks (size x multiplier)"
    else:
        ends_py = [s.last_lba + 1 for s in segments]
        what = f"<= the LUN's {capacity_blocks} blocks"
    # A period at or past the LUN's end never repeats: paint at most the LUN's regions.
    period = min(period, capacity_blocks)
    for i, (s, end) in enumerate(zip(segments, ends_py)):
        if not s.first_lba < end <= period:
            raise ValueRangeError(_CODEC, f"segment {i} ({s.first_lba}..{end - 1})", what, end)
    first = np.fromiter((s.first_lba for s in segments), dtype=np.int64, count=len(segments))
    ends = np.array(ends_py, dtype=np.int64)
    groups = np.fromiter((optimized_group(s) for s in segments), dtype=np.int64, count=len(segments))
    order = np.argsort(first, kind="stable")
    overlap = np.flatnonzero(first[order][1:] < ends[order][:-1])
    if overlap.size:
        a, b = int(order[overlap[0]]), int(order[overlap[0] + 1])
        raise ValueRangeError(_CODEC, f"segments {a} and {b}", "no overlap",
                              f"{int(first[b])} < {int(ends[a])}")

    # Region size: every boundary (the LUN's end excepted) must fall on a region edge.
    edges = np.concatenate([first, ends, np.array([period], dtype=np.int64)])
    edges = edges[(edges != 0) & (edges != capacity_blocks)]
    region_blocks = int(np.gcd.reduce(edges)) if edges.size else capacity_blocks
    sectors_per_block = block_bytes // 512
    region_blocks = _fit_region_size(region_blocks, sectors_per_block, capacity_blocks, max_regions)
    region_count = -(-capacity_blocks // region_blocks)
    if region_count > max_regions:
        raise UnroutableLayoutError(
            _CODEC, "region count",
            f"<= {max_regions} regions (a segment boundary every {region_blocks} blocks needs "
            f"{region_count} for {capacity_blocks} blocks)", region_count)

    members = np.unique(groups[groups >= 0])
    if members.size > MAX_MEMBERS:
        raise UnroutableLayoutError(_CODEC, "optimized target port groups", f"<= {MAX_MEMBERS}", int(members.size))
    dtype = owners_dtype(int(members.size))
    owner_of_segment = np.where(groups >= 0, np.searchsorted(members, groups), UNALLOCATED).astype(dtype)

    # Paint one period (at most region_count regions), then repeat it over the LUN.
    period_regions = -(-period // region_blocks)
    pattern = np.full(period_regions, UNALLOCATED, dtype=dtype)
    starts = first // region_blocks
    stops = -(-ends // region_blocks)
    lengths = stops - starts
    if lengths.sum():
        offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        pattern[np.arange(int(lengths.sum())) + offsets] = np.repeat(owner_of_segment, lengths)
    owners = np.resize(pattern, region_count) if period_regions < region_count else pattern[:region_count].copy()
    return PageMap(generation=generation, page_size_sectors=region_blocks * sectors_per_block,
                   members=tuple(Member(int(g), f"tpg{int(g)}") for g in members), owners=owners)


def _fit_region_size(region_blocks: int, sectors_per_block: int, capacity_blocks: int, max_regions: int) -> int:
    """The largest divisor of `region_blocks` whose size in sectors dm-switch accepts.

    Candidates are region_blocks // k for k = 2, 3, ...; only those that leave at most
    `max_regions` regions count, so at most about `max_regions` of them are tried,
    in numpy blocks (a prime near 2^32 once took minutes one by one). None fits:
    UnroutableLayoutError.
    """
    if region_blocks * sectors_per_block <= MAX_REGION_SECTORS:
        return region_blocks
    k_first = -(-region_blocks * sectors_per_block // MAX_REGION_SECTORS)
    smallest = -(-capacity_blocks // max_regions)  # a smaller region needs too many
    k_last = region_blocks // smallest
    for k0 in range(k_first, k_last + 1, _DIVISOR_BLOCK):
        ks = np.arange(k0, min(k0 + _DIVISOR_BLOCK, k_last + 1), dtype=np.int64)
        hits = np.flatnonzero(region_blocks % ks == 0)
        if hits.size:
            return region_blocks // int(ks[hits[0]])
    raise UnroutableLayoutError(
        _CODEC, "region size",
        f"a divisor of {region_blocks} blocks (the segment boundaries' gcd) of at most {MAX_REGION_SECTORS} "
        f"sectors leaving <= {max_regions} regions for {capacity_blocks} blocks", "none")
