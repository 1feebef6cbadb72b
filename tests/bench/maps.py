"""Page-map generators shared by the dm-switch tests and benchmarks.

Every generator returns an int8 numpy array, one path number per region
(page), and takes a ``numpy.random.Generator`` so results are reproducible.
"""

from __future__ import annotations

import numpy as np

#: The volume from the 2012 dm-devel thread (shared/seed): 1,572,864 pages.
SEED_PAGES = 1_572_864
SEED_PATHS = 3
#: Fraction of pages that sit in runs of each length, from the same thread.
SEED_RUN_MIX: dict[int, float] = {1: 0.50, 2: 0.20, 5: 0.10, 10: 0.10, 20: 0.10}


def run_lengths(total: int, mix: dict[int, float], rng: np.random.Generator) -> np.ndarray:
    """Shuffled run lengths covering exactly ``total`` pages in the proportions of ``mix``.

    The run count is floor(sum(total * fraction / length)) (998,768 for the
    seed volume, as the thread says); rounding slack is moved between runs of
    1 and runs of 2, which keeps the page total exact.
    """
    if 1 not in mix or 2 not in mix:
        raise ValueError("mix needs run lengths 1 and 2 to absorb rounding")
    target_runs = int(sum(total * frac / length for length, frac in mix.items()))
    counts = {length: int(total * frac / length) for length, frac in mix.items() if length != 1}
    counts[1] = total - sum(length * n for length, n in counts.items())
    excess = sum(counts.values()) - target_runs
    # One more run of 2 in place of two runs of 1 removes one run, same pages.
    counts[2] += excess
    counts[1] -= 2 * excess
    if counts[1] < 0 or counts[2] < 0:
        raise ValueError("mix cannot be met exactly")
    lengths = np.concatenate(
        [np.full(n, length, dtype=np.int64) for length, n in sorted(counts.items())]
    )
    return rng.permutation(lengths)


def runs_to_map(lengths: np.ndarray, nr_paths: int, rng: np.random.Generator) -> np.ndarray:
    """Expand run lengths into a map where each run sits on another path than the one before."""
    if nr_paths < 2:
        return np.zeros(int(lengths.sum()), dtype=np.int8)
    steps = rng.integers(1, nr_paths, size=len(lengths))
    steps[0] = rng.integers(0, nr_paths)
    paths = (np.cumsum(steps) % nr_paths).astype(np.int8)
    return np.repeat(paths, lengths)


def seed_map(rng: np.random.Generator, pages: int = SEED_PAGES, nr_paths: int = SEED_PATHS) -> np.ndarray:
    """The seed thread's layout: 50/20/10/10/10 % of pages in runs of 1/2/5/10/20, shuffled."""
    return runs_to_map(run_lengths(pages, SEED_RUN_MIX, rng), nr_paths, rng)


def striped(nr_regions: int, nr_paths: int, stripe: int = 1) -> np.ndarray:
    """Region i on path (i // stripe) % nr_paths; stripe=1 is dm-switch's initial round-robin table."""
    return ((np.arange(nr_regions, dtype=np.int64) // stripe) % nr_paths).astype(np.int8)


def move_pages(
    regions: np.ndarray, fraction: float, nr_paths: int, rng: np.random.Generator, *, count: int | None = None
) -> np.ndarray:
    """A copy of ``regions`` with ``fraction`` (or ``count``) distinct pages moved to a different path."""
    out = np.array(regions, dtype=np.int8, copy=True)
    n = len(out) if count is None else count
    k = min(len(out), int(round(len(out) * fraction)) if count is None else n)
    idx = rng.choice(len(out), size=k, replace=False)
    if nr_paths > 1:
        shift = rng.integers(1, nr_paths, size=k)
        out[idx] = (out[idx].astype(np.int64) + shift) % nr_paths
    return out


def run_heavy(nr_regions: int, nr_paths: int, rng: np.random.Generator, mean_run: float = 64.0) -> np.ndarray:
    """Long runs with geometric lengths (mean ``mean_run``) on random other paths."""
    lengths = rng.geometric(1.0 / mean_run, size=max(1, int(nr_regions / mean_run) * 2 + 8))
    cut = np.searchsorted(np.cumsum(lengths), nr_regions)
    lengths = lengths[: cut + 1]
    lengths[-1] -= int(lengths.sum()) - nr_regions
    lengths = lengths[lengths > 0]
    return runs_to_map(lengths, nr_paths, rng)[:nr_regions]


def with_holes(regions: np.ndarray, fraction: float, rng: np.random.Generator, mean_hole: float = 8.0) -> np.ndarray:
    """A copy with about ``fraction`` of regions marked don't-care (-1), in holes of mean length ``mean_hole``."""
    out = np.array(regions, dtype=np.int8, copy=True)
    n = len(out)
    if n == 0 or fraction <= 0:
        return out
    nholes = max(1, int(n * fraction / mean_hole))
    starts = rng.integers(0, n, size=nholes)
    lengths = rng.geometric(1.0 / mean_hole, size=nholes)
    mark = np.zeros(n + 1, dtype=np.int64)
    np.add.at(mark, starts, 1)
    np.add.at(mark, np.minimum(starts + lengths, n), -1)
    out[np.cumsum(mark[:-1]) > 0] = -1
    return out
