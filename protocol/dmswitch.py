"""dm-switch's ``set_region_mappings`` message: the encoder and an oracle decoder.

Pure functions on strings and numpy arrays: nothing here touches a device.
Kernel rules are quoted from ``drivers/md/dm-switch.c`` (target 1.1.0) and
``drivers/md/dm-table.c``; the switch's table line is protocol.dmtable's.

Two parts:

* the map encoder :func:`encode_region_mappings`, which turns a region -> path
  map into as few ``set_region_mappings`` bytes as it reasonably can;
* :func:`apply_region_mappings`, written from ``process_set_region_mappings``
  alone (it shares no helper with the encoder) so tests can use it as the
  oracle for what the kernel would do with a message.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from protocol.dmtable import MAX_MESSAGE_TOKENS, MAX_SWITCH_PATHS, MESSAGE_NAME
from protocol.dmtable import check_int as _check_int
from protocol.errors import DmSwitchMessageError, EncodeError

__all__ = [
    "round_robin",
    "encode_region_mappings",
    "apply_region_mappings",
    "split_message_args",
    "region_table_entry_bits",
]

# --------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------

_PREFIX = MESSAGE_NAME + " "
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
# Token kinds in a plan.
_LIT, _EXP, _REP = 0, 1, 2  # ":v", "idx:v", "R<d>,<m>"


def round_robin(nr_regions: int, nr_paths: int) -> np.ndarray:
    """The table a fresh switch table load starts with: region i -> i % nr_paths (initialise_region_table)."""
    n = _check_int(nr_regions, "nr_regions", 0, 2**62)
    p = _check_int(nr_paths, "nr_paths", 1, MAX_SWITCH_PATHS)
    dtype = np.uint8 if p <= 256 else np.uint32
    return (np.arange(n, dtype=np.int64) % p).astype(dtype)


def _hexlen(x: np.ndarray, dtype: type = np.int64) -> np.ndarray:
    """Number of hex digits of each (non-negative) element."""
    x = np.asarray(x)
    if x.size == 0:
        return np.ones(x.shape, dtype=dtype)
    top = int(x.max())
    if top < 1 << 24:
        # float32 holds these exactly; its exponent field is floor(log2 x).
        e = (x.astype(np.float32).view(np.int32) >> 23) - 127
        return np.maximum((e >> 2) + 1, 1).astype(dtype, copy=False)
    n = np.ones(x.shape, dtype=dtype)
    lim = 16
    while lim <= top:
        n += x >= lim
        lim <<= 4
    return n


def _hexlen1(v: int) -> int:
    return max(1, (int(v).bit_length() + 3) // 4)


def _as_map(values: object, what: str) -> np.ndarray:
    """A 1-D integer array view of ``values`` (sequence or ndarray), or EncodeError."""
    arr = np.asarray(values)
    if arr.dtype.kind == "O" or (arr.size == 0 and arr.dtype.kind == "f"):
        try:
            arr = np.asarray(values, dtype=np.int64)
        except (TypeError, ValueError, OverflowError) as exc:
            raise EncodeError(f"{what} must hold integers: {exc}") from None
    if arr.dtype.kind not in "iu":
        raise EncodeError(f"{what} must be an integer array, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise EncodeError(f"{what} must be one-dimensional, got shape {arr.shape}")
    return arr


def _compact(arr: np.ndarray, top: int) -> np.ndarray:
    """Cast to the smallest signed dtype holding [-1, top]: int8 compares are what the encoder does most."""
    dt = np.int8 if top < 2**7 else np.int16 if top < 2**15 else np.int32
    return arr.astype(dt, copy=False)


def _ix(n: int) -> type:
    """Index dtype: int32 halves memory traffic on every full-map pass."""
    return np.int32 if n < 2**31 - 2**20 else np.int64


class _Plan:
    """Tokens in stream order: kind, first region, value (path, or distance for R), count (R only)."""

    def __init__(self, pos: np.ndarray, kind: np.ndarray, val: np.ndarray, cnt: np.ndarray) -> None:
        self.pos = pos.astype(np.int64, copy=False)
        self.kind = kind.astype(np.int8, copy=False)
        self.val = val.astype(np.int64, copy=False)
        self.cnt = cnt.astype(np.int64, copy=False)
        self.cost = _token_lengths(self.pos, self.kind, self.val, self.cnt)
        self.total = int(self.cost.sum())


def _token_lengths(pos, kind, val, cnt) -> np.ndarray:
    """Bytes of each token including its separating space."""
    rep = kind == _REP
    a = np.where(kind == _EXP, _hexlen(pos), np.where(rep, _hexlen(val), 0))
    b = np.where(rep, _hexlen(cnt), _hexlen(val))
    return rep + a + 1 + b + 1


def encode_region_mappings(
    regions: Sequence[int] | np.ndarray,
    *,
    previous: Sequence[int] | np.ndarray | None = None,
    max_message_bytes: int = 65536,
) -> list[str]:
    """Encode a region -> path map as ``set_region_mappings`` messages, applied in order.

    ``regions[i]`` is the path for region i; a negative entry means "don't
    care" and the encoder may leave or write any path there. ``previous`` is
    what the kernel table holds now (e.g. :func:`round_robin` after a table
    load, or the last map uploaded); only regions that differ are then sent,
    and R tokens may copy from any region before the one being written,
    because the kernel table there is known. ``previous=None`` means the
    table holds garbage: every allocated region is written and R tokens only
    copy from regions this encoding has already written. A negative entry
    in ``previous`` marks one region as unknown in the same way; so does a
    path higher than any allocated region's (e.g. an "impossible path"
    marker), which is never safe to write back.

    Each message is at most ``max_message_bytes`` bytes (the whole string),
    holds at most MAX_MESSAGE_TOKENS argv entries, and starts with an
    explicit ``idx:path``, because process_set_region_mappings starts
    ``region_index`` at 0 and ``:`` increments before use (dm-switch.c).
    """
    r = _as_map(regions, "regions")
    limit = _check_int(max_message_bytes, "max_message_bytes", 1, 2**62)
    n = len(r)
    if n == 0:
        if previous is not None and len(_as_map(previous, "previous")) != 0:
            raise EncodeError("previous and regions differ in length")
        return []
    top = int(r.max())
    if top >= MAX_SWITCH_PATHS:
        raise EncodeError(f"path {top} is beyond any dm-switch table ({MAX_SWITCH_PATHS} paths)")
    prev = None
    if previous is not None:
        prev = _as_map(previous, "previous")
        if len(prev) != n:
            raise EncodeError(f"previous has {len(prev)} regions, regions has {n}")
        ptop = int(prev.max())
        if ptop >= MAX_SWITCH_PATHS:
            raise EncodeError(f"previous path {ptop} is beyond any dm-switch table")
        if top < 0:
            return []  # nothing allocated
        if ptop > top:
            # A path no allocated region uses may be a caller's "impossible
            # path" marker for unknown: writing it back (bridging a gap)
            # would be rejected. Treating it as unknown is always safe.
            prev = np.where((prev > top) | (prev < 0), -1, prev)
        elif int(prev.min()) < -1:
            prev = np.maximum(prev, -1)  # every negative means the same: unknown
        prev = _compact(prev, top)
    if int(r.min()) < -1:
        r = np.maximum(r, -1)  # every negative means the same: don't care
    r = _compact(r, top)

    target = _target(r, prev)
    if target is None:
        return []
    t, need, base, unknown = target
    plan = _lz_plan(t, need, unknown) if _worth_matching(t, need) else None
    # Each run start of the written range costs the runs plan at least 3 bytes.
    if plan is None or plan.total > 3 * _count_runs(t, need):
        runs = _RunsLayout(t, need)
        if plan is None or runs.total < plan.total:
            plan = runs.build()
    if base:
        plan = _Plan(plan.pos + base, plan.kind, plan.val, plan.cnt)  # explicit tokens' lengths change
    return _messages(plan, t, base, limit)


def _count_runs(t: np.ndarray, need: np.ndarray | None) -> int:
    """Runs of equal paths in the range a plan writes (first to last needed region)."""
    if need is not None:
        w = np.flatnonzero(need)
        t = t[w[0] : w[-1] + 1]
    return 1 + int(np.count_nonzero(t[1:] != t[:-1]))


def _worth_matching(t: np.ndarray, need: np.ndarray | None) -> bool:
    """Whether to run the match search: it sorts the whole map, which a few changed pages do not repay."""
    if need is None or len(t) <= 65536:
        return True
    return int(np.count_nonzero(need)) * 32 >= len(t)


def _target(r: np.ndarray, prev: np.ndarray | None):
    """Choose what to write: (t, need, base, unknown).

    ``t`` is the map with don't-care regions filled; ``need`` marks regions
    that must be written (None: all of ``t``); ``base`` is the region number
    of ``t[0]`` (with no previous table, t covers first..last allocated);
    ``unknown`` marks regions whose kernel content is unknown and that need
    not be written, which R copies must not read (None: there are none).
    Returns None when nothing needs sending.
    """
    n = len(r)
    holes = bool(int(r.min()) < 0)
    if prev is None:
        if not holes:
            return r, None, 0, None
        alloc = np.flatnonzero(r >= 0)
        if len(alloc) == 0:
            return None
        lo, hi = int(alloc[0]), int(alloc[-1])
        return _fill(r[lo : hi + 1]), None, lo, None
    blind = bool(int(prev.min()) < 0)
    if not holes:
        need = r != prev  # an unknown (-1) previous never equals a path
        if not need.any():
            return None
        return r, need, 0, None
    alloc = r >= 0
    need = alloc & (r != prev)
    if not need.any():
        return None
    t = np.where(alloc, r, prev).astype(r.dtype, copy=False)
    # Holes between two changed regions sit inside a span that is written
    # anyway: fill them to continue the surrounding pattern, not with the old
    # value, which would break runs. They must then be written, since the
    # kernel still holds the old value there.
    idx = np.arange(n)
    left = np.maximum.accumulate(np.where(alloc, idx, -1))
    right = np.minimum.accumulate(np.where(alloc, idx, n)[::-1])[::-1]
    inner = ~alloc & (left >= 0) & (right < n)
    inner &= need[np.clip(left, 0, n - 1)] & need[np.clip(right, 0, n - 1)]
    unknown = (~alloc & (prev < 0)) if blind else None
    fill_at = inner if unknown is None else inner | unknown
    if fill_at.any():
        # Unknown holes get a pattern value too: a gap bridged through one
        # must write a real path.
        t = np.where(fill_at, _fill(r), t).astype(r.dtype, copy=False)
        need |= inner
    if unknown is not None:
        unknown &= ~need
        if not unknown.any():
            unknown = None
    return t, need, 0, unknown


def _period(r: np.ndarray) -> int:
    """The shift p in 1..64 with most r[i] == r[i-p] among allocated pairs, from a sample; 1 unless clearly better."""
    n = len(r)
    step = max(1, n // 65536)
    best_p, best = 1, -1.0
    for p in range(1, min(64, n - 1) + 1):
        a, b = r[p::step], r[: n - p : step]
        ok = (a >= 0) & (b >= 0)
        cnt = int(ok.sum())
        if cnt == 0:
            continue
        score = int(((a == b) & ok).sum()) / cnt
        if score > best + 0.02:
            best_p, best = p, score
    return best_p


def _fill(r: np.ndarray) -> np.ndarray:
    """Fill don't-care (negative) regions so they extend the neighbouring run or cycle.

    Each hole takes the value ``p`` regions back, p being the map's dominant
    period (1 for run-structured maps, the member count for striped ones);
    holes with no such value take the nearest value before them, and leading
    holes the first value.
    """
    if int(r.min()) >= 0:
        return r
    n = len(r)
    p = _period(r)
    out = r.copy()
    if p > 1:
        m = -(-n // p) * p
        grid = np.full(m, -1, dtype=r.dtype)
        grid[:n] = r
        grid = grid.reshape(-1, p)
        rows = np.arange(grid.shape[0])[:, None]
        src = np.maximum.accumulate(np.where(grid >= 0, rows, -1), axis=0)
        cols = np.broadcast_to(np.arange(p), grid.shape)
        filled = np.where(src >= 0, grid[np.maximum(src, 0), cols], -1).reshape(-1)[:n]
        out = filled.astype(r.dtype, copy=False)
    if int(out.min()) < 0:
        idx = np.arange(n)
        src = np.maximum.accumulate(np.where(out >= 0, idx, -1))
        first = int(np.flatnonzero(out >= 0)[0])
        out = out[np.where(src >= 0, src, first)]
    return out


class _RunsLayout:
    """The cheap plan: a literal at each run start and ``R1,<m>`` for the rest of a run where shorter.

    With a ``need`` mask, changed regions are grouped into spans; a gap
    between two changed regions is written as literals when that is shorter
    than opening a new span with an explicit index. ``total`` is known
    without building the token arrays, which only the winner needs.
    """

    def __init__(self, t: np.ndarray, need: np.ndarray | None) -> None:
        n = len(t)
        ix = _ix(n)
        if need is None:
            starts = np.zeros(1, dtype=ix)
            ends = np.full(1, n, dtype=ix)
            brk = np.empty(n, dtype=bool)
            brk[0] = True
            np.not_equal(t[1:], t[:-1], out=brk[1:])
            heads = np.flatnonzero(brk).astype(ix)
            nxt = np.empty_like(heads)
            nxt[:-1] = heads[1:]
            nxt[-1:] = n
            run_end = nxt
        else:
            d = np.flatnonzero(need).astype(ix)
            gap_lit = _lit_cost_sum(t, d[:-1] + 1, d[1:])
            # `k:v` costs hexlen(k) more than `:v`: bridge only when literals are cheaper.
            cut = np.flatnonzero(gap_lit >= _hexlen(d[1:]))
            starts = np.concatenate(([d[0]], d[1:][cut])).astype(ix)
            ends = np.concatenate((d[:-1][cut] + 1, [d[-1] + 1])).astype(ix)
            brk = np.zeros(n, dtype=bool)
            np.not_equal(t[1:], t[:-1], out=brk[1:])
            brk[starts] = True
            inspan = np.zeros(n + 1, dtype=np.int8)
            inspan[starts] += 1
            inspan[ends] -= 1
            inspan = np.cumsum(inspan[:-1], dtype=np.int8).astype(bool)
            heads = np.flatnonzero(brk & inspan).astype(ix)
            span_end = ends[np.searchsorted(starts, heads, side="right") - 1]
            nxt = np.empty_like(heads)
            nxt[:-1] = heads[1:]
            nxt[-1:] = n
            run_end = np.minimum(nxt, span_end)
        self.heads = heads
        self.body = run_end - heads - 1
        self.vals = t[heads].astype(np.int64)
        self.is_start = np.zeros(len(heads), dtype=bool)
        self.is_start[np.searchsorted(heads, starts)] = True
        lit = 2 + _hexlen(self.vals)
        rcost = 4 + _hexlen(self.body)
        self.use_r = rcost < self.body * lit
        head_cost = lit + np.where(self.is_start, _hexlen(heads), 0)
        self.total = int(head_cost.sum() + np.where(self.use_r, rcost, self.body * lit).sum())

    def build(self) -> _Plan:
        heads, body, vals, use_r = self.heads, self.body, self.vals, self.use_r
        lit_body = np.where(use_r, 0, body).astype(np.int64)
        nb = int(lit_body.sum())
        total = len(heads) + int(use_r.sum()) + nb
        pos = np.empty(total, dtype=np.int64)
        kind = np.empty(total, dtype=np.int8)
        val = np.empty(total, dtype=np.int64)
        cnt = np.ones(total, dtype=np.int64)
        # Each run takes 1 + (1 if R else lit_body) consecutive token slots.
        width = 1 + np.where(use_r, 1, lit_body)
        first = np.cumsum(width) - width
        pos[first] = heads
        kind[first] = np.where(self.is_start, _EXP, _LIT)
        val[first] = vals
        rs = first[use_r] + 1
        pos[rs] = heads[use_r] + 1
        kind[rs] = _REP
        val[rs] = 1
        cnt[rs] = body[use_r]
        if nb:
            owner = np.repeat(np.arange(len(heads)), lit_body)
            k = np.arange(nb) - np.repeat(np.cumsum(lit_body) - lit_body, lit_body)
            slot = first[owner] + 1 + k
            pos[slot] = heads[owner] + 1 + k
            kind[slot] = _LIT
            val[slot] = vals[owner]
        return _Plan(pos, kind, val, cnt)


def _lit_cost_sum(t: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bytes of ``:v`` literals for t[a:b], for arrays of bounds."""
    if int(t.max()) < 16:
        return 3 * (b - a)
    c = np.zeros(len(t) + 1, dtype=np.int64)
    np.cumsum(2 + _hexlen(t), out=c[1:])
    return c[b] - c[a]


