"""``set_region_mappings`` messages for a few changed regions, in time and bytes that follow the changes.

The whole-map encoder (protocol.dmswitch_encoder) looks at every region to
find what differs and what can be copied; when the caller already knows the
changed regions (a changes-since answer, protocol.pagemap_changes), this
writes just those: each run of consecutive changed regions with one path
as ``idx:path`` (``:path`` when it follows the run before in the same
message), then ``R1,n`` for the rest of a run of three or more, or one
more ``:path`` for a run of two. Kernel rules as in dmswitch_encoder (an
explicit index opens every message; R1 copies the region just written).
protocol.dmswitch_oracle checks the output in tests. Pure, no I/O.
"""

from __future__ import annotations

import numpy as np

from protocol.dmtable import MAX_MESSAGE_TOKENS, MAX_SWITCH_PATHS, MESSAGE_NAME
from protocol.errors import EncodeError

__all__ = ["encode_changed_regions"]

_RUNS_PER_MESSAGE = (MAX_MESSAGE_TOKENS - 1) // 2
"""A run is at most two tokens; argv also holds the message name."""


def _hexlen(x: np.ndarray) -> np.ndarray:
    """Hex digits of each non-negative value (1 for 0)."""
    digits = np.ones(x.shape, dtype=np.int64)
    rest = x >> 4
    while rest.any():
        digits += rest > 0
        rest = rest >> 4
    return digits


def encode_changed_regions(regions: np.ndarray, paths: np.ndarray, *, nr_regions: int,
                           max_message_bytes: int = 65536) -> list[str]:
    """Messages that set region ``regions[i]`` to path ``paths[i]`` and touch no other region.

    ``regions`` ascending and distinct, below ``nr_regions``; ``paths`` >= 0.
    Each message is at most ``max_message_bytes`` bytes.
    """
    regions = np.asarray(regions, dtype=np.int64)
    paths = np.asarray(paths, dtype=np.int64)
    if regions.shape != paths.shape or regions.ndim != 1:
        raise EncodeError("regions and paths must be 1-D arrays of one length")
    if regions.size == 0:
        return []
    if int(regions[0]) < 0 or int(regions[-1]) >= nr_regions:
        raise EncodeError(f"regions must be within 0..{nr_regions - 1}")
    if regions.size > 1 and bool((np.diff(regions) <= 0).any()):
        raise EncodeError("regions must be ascending and distinct")
    if int(paths.min()) < 0 or int(paths.max()) >= MAX_SWITCH_PATHS:
        raise EncodeError(f"paths must be within 0..{MAX_SWITCH_PATHS - 1}")
    step = np.diff(regions)
    starts = np.flatnonzero(np.concatenate(([True], (step != 1) | (np.diff(paths) != 0))))
    first, path = regions[starts], paths[starts]
    length = np.diff(np.append(starts, regions.size))
    follows = np.concatenate(([False], first[1:] == first[:-1] + length[:-1]))
    # Bytes of each run's tokens, a space before each: the head, then the tail.
    path_len = _hexlen(path)
    explicit = 1 + _hexlen(first) + 1 + path_len
    tail = np.where(length >= 3, 1 + 3 + _hexlen(length - 1), np.where(length == 2, 2 + path_len, 0))
    cost = np.where(follows, 2 + path_len, explicit) + tail
    room = max_message_bytes - len(MESSAGE_NAME)
    if int((explicit + tail).max()) > room:
        raise EncodeError(f"max_message_bytes={max_message_bytes} cannot hold a run's tokens")
    csum = np.concatenate(([0], np.cumsum(cost)))
    bounds = []
    s, n = 0, first.size
    while s < n:
        # The opening run is written with its explicit index, whatever it follows.
        budget = room - int(explicit[s] + tail[s])
        e = int(np.searchsorted(csum, csum[s + 1] + budget, side="right")) - 1
        e = max(s + 1, min(e, s + _RUNS_PER_MESSAGE, n))
        bounds.append((s, e))
        s = e
    # The run opening each message is written with its explicit index.
    opening = np.zeros(n, dtype=bool)
    opening[[b[0] for b in bounds]] = True
    head_explicit = ~follows | opening
    # Tokens, run by run: the head, then the tail where there is one. Each is rendered " a:b",
    # " :b" or " R1,b" (kind _EXP, _NEXT, _REP) into one buffer, then cut at the message bounds.
    has_tail = length >= 2
    per_run = 1 + has_tail
    token_start = np.concatenate(([0], np.cumsum(per_run)))
    kind = np.empty(int(token_start[-1]), dtype=np.int8)
    a = np.zeros(kind.size, dtype=np.int64)
    b = np.empty(kind.size, dtype=np.int64)
    heads, tails = token_start[:-1], token_start[:-1][has_tail] + 1
    kind[heads] = np.where(head_explicit, _EXP, _NEXT)
    a[heads] = first
    b[heads] = path
    kind[tails] = np.where(length[has_tail] >= 3, _REP, _NEXT)
    b[tails] = np.where(length[has_tail] >= 3, length[has_tail] - 1, path[has_tail])
    text, offsets = _render(kind, a, b)
    prefix = MESSAGE_NAME.encode()
    cuts = offsets[token_start[np.array(bounds, dtype=np.int64)]].tolist()
    return [(prefix + text[lo:hi]).decode("ascii") for lo, hi in cuts]


_EXP, _NEXT, _REP = 0, 1, 2
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def _put_hex(buf: np.ndarray, at: np.ndarray, x: np.ndarray, digits: np.ndarray) -> None:
    """x in hex, most significant digit first, `digits` digits from buf[at]."""
    for k in range(int(digits.max()) if digits.size else 0):
        sel = np.flatnonzero(digits > k)
        buf[at[sel] + digits[sel] - 1 - k] = _HEX[(x[sel] >> (4 * k)) & 15]


def _render(kind: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[bytes, np.ndarray]:
    """Every token with a space before it, in one buffer; and where each token starts."""
    exp = kind == _EXP
    rep = kind == _REP
    a_digits = np.where(exp, _hexlen(a), 0)
    b_digits = _hexlen(b)
    # " " + ("R1," | a + ":" | ":") + b
    lengths = 1 + np.where(rep, 3, a_digits + 1) + b_digits
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    buf = np.empty(int(offsets[-1]), dtype=np.uint8)
    start = offsets[:-1]
    buf[start] = ord(" ")
    _put_hex(buf, start + 1, a, a_digits)
    mark = start + 1 + a_digits
    buf[mark[~rep]] = ord(":")
    rep_at = start[rep] + 1
    buf[rep_at] = ord("R")
    buf[rep_at + 1] = ord("1")
    buf[rep_at + 2] = ord(",")
    _put_hex(buf, np.where(rep, start + 4, mark + 1), b, b_digits)
    return buf.tobytes(), offsets
