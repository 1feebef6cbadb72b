"""The dm-switch encoder's planner: which tokens to send for a region map, before any text exists.

A plan is the token stream in order: literals ``:v``, explicit ``idx:v``
and copies ``R<d>,<m>`` (d regions back, m regions long), with each
token's byte cost. Two planners compete: :class:`RunsLayout` (one literal
per run, ``R1`` for the rest) and :func:`lz_plan` (a greedy LZ77-style
parse over K-gram matches). protocol.dmswitch_encoder picks the cheaper
and renders it into messages. Pure numpy, no I/O.
"""

from __future__ import annotations

import numpy as np


# Token kinds in a plan.
LIT, EXP, REP = 0, 1, 2  # ":v", "idx:v", "R<d>,<m>"


def hexlen(x: np.ndarray, dtype: type = np.int64) -> np.ndarray:
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


def hexlen1(v: int) -> int:
    return max(1, (int(v).bit_length() + 3) // 4)


def _ix(n: int) -> type:
    """Index dtype: int32 halves memory traffic on every full-map pass."""
    return np.int32 if n < 2**31 - 2**20 else np.int64


class Plan:
    """Tokens in stream order: kind, first region, value (path, or distance for R), count (R only)."""

    def __init__(self, pos: np.ndarray, kind: np.ndarray, val: np.ndarray, cnt: np.ndarray) -> None:
        self.pos = pos.astype(np.int64, copy=False)
        self.kind = kind.astype(np.int8, copy=False)
        self.val = val.astype(np.int64, copy=False)
        self.cnt = cnt.astype(np.int64, copy=False)
        self.cost = _token_lengths(self.pos, self.kind, self.val, self.cnt)
        self.total = int(self.cost.sum())


def _token_lengths(pos: np.ndarray, kind: np.ndarray, val: np.ndarray, cnt: np.ndarray) -> np.ndarray:
    """Bytes of each token including its separating space."""
    rep = kind == REP
    a = np.where(kind == EXP, hexlen(pos), np.where(rep, hexlen(val), 0))
    b = np.where(rep, hexlen(cnt), hexlen(val))
    return rep + a + 1 + b + 1


def count_runs(t: np.ndarray, need: np.ndarray | None) -> int:
    """Runs of equal paths in the range a plan writes (first to last needed region)."""
    if need is not None:
        w = np.flatnonzero(need)
        t = t[w[0] : w[-1] + 1]
    return 1 + int(np.count_nonzero(t[1:] != t[:-1]))


def worth_matching(t: np.ndarray, need: np.ndarray | None) -> bool:
    """Whether to run the match search: it sorts the whole map, which a few changed pages do not repay."""
    if need is None or len(t) <= 65536:
        return True
    return int(np.count_nonzero(need)) * 32 >= len(t)


class RunsLayout:
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
            cut = np.flatnonzero(gap_lit >= hexlen(d[1:]))
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
        lit = 2 + hexlen(self.vals)
        rcost = 4 + hexlen(self.body)
        self.use_r = rcost < self.body * lit
        head_cost = lit + np.where(self.is_start, hexlen(heads), 0)
        self.total = int(head_cost.sum() + np.where(self.use_r, rcost, self.body * lit).sum())

    def build(self) -> Plan:
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
        kind[first] = np.where(self.is_start, EXP, LIT)
        val[first] = vals
        rs = first[use_r] + 1
        pos[rs] = heads[use_r] + 1
        kind[rs] = REP
        val[rs] = 1
        cnt[rs] = body[use_r]
        if nb:
            owner = np.repeat(np.arange(len(heads)), lit_body)
            k = np.arange(nb) - np.repeat(np.cumsum(lit_body) - lit_body, lit_body)
            slot = first[owner] + 1 + k
            pos[slot] = heads[owner] + 1 + k
            kind[slot] = LIT
            val[slot] = vals[owner]
        return Plan(pos, kind, val, cnt)


def _lit_cost_sum(t: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bytes of ``:v`` literals for t[a:b], for arrays of bounds."""
    if int(t.max()) < 16:
        return 3 * (b - a)
    c = np.zeros(len(t) + 1, dtype=np.int64)
    np.cumsum(2 + hexlen(t), out=c[1:])
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
        # Trailing zeros by counting the all-zero low masks: integer ops only, since
        # float maths is emulated under QEMU's TCG (np.log2 cost: docs/benchmarks.md).
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
_DISTANCE_SEED = 0x5EED


def _dominant_distances(dist: np.ndarray, length: np.ndarray, top: int = 2) -> list[int]:
    """Copy distances > 1 that carry a large share of all matched length, from a fixed sample."""
    n = len(dist)
    if n <= _DISTANCE_SAMPLE:
        d, ln = dist, length  # small maps: every position (and no numpy.random import on the way)
    else:
        pick = np.random.default_rng(_DISTANCE_SEED).integers(0, n, size=_DISTANCE_SAMPLE)
        d, ln = dist[pick], length[pick]
    keep = d > 1
    if not keep.any():
        return []
    d, w = d[keep], np.minimum(ln[keep], 4096).astype(np.int64)
    vals, inv = np.unique(d, return_inverse=True)
    weight = np.bincount(inv, weights=w)
    # Stable, so equal weights keep the shorter distance first, on every machine
    # (numpy's default sort may order ties by the CPU's SIMD kernel).
    best = np.argsort(-weight, kind="stable")[:top]
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


def lz_plan(t: np.ndarray, need: np.ndarray | None, unknown: np.ndarray | None = None) -> Plan | None:
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

    def savings(dist: np.ndarray | int | None, length: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Bytes a copy saves over literals, and the lengths; dist is an array, a fixed distance, or None (1)."""
        length = np.minimum(length, room)
        if unknown is not None:
            src = idx - (1 if dist is None else dist)
            np.maximum(src, 0, out=src)
            stain = nu[src]
            # A copy reads [src, i) from the table, then its own output.
            cut = stain < idx
            length = np.where(cut, np.minimum(length, stain - src), length)
        lits = 3 * length if small else _lit_cost_sum(t, idx, np.minimum(idx + length, n)).astype(ix)
        dcost = 1 if dist is None else hexlen1(dist) if isinstance(dist, int) else hexlen(dist, ix)
        s = lits - (3 + dcost + hexlen(length, ix))
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
        mcost = 3 + hexlen(bd) + hexlen(gap)
        bridge = np.where(fits, np.minimum(mcost, gap_lits), gap_lits)
        skip = special & (bridge >= hexlen(np.minimum(nn, n - 1)))
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
    jump = memoryview(cont[ne].astype(np.int64))  # type: ignore[arg-type]  # numpy's stubs omit its buffer protocol
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
    kind_at[~covered] = LIT
    kind_at[ms - start] = REP
    kind_at[0] = EXP
    kind_at[sk - start] = EXP
    pos = np.flatnonzero(kind_at >= 0) + start
    kind = kind_at[pos - start]
    rep = kind == REP
    val = np.where(rep, bd[pos], t[pos])
    cnt = np.where(rep, eff[pos], 1)
    return Plan(pos, kind, val, cnt)
