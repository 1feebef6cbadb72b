"""The dm-switch ``set_region_mappings`` encoder: a region -> path map in as few message bytes as it reasonably can.

Kernel rules are quoted from ``drivers/md/dm-switch.c`` (target 1.1.0,
``process_set_region_mappings``) and ``drivers/md/dm-table.c``. What to
send is planned in protocol.dmswitch_planner; this module chooses what
must be written, picks the cheaper plan and cuts it into messages.
protocol.dmswitch_oracle decodes messages as the kernel does and shares
nothing with this module, so tests can trust it. Pure, no I/O.

Two cores plan and cut the same messages, byte for byte: the compiled one
(protocol/_dmswitch_encode.c, built with the package), which production
uses, and the pure-Python one below (numpy), which the compiled one was
ported from. The Python core is used only when SWITCH_AGENT_ENCODER=python
is set, for a platform without a C compiler (docs/packaging.md); without
that variable a missing compiled core fails the import, loudly.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Literal

import numpy as np

from protocol.dmswitch_planner import (
    _DISTANCE_SAMPLE,
    _DISTANCE_SEED,
    EXP,
    REP,
    Plan,
    RunsLayout,
    count_runs,
    hexlen,
    hexlen1,
    lz_plan,
    worth_matching,
)
from protocol.dmtable import MAX_MESSAGE_TOKENS, MAX_SWITCH_PATHS, MESSAGE_NAME
from protocol.dmtable import check_int as _check_int
from protocol.errors import EncodeError

__all__ = ["CORE", "round_robin", "encode_region_mappings"]

Core = Literal["compiled", "python"]

#: The core encode_region_mappings uses unless told otherwise.
CORE: Core = "python" if os.environ.get("SWITCH_AGENT_ENCODER") == "python" else "compiled"

try:
    from protocol import _dmswitch_encode
except ImportError as exc:
    if CORE == "compiled":
        raise ImportError(
            f"the compiled dm-switch encoder (protocol._dmswitch_encode) is not built ({exc}): install the "
            "package with a C compiler present (pip install ., or the Debian package), or set "
            "SWITCH_AGENT_ENCODER=python to use the slow pure-Python encoder"
        ) from exc
    _dmswitch_encode = None  # type: ignore[assignment]


_PREFIX = MESSAGE_NAME + " "


_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def round_robin(nr_regions: int, nr_paths: int) -> np.ndarray:
    """The table a fresh switch table load starts with: region i -> i % nr_paths (initialise_region_table)."""
    n = _check_int(nr_regions, "nr_regions", 0, 2**62)
    p = _check_int(nr_paths, "nr_paths", 1, MAX_SWITCH_PATHS)
    dtype = np.uint8 if p <= 256 else np.uint32
    return (np.arange(n, dtype=np.int64) % p).astype(dtype)


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


def encode_region_mappings(
    regions: Sequence[int] | np.ndarray,
    *,
    previous: Sequence[int] | np.ndarray | None = None,
    max_message_bytes: int = 65536,
    core: Core | None = None,
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

    ``core`` picks the planner ("compiled" or "python"; default :data:`CORE`);
    both give the same messages.
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
    if (core or CORE) == "compiled":
        return _compiled(t, need, base, unknown, limit)
    plan = lz_plan(t, need, unknown) if worth_matching(t, need) else None
    # Each run start of the written range costs the runs plan at least 3 bytes.
    if plan is None or plan.total > 3 * count_runs(t, need):
        runs = RunsLayout(t, need)
        if plan is None or runs.total < plan.total:
            plan = runs.build()
    if base:
        plan = Plan(plan.pos + base, plan.kind, plan.val, plan.cnt)  # explicit tokens' lengths change
    return _messages(plan, t, base, limit)


def _compiled(t: np.ndarray, need: np.ndarray | None, base: int, unknown: np.ndarray | None, limit: int) -> list[str]:
    """The compiled core's plan and messages for what _target chose."""
    if _dmswitch_encode is None:
        raise EncodeError("the compiled encoder core is not built (SWITCH_AGENT_ENCODER=python)")
    if len(t) > _COMPILED_MAX_REGIONS:
        raise EncodeError(f"{len(t)} regions is more than the encoder takes ({_COMPILED_MAX_REGIONS})")
    try:
        return _dmswitch_encode.encode(t, need, unknown, base, limit, MAX_MESSAGE_TOKENS, _distance_sample(len(t)))
    except ValueError as exc:  # a limit too small for one token
        raise EncodeError(str(exc)) from None


#: int32 region indexes in the compiled core.
_COMPILED_MAX_REGIONS = 1 << 30


@functools.lru_cache(maxsize=4)
def _distance_sample(n: int) -> np.ndarray | None:
    """The regions whose matches vote for the dominant copy distances: the planner's own fixed sample.

    Drawn here, with numpy's generator, so both cores vote with the same
    regions; a volume size repeats across volumes, so a few are kept.
    """
    if n <= _DISTANCE_SAMPLE:
        return None  # every region votes
    sample = np.random.default_rng(_DISTANCE_SEED).integers(0, n, size=_DISTANCE_SAMPLE)
    sample.flags.writeable = False
    return sample


def _target(r: np.ndarray, prev: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None, int, np.ndarray | None] | None:
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
        allocated = np.flatnonzero(r >= 0)
        if len(allocated) == 0:
            return None
        lo, hi = int(allocated[0]), int(allocated[-1])
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


def _messages(plan: Plan, t: np.ndarray, base: int, limit: int) -> list[str]:
    """Cut a plan into messages under ``limit`` bytes, each opened by an explicit ``idx:v``."""
    pos, kind, val, cnt, cost = plan.pos.copy(), plan.kind, plan.val, plan.cnt.copy(), plan.cost
    tv = t.astype(np.int64)
    # The worst opening token this plan can need must fit, or no message can;
    # a copy split across messages opens one at any region it covers.
    worst = hexlen1(int((pos + cnt - 1).max())) + 1 + hexlen1(int(tv.max()))
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
        head_len = hexlen1(p) + 1 + hexlen1(hv)
        budget = room0 - head_len  # bytes left for " tok" pieces (each cost counts its space)
        hp, hk, hvv, hc = [p], [EXP], [hv], [1]
        if kind[s] == REP and cnt[s] > 1:
            rc = 1 + hexlen1(int(val[s])) + 1 + hexlen1(int(cnt[s]) - 1) + 1
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
            hk.append(REP)
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


def _render(pos: np.ndarray, kind: np.ndarray, val: np.ndarray, cnt: np.ndarray) -> tuple[bytes, list[int]]:
    """All tokens as one ASCII buffer, each followed by a space; returns it and token start offsets."""
    rep = kind == REP
    exp = kind == EXP
    a = np.where(exp, pos, val)
    b = np.where(rep, cnt, val)
    la = np.where(exp | rep, hexlen(a), 0)
    lb = hexlen(b)
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