def _run_remaining(t: np.ndarray, ix: type) -> np.ndarray:
    """For each i, how many regions from i on equal their predecessor (0 at run starts): R1 match lengths."""
    n = len(t)
    idx = np.arange(n, dtype=ix)
    brk = np.empty(n, dtype=bool)
    brk[0] = True
    np.not_equal(t[1:], t[:-1], out=brk[1:])
    after = np.empty(n, dtype=ix)  # first run start strictly after i
    after[-1] = n
    after[:-1] = np.where(brk[1:], idx[1:], n)
    after = np.minimum.accumulate(after[::-1])[::-1]
    rem = after - idx
    rem[brk] = 0
    return rem


_CTZ_TABLES: dict[tuple[int, int], np.ndarray] = {}


def _equal_symbols_table(b: int, k: int) -> np.ndarray:
    """For x = key1 ^ key2 of two packed K-grams, how many leading symbols agree (the lowest set bit // b)."""
    tbl = _CTZ_TABLES.get((b, k))
    if tbl is None:
        # Trailing zeros by counting the all-zero low masks: integer ops only. (np.log2 over
        # 65,536 values took 0.6 s under QEMU's TCG, where float maths is emulated.)
        x = np.arange(1 << 16, dtype=np.int32)
        ctz = np.zeros(1 << 16, dtype=np.int32)
        for bit in range(16):
            ctz += (x & ((2 << bit) - 1)) == 0
        tbl = np.where(x == 0, k, np.minimum(ctz // b, k)).astype(np.int32)
        _CTZ_TABLES[(b, k)] = tbl
    return tbl


def _kgram_matches(t: np.ndarray, ix: type, max_len: int) -> tuple[np.ndarray, np.ndarray] | None:
    """For each i, the nearest earlier occurrence of the K-gram at i and how far the match runs.

    Returns (distance, length) arrays (0 where none). K symbols of b bits
    pack into a 16-bit key, so numpy's stable radix argsort groups equal
    K-grams with positions ascending: the predecessor in that order is the
    nearest earlier occurrence. One pass extends every match by up to K
    more symbols via a XOR / trailing-zeros table; the few still matching
    after that are extended only at the last position of each run of equal
    distances, since L[i] = L[i+1] + 1 when both copy from the same distance.
    """
    n = len(t)
    b = max(1, int(t.max()).bit_length())
    k = min(8, 16 // b)
    if k < 2 or n < 2 * k + 2:
        return None
    tu = t.astype(np.uint16)
    key = tu.copy()  # K-gram at i; symbols past the end read as 0
    for j in range(1, k):
        key[: n - j] |= tu[j:] << np.uint16(b * j)
    nv = n - k + 1  # positions with a whole K-gram
    order = np.argsort(key[:nv], kind="stable").astype(ix)
    # Sorted order is grouped by key; a group's first entry has no earlier occurrence.
    counts = np.bincount(key[:nv], minlength=1 << 16)
    firsts = (np.cumsum(counts) - counts)[counts > 0]
    step = np.diff(order)
    step[firsts[1:] - 1] = 0
    dist = np.zeros(n, dtype=ix)
    dist[order[1:]] = step

    tbl = _equal_symbols_table(b, k)
    idx = np.arange(n, dtype=ix)
    # First pass over everyone: the K-gram after the matched one, vs its source.
    m = n - k
    add = np.zeros(n, dtype=ix)
    add[:m] = tbl[key[k:] ^ key[idx[:m] + k - dist[:m]]]
    length = k + add
    length[dist == 0] = 0
    np.minimum(length, n - idx, out=length)  # padding past the end may compare equal

    live = np.flatnonzero((add == k) & (dist > 0)).astype(ix)
    if len(live):
        dl = dist[live]
        # Among the still-matching positions, i and i+1 share a match when they copy from one distance.
        same = (live[1:] == live[:-1] + 1) & (dl[1:] == dl[:-1])
        is_end = np.ones(len(live), dtype=bool)
        is_end[:-1] = ~same
        ends = np.flatnonzero(is_end)
        ep = live[ends]
        de = dl[ends]
        ln = length[ep].copy()
        act = np.arange(len(ends))
        p = ep + ln
        # Bounded passes, so a pathological map costs bounded time (a longer match is cut short).
        for _ in range(max(1, max_len // k)):
            ok = p < n
            act, p = act[ok], p[ok]
            got = tbl[key[p] ^ key[p - de[act]]]
            ln[act] += got
            more = got == k
            act, p = act[more], p[more] + k
            if len(act) == 0:
                break
        np.minimum(ln, n - ep, out=ln)
        # Each live position takes its group end's length plus the distance to it.
        seg_end = np.full(len(live), len(live), dtype=np.int64)
        seg_end[ends] = ends
        seg_end = np.minimum.accumulate(seg_end[::-1])[::-1]
        ln_all = np.zeros(len(live), dtype=ix)
        ln_all[ends] = ln
        length[live] = ln_all[seg_end] + live[seg_end] - live
    return dist, length


_DISTANCE_SAMPLE = 1 << 17


def _dominant_distances(dist: np.ndarray, length: np.ndarray, top: int = 2) -> list[int]:
    """Copy distances > 1 that carry a large share of all matched length, from a fixed sample."""
    n = len(dist)
    if n <= _DISTANCE_SAMPLE:
        d, ln = dist, length  # small maps: every position (and no numpy.random import on the way)
    else:
        pick = np.random.default_rng(0x5EED).integers(0, n, size=_DISTANCE_SAMPLE)
        d, ln = dist[pick], length[pick]
    keep = d > 1
    if not keep.any():
        return []
    d, w = d[keep], np.minimum(ln[keep], 4096).astype(np.int64)
    vals, inv = np.unique(d, return_inverse=True)
    weight = np.bincount(inv, weights=w)
    best = np.argsort(-weight)[:top]
    total = float(w.sum())
    return [int(vals[i]) for i in best if weight[i] >= 0.05 * total]


def _copy_remaining(t: np.ndarray, p: int, ix: type) -> np.ndarray:
    """For each i, how many regions from i on equal the one p before: lengths of ``R<p>,<m>`` copies."""
    n = len(t)
    idx = np.arange(n, dtype=ix)
    differs = np.ones(n, dtype=bool)
    np.not_equal(t[p:], t[:-p], out=differs[p:])
    nxt = np.minimum.accumulate(np.where(differs, idx, n)[::-1])[::-1]
    return nxt - idx


def _lz_plan(t: np.ndarray, need: np.ndarray | None, unknown: np.ndarray | None = None) -> _Plan | None:
    """Greedy LZ77-style parse: literals, ``R<d>,<m>`` copies from d regions back, and skips.

    Candidate matches per region are the run continuation (d=1) and the
    nearest earlier K-gram occurrence; each region keeps the one that saves
    more bytes over literals. The parse takes a match when it saves bytes,
    unless the next region has a better one (lazy matching, as deflate
    does). Where regions need not be written (``need``), it jumps ahead
    with a new explicit index when that is cheaper than bridging the gap.
    A match is cut where its source reaches an ``unknown`` region (the
    parse may or may not write it; reading it is only safe if it did).
    Only the parse's landing points are walked in Python.
    """
    n = len(t)
    ix = _ix(n)
    if need is None:
        start, stop = 0, n
    else:
        w = np.flatnonzero(need)
        start, stop = int(w[0]), int(w[-1]) + 1
        if 2 * len(w) >= stop - start:
            # Mostly changed: skips cannot pay off; writing the few
            # unchanged regions costs less than deciding about each of them.
            need = None
    idx = np.arange(n, dtype=ix)
    room = stop - idx
    small = int(t.max()) < 16
    none = ix(-(2**30))

    if unknown is not None:
        # nu[j]: first unknown region at or after j.
        nu = np.minimum.accumulate(np.where(unknown, idx, n)[::-1])[::-1]

    def savings(dist, length):
        """Bytes a copy saves over literals; dist is an array, a fixed distance, or None (1)."""
        length = np.minimum(length, room)
        if unknown is not None:
            src = idx - (1 if dist is None else dist)
            np.maximum(src, 0, out=src)
            stain = nu[src]
            # A copy reads [src, i) from the table, then its own output.
            cut = stain < idx
            length = np.where(cut, np.minimum(length, stain - src), length)
        lits = 3 * length if small else _lit_cost_sum(t, idx, np.minimum(idx + length, n)).astype(ix)
        dcost = 1 if dist is None else _hexlen1(dist) if isinstance(dist, int) else _hexlen(dist, ix)
        s = lits - (3 + dcost + _hexlen(length, ix))
        s[length <= 0] = none
        return s, length

    bd = np.ones(n, dtype=ix)
    bs, bl = savings(None, _run_remaining(t, ix))
    km = _kgram_matches(t, ix, 256)  # longer copies come from runs and periods
    if km is not None:
        ks, kl = savings(*km)
        better = ks > bs
        np.copyto(bs, ks, where=better)
        np.copyto(bl, kl, where=better)
        np.copyto(bd, km[0], where=better)
        # The nearest K-gram inside a stripe is the run itself, so striped
        # layouts' long copies (one period back) need their own candidates.
        for period in _dominant_distances(*km):
            ps, pl = savings(period, _copy_remaining(t, period, ix))
            better = ps > bs
            np.copyto(bs, ps, where=better)
            np.copyto(bl, pl, where=better)
            bd[better] = period

    take = bs > 0
    take[:-1] &= bs[1:] <= bs[:-1]  # lazy: the next region starts a better match
    act = take.view(np.int8).copy()  # 0 literal, 1 match, 2 skip
    eff = bl
    nn = idx
    if need is not None:
        nn = np.minimum.accumulate(np.where(need, idx, n)[::-1])[::-1]
        gap = nn - idx
        special = ~need & ~(take & (bl > gap))
        gap_lits = _lit_cost_sum(t, idx, np.minimum(nn, n))
        fits = bl >= gap
        mcost = 3 + _hexlen(bd) + _hexlen(gap)
        bridge = np.where(fits, np.minimum(mcost, gap_lits), gap_lits)
        skip = special & (bridge >= _hexlen(np.minimum(nn, n - 1)))
        mbridge = special & ~skip & fits & (mcost < gap_lits)
        act[special] = 0
        act[mbridge] = 1
        act[skip] = 2
        eff = np.where(mbridge, gap, bl)

    # ne[i]: the first event (match or skip) at or after i; jump[i]: where
    # the parse lands after it. The walk only follows landing points.
    lo = start + 1
    ne = np.minimum.accumulate(np.where(act[lo:stop] != 0, idx[lo:stop], stop)[::-1])[::-1]
    cont = np.empty(n + 1, dtype=ix)
    np.add(idx, eff, out=cont[:n])
    if need is not None:
        np.copyto(cont[:n], nn + 1, where=act == 2)
    cont[stop] = stop  # ne == stop: no event left, the walk ends
    jump = memoryview(cont[ne].astype(np.int64))
    lands = []
    p = lo
    while p < stop:
        lands.append(p)
        p = jump[p - lo]
    te = ne[np.array(lands, dtype=np.int64) - lo] if lands else np.zeros(0, dtype=ix)
    te = te[te < stop]
    is_m = act[te] == 1
    ms = te[is_m]
    ml = eff[ms]
    ss = te[~is_m]
    sk = nn[ss]

    # Every region of [start, stop) is a match start, inside a match, in a
    # skipped gap, an explicit token, or a literal. Intervals are disjoint,
    # so no index list below repeats.
    delta = np.zeros(n + 1, dtype=np.int8)
    delta[ms] += 1
    delta[ms + ml] -= 1
    delta[ss] += 1
    delta[sk] -= 1
    covered = np.cumsum(delta[start:stop], dtype=np.int8).astype(bool)
    kind_at = np.full(stop - start, -1, dtype=np.int8)
    kind_at[~covered] = _LIT
    kind_at[ms - start] = _REP
    kind_at[0] = _EXP
    kind_at[sk - start] = _EXP
    pos = np.flatnonzero(kind_at >= 0) + start
    kind = kind_at[pos - start]
    rep = kind == _REP
    val = np.where(rep, bd[pos], t[pos])
    cnt = np.where(rep, eff[pos], 1)
    return _Plan(pos, kind, val, cnt)


def _messages(plan: _Plan, t: np.ndarray, base: int, limit: int) -> list[str]:
    """Cut a plan into messages under ``limit`` bytes, each opened by an explicit ``idx:v``."""
    pos, kind, val, cnt, cost = plan.pos.copy(), plan.kind, plan.val, plan.cnt.copy(), plan.cost
    tv = t.astype(np.int64)
    # The worst opening token this plan can need must fit, or no message can;
    # a copy split across messages opens one at any region it covers.
    worst = _hexlen1(int((pos + cnt - 1).max())) + 1 + _hexlen1(int(tv.max()))
    room0 = limit - len(_PREFIX)
    if worst > room0:
        raise EncodeError(f"max_message_bytes={limit} cannot hold even one token (needs {len(_PREFIX) + worst})")
    csum = np.zeros(len(pos) + 1, dtype=np.int64)
    np.cumsum(cost, out=csum[1:])
    ntok = len(pos)
    out_pos: list[np.ndarray] = []
    out_kind: list[np.ndarray] = []
    out_val: list[np.ndarray] = []
    out_cnt: list[np.ndarray] = []
    counts: list[int] = []
    s = 0
    while s < ntok:
        p = int(pos[s])
        hv = int(tv[p - base])
        head_len = _hexlen1(p) + 1 + _hexlen1(hv)
        budget = room0 - head_len  # bytes left for " tok" pieces (each cost counts its space)
        hp, hk, hvv, hc = [p], [_EXP], [hv], [1]
        if kind[s] == _REP and cnt[s] > 1:
            rc = 1 + _hexlen1(int(val[s])) + 1 + _hexlen1(int(cnt[s]) - 1) + 1
            if rc > budget:
                # Only the opening token fits: the rest of the copy opens the next message.
                pos[s] += 1
                cnt[s] -= 1
                out_pos.append(np.array(hp))
                out_kind.append(np.array(hk, dtype=np.int8))
                out_val.append(np.array(hvv))
                out_cnt.append(np.array(hc))
                counts.append(1)
                continue
            hp.append(p + 1)
            hk.append(_REP)
            hvv.append(int(val[s]))
            hc.append(int(cnt[s]) - 1)
            budget -= rc
        e = int(np.searchsorted(csum, csum[s + 1] + budget, side="right")) - 1
        e = max(s + 1, min(e, s + 1 + (MAX_MESSAGE_TOKENS - 1 - len(hp)), ntok))
        out_pos += [np.array(hp), pos[s + 1 : e]]
        out_kind += [np.array(hk, dtype=np.int8), kind[s + 1 : e]]
        out_val += [np.array(hvv), val[s + 1 : e]]
        out_cnt += [np.array(hc), cnt[s + 1 : e]]
        counts.append(len(hp) + e - s - 1)
        s = e
    fp = np.concatenate(out_pos).astype(np.int64)
    fk = np.concatenate(out_kind).astype(np.int8)
    fv = np.concatenate(out_val).astype(np.int64)
    fc = np.concatenate(out_cnt).astype(np.int64)
    buf, offs = _render(fp, fk, fv, fc)
    text = buf.decode("ascii")
    msgs = []
    t0 = 0
    for c in counts:
        a, b = offs[t0], offs[t0 + c] - 1  # drop the last token's trailing space
        msgs.append(_PREFIX + text[a:b])
        t0 += c
    return msgs


def _put_hex(buf: np.ndarray, at: np.ndarray, x: np.ndarray, nd: np.ndarray) -> None:
    """Write x in hex, most significant digit first, nd digits starting at buf[at]."""
    top = int(nd.max()) if len(nd) else 0
    for k in range(top):
        sel = np.flatnonzero(nd > k)
        buf[at[sel] + nd[sel] - 1 - k] = _HEX[(x[sel] >> (4 * k)) & 15]


def _render(pos, kind, val, cnt) -> tuple[bytes, list[int]]:
    """All tokens as one ASCII buffer, each followed by a space; returns it and token start offsets."""
    rep = kind == _REP
    exp = kind == _EXP
    a = np.where(exp, pos, val)
    b = np.where(rep, cnt, val)
    la = np.where(exp | rep, _hexlen(a), 0)
    lb = _hexlen(b)
    length = rep + la + 1 + lb + 1
    offs = np.zeros(len(pos) + 1, dtype=np.int64)
    np.cumsum(length, out=offs[1:])
    buf = np.empty(int(offs[-1]), dtype=np.uint8)
    start = offs[:-1]
    buf[start[rep]] = ord("R")
    at = start + rep
    _put_hex(buf, at, a, la)
    sep = at + la
    buf[sep] = np.where(rep, ord(","), ord(":"))
    _put_hex(buf, sep + 1, b, lb)
    buf[offs[1:] - 1] = ord(" ")
    return buf.tobytes(), offs.tolist()


# --------------------------------------------------------------------------
# Oracle decoder: process_set_region_mappings, token by token
# --------------------------------------------------------------------------

_U64 = 2**64 - 1
_KSPACE = b" \t\n\v\f\r\xa0"  # kernel isspace (lib/ctype.c marks 0xa0 as space too)
_HEXVAL = {c: int(chr(c), 16) for c in b"0123456789abcdefABCDEF"}
_FAST_LIT = re.compile(rb"([0-9a-fA-F]*):([0-9a-fA-F]+)")
_FAST_REP = re.compile(rb"[Rr]([0-9a-fA-F]+),([0-9a-fA-F]+)")


def region_table_entry_bits(nr_paths: int) -> int:
    """Bits per region table entry: grows from 1 while (1 << bits) < nr_paths (alloc_region_table)."""
    bits = 1
    while bits < 64 and (1 << bits) < nr_paths:
        bits += 1
    return bits


def split_message_args(message: str | bytes) -> list[bytes]:
    """Split a message into argv the way dm_split_args (dm-table.c) does: whitespace, backslash escapes, NUL ends it."""
    data = message.encode() if isinstance(message, str) else bytes(message)
    data = data.split(b"\0", 1)[0]
    if b"\\" not in data and b"\xa0" not in data:
        return data.split()  # bytes.split splits on exactly the ASCII isspace set
    argv: list[bytes] = []
    i, n = 0, len(data)
    while True:
        while i < n and data[i] in _KSPACE:
            i += 1
        if i >= n:
            return argv
        tok = bytearray()
        while i < n:
            c = data[i]
            if c == 0x5C and i + 1 < n:  # everything but NUL can be quoted
                tok.append(data[i + 1])
                i += 2
                continue
            if c in _KSPACE:
                break
            tok.append(c)
            i += 1
        argv.append(bytes(tok))
        if i < n:
            i += 1


def _parse_hex(s: bytes, i: int) -> tuple[int, int]:
    """parse_hex: consume hex digits from s[i:], no overflow check (wraps at 64 bits); returns (value, next index)."""
    r = 0
    n = len(s)
    while i < n and s[i] in _HEXVAL:
        r = ((r << 4) | _HEXVAL[s[i]]) & _U64
        i += 1
    return r, i


def _reject(argv: list[bytes], i: int, reason: str) -> DmSwitchMessageError:
    return DmSwitchMessageError(argv[i].decode("latin-1"), i, reason, applied=max(0, i - 1))


def apply_region_mappings(table: np.ndarray, message: str | bytes, nr_paths: int) -> None:
    """Apply one message to ``table`` exactly as the kernel would, mutating it.

    ``table[i]`` is region i's path; len(table) is nr_regions. Follows
    switch_message and process_set_region_mappings (dm-switch.c): argv[0]
    must equal ``set_region_mappings`` ignoring case; tokens apply one by
    one, so on a bad token the ones before it stay applied and
    DmSwitchMessageError names the token (``position`` is its argv index,
    ``applied`` how many tokens were applied). R copies read entries
    masked to the table's entry width, as switch_region_table_read does.
    """
    nr_regions = len(table)
    if nr_regions < 1:
        raise ValueError("a dm-switch table has at least one region")
    if nr_paths < 1:
        raise ValueError("nr_paths must be at least 1")
    mask = (1 << region_table_entry_bits(nr_paths)) - 1
    argv = split_message_args(message)
    if not argv:
        raise DmSwitchMessageError("", 0, "empty message")
    if argv[0].lower() != MESSAGE_NAME.encode():
        raise _reject(argv, 0, "Unrecognised message received.")
    region_index = 0
    for i in range(1, len(argv)):
        s = argv[i]
        if s[:1] in (b"R", b"r"):
            m = _FAST_REP.fullmatch(s)
            if m is not None:
                cycle_length = int(m.group(1), 16) & _U64
                num_write = int(m.group(2), 16) & _U64
            else:
                j = 1
                if j < len(s) and s[j] == 0x2C:
                    raise _reject(argv, i, "invalid set_region_mappings argument")
                cycle_length, j = _parse_hex(s, j)
                if j >= len(s) or s[j] != 0x2C:
                    raise _reject(argv, i, "invalid set_region_mappings argument")
                j += 1
                if j >= len(s):
                    raise _reject(argv, i, "invalid set_region_mappings argument")
                num_write, j = _parse_hex(s, j)
                if j < len(s):
                    raise _reject(argv, i, "invalid set_region_mappings argument")
            if cycle_length == 0 or cycle_length - 1 > region_index:
                raise _reject(argv, i, f"invalid set_region_mappings cycle length: {cycle_length - 1} > {region_index}")
            if region_index + num_write > _U64 or region_index + num_write >= nr_regions:
                raise _reject(
                    argv, i, f"invalid set_region_mappings region number: {region_index} + {num_write} >= {nr_regions}"
                )
            if num_write:
                lo = region_index + 1
                src = table[lo - cycle_length : lo - cycle_length + min(num_write, cycle_length)]
                if src.size and (int(src.max()) > mask or int(src.min()) < 0):
                    src = src.astype(np.int64) & mask
                if num_write <= cycle_length:
                    table[lo : lo + num_write] = src
                else:
                    # Each copy reads a region written cycle_length steps
                    # earlier, so the output repeats the first cycle.
                    table[lo : lo + num_write] = np.resize(src, num_write)
                region_index += num_write
            continue

        m = _FAST_LIT.fullmatch(s)
        if m is not None:
            region_index = region_index + 1 if not m.group(1) else int(m.group(1), 16) & _U64
            path_nr = int(m.group(2), 16) & _U64
        else:
            if s[:1] == b":":
                region_index += 1
                j = 0
            else:
                region_index, j = _parse_hex(s, 0)
                if j >= len(s) or s[j] != 0x3A:
                    raise _reject(argv, i, "invalid set_region_mappings argument")
            j += 1
            if j >= len(s):
                raise _reject(argv, i, "invalid set_region_mappings argument")
            path_nr, j = _parse_hex(s, j)
            if j < len(s):
                raise _reject(argv, i, "invalid set_region_mappings argument")
        if region_index >= nr_regions:
            raise _reject(argv, i, f"invalid set_region_mappings region number: {region_index} >= {nr_regions}")
        if path_nr >= nr_paths:
            raise _reject(argv, i, f"invalid set_region_mappings device: {path_nr} >= {nr_paths}")
        table[region_index] = path_nr
