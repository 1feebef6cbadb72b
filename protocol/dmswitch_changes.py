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
    heads = [f" {f:x}:{p:x}" for f, p in zip(first.tolist(), path.tolist())]
    short = [f" :{p:x}" for p in path.tolist()]
    tails = [f" R1,{k - 1:x}" if k >= 3 else (short[i] if k == 2 else "")
             for i, k in enumerate(length.tolist())]
    follow = follows.tolist()
    messages = []
    for s, e in bounds:
        parts = [MESSAGE_NAME, heads[s], tails[s]]
        for i in range(s + 1, e):
            parts.append(short[i] if follow[i] else heads[i])
            parts.append(tails[i])
        messages.append("".join(parts))
    return messages
