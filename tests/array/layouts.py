"""Page-owner layouts of the emulated array: owners[page] = member index (numpy int16).

- `striped`: page i on member i % M (what dm-switch starts with);
- `random`: each page on a uniformly random member (seeded);
- `seed`: the 2012 dm-devel thread's volume: 50 % of pages in runs of 1,
  20 % in runs of 2, 10 % each in runs of 5, 10 and 20, each run on another
  member than the run before (generators shared with tests/bench/maps.py).

Also the edits the control CLI makes: move a fraction of pages, hand a new
member its share, empty a removed member, grow or shrink.
"""

from __future__ import annotations

import numpy as np

from tests.array.errors import LayoutError

LAYOUTS = ("striped", "random", "seed")
OWNER_DTYPE = np.int16


def build(layout: str, pages: int, members: int, rng: np.random.Generator) -> np.ndarray:
    """A fresh owner array of `pages` entries over `members` members."""
    if members < 1:
        raise LayoutError(f"need at least one member, got {members}")
    if pages < 0:
        raise LayoutError(f"page count must not be negative, got {pages}")
    if layout == "striped":
        return (np.arange(pages, dtype=np.int64) % members).astype(OWNER_DTYPE)
    if layout == "random":
        return rng.integers(0, members, size=pages).astype(OWNER_DTYPE)
    if layout == "seed":
        return _seed(pages, members, rng)
    raise LayoutError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")


def _seed(pages: int, members: int, rng: np.random.Generator) -> np.ndarray:
    from tests.bench import maps  # the bench's generators: one definition of the seed's mix

    if pages == 0:
        return np.zeros(0, dtype=OWNER_DTYPE)
    try:
        lengths = maps.run_lengths(pages, maps.SEED_RUN_MIX, rng)
    except ValueError:
        # Too few pages to meet the mix exactly (a handful): runs of 1 only.
        lengths = np.ones(pages, dtype=np.int64)
    return maps.runs_to_map(lengths, members, rng).astype(OWNER_DTYPE)


def resized(owners: np.ndarray, pages: int, layout: str, members: int,
            rng: np.random.Generator) -> np.ndarray:
    """`owners` cut or extended to `pages`; new pages follow the layout (striped keeps counting)."""
    if pages <= owners.size:
        return owners[:pages].copy()
    extra = pages - owners.size
    if layout == "striped":
        tail = (np.arange(owners.size, pages, dtype=np.int64) % members).astype(OWNER_DTYPE)
    else:
        tail = build(layout, extra, members, rng)
    return np.concatenate([owners, tail]).astype(OWNER_DTYPE)


def moved(owners: np.ndarray, fraction: float, members: int,
          rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """A copy with round(fraction * pages) distinct pages each moved to another member.

    Returns the new owners and how many pages changed owner (0 with one member).
    """
    if not 0.0 <= fraction <= 1.0:
        raise LayoutError(f"fraction must be within 0..1, got {fraction}")
    out = owners.copy()
    count = int(round(owners.size * fraction))
    if members < 2 or count == 0:
        return out, 0
    pages = rng.choice(owners.size, size=count, replace=False)
    shift = rng.integers(1, members, size=count)
    out[pages] = ((out[pages].astype(np.int64) + shift) % members).astype(OWNER_DTYPE)
    return out, count


def moved_to(owners: np.ndarray, fraction: float, index: int, members: int,
             rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """A copy with round(fraction * pages) pages that member `index` does not own given to it.

    Fewer when fewer are owned by others (the rest already are its). Returns the new owners and
    how many pages changed owner: how a pool rebalances onto a member that joined empty.
    """
    if not 0.0 <= fraction <= 1.0:
        raise LayoutError(f"fraction must be within 0..1, got {fraction}")
    if not 0 <= index < members:
        raise LayoutError(f"member index {index} is not in 0..{members - 1}")
    out = owners.copy()
    others = np.flatnonzero(owners != index)
    count = min(int(round(owners.size * fraction)), others.size)
    if count:
        out[rng.choice(others, size=count, replace=False)] = index
    return out, count


def with_member_added(owners: np.ndarray, members_before: int,
                      rng: np.random.Generator) -> np.ndarray:
    """A copy where a new member (index `members_before`) takes about 1/(M+1) of the pages."""
    out = owners.copy()
    share = owners.size // (members_before + 1)
    if share:
        out[rng.choice(owners.size, size=share, replace=False)] = members_before
    return out


def with_member_removed(owners: np.ndarray, index: int, members_before: int,
                        rng: np.random.Generator) -> np.ndarray:
    """A copy without member `index`: its pages go to random others, indexes above it shift down."""
    if members_before < 2:
        raise LayoutError("cannot remove the last member")
    if not 0 <= index < members_before:
        raise LayoutError(f"member index {index} is not in 0..{members_before - 1}")
    out = owners.astype(np.int64)
    orphaned = out == index
    out[out > index] -= 1
    out[orphaned] = rng.integers(0, members_before - 1, size=int(orphaned.sum()))
    return out.astype(OWNER_DTYPE)
