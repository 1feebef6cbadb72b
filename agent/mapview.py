"""`switch-agent show <lun> --map`: the volume's page map as a strip of cells, one letter per member.

The daemon cuts the map into at most as many cells as the CLI's terminal
holds (`picture`: one cell per page, or per group of pages, showing the
member that owns most of them) and marks the cells with pages that moved
in the last new generation; the CLI draws them (`render`): in colour on a
terminal, plain letters where stdout is not one or NO_COLOR is set.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.discovery import LunNotFoundError
from agent.lun import LunState
from agent.reporting import LunStatus, _known

MAX_CELLS = 1 << 20
"""Most cells a client may ask for (a terminal holds a few thousand)."""

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
OTHER_MEMBER = "+"
"""The letter of members past the 26th (an array group has at most 16)."""
UNALLOCATED_CELL = "."

PALETTE = ("44;97", "43;30", "42;30", "45;97", "46;30", "41;97", "104;30", "103;30", "102;30", "105;30",
           "106;30", "101;30", "47;30", "100;97")
"""ANSI SGR background;foreground per member, in member order (repeats past 14 members)."""


@dataclass(frozen=True)
class MapPicture:
    """A LUN's page map cut into cells: what `show --map` draws."""

    wwid: str
    generation: int
    pages: int
    pages_per_cell: int
    owners: tuple[int, ...]
    """Per cell, the member (index into the status record's members) owning most of its pages; -1 unallocated."""
    moved: tuple[int, ...] = ()
    """Cells holding a page whose owner changed in the last new generation."""
    moved_pages: int = 0
    moved_since: int | None = None
    """The generation those pages moved from; None before the daemon saw a second generation."""

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MapPicture:
        values = _known(cls, data)
        return cls(**{**values, "owners": tuple(values.get("owners", ())), "moved": tuple(values.get("moved", ()))})


def picture(lun: LunState, max_cells: int) -> MapPicture:
    """The routed map of `lun` in at most `max_cells` cells (the daemon's side of `show --map`)."""
    if lun.stack is None:
        raise LunNotFoundError(f"{lun.wwid}: not routed yet: no map to draw")
    if not 1 <= max_cells <= MAX_CELLS:
        raise ValueError(f"map cells must be 1..{MAX_CELLS}, got {max_cells}")
    page_map = lun.stack.page_map
    pages = page_map.total_pages
    per_cell = max(1, -(-pages // max_cells))
    cells = -(-pages // per_cell)
    # Pad the last cell with a value no member has, then count each owner (and -1) per cell.
    padded = np.full(cells * per_cell, len(page_map.members), dtype=np.int16)
    padded[:pages] = page_map.owners
    grid = padded.reshape(cells, per_cell)
    candidates = range(-1, len(page_map.members))
    counts = np.stack([(grid == owner).sum(axis=1) for owner in candidates], axis=1)
    owners = np.argmax(counts, axis=1) - 1  # ties go to the lower index, unallocated first
    moved = lun.moved_pages if lun.moved_pages is not None else np.empty(0, dtype=np.uint32)
    moved = moved[moved < pages]
    return MapPicture(lun.wwid, page_map.generation, pages, per_cell, tuple(int(o) for o in owners),
                      tuple(int(c) for c in np.unique(moved // per_cell)), int(moved.size), lun.moved_since)


def letter(member_index: int) -> str:
    """The letter a member's cells show (upper case; lower case where pages moved)."""
    if member_index < 0:
        return UNALLOCATED_CELL
    return LETTERS[member_index] if member_index < len(LETTERS) else OTHER_MEMBER


def cells_for(columns: int, lines: int) -> tuple[int, int]:
    """(cells per row, most cells) that fit a terminal of columns x lines beside the header and legend.

    One column is left free: a line that fills the last column wraps twice on some terminals.
    """
    per_row = max(8, columns - 1)
    return per_row, per_row * max(4, lines - 12)


def render(status: LunStatus, picture: MapPicture, per_row: int, *, colour: bool) -> str:
    """The strip of cells, `per_row` to a line, and the legend; ANSI colours if `colour`."""
    def paint(index: int, text: str, moved: bool = False) -> str:
        if not colour or index < 0:
            return text
        return f"\x1b[{'1;4;' if moved else ''}{PALETTE[index % len(PALETTE)]}m{text}\x1b[0m"

    moved = set(picture.moved)
    # (owner, moved) per cell; a run of equal cells is painted with one escape sequence.
    cells = [(owner, cell in moved) for cell, owner in enumerate(picture.owners)]
    rows = []
    for start in range(0, len(cells), per_row):
        runs = itertools.groupby(cells[start:start + per_row])
        rows.append("".join(paint(owner, (letter(owner).lower() if was_moved else letter(owner)) * len(list(run)),
                                  was_moved) for (owner, was_moved), run in runs))
    page_mib = (status.page_size_bytes or 0) / (1 << 20)
    grouping = ("1 cell = 1 page" if picture.pages_per_cell == 1
                else f"1 cell = {picture.pages_per_cell} pages, shown as the member owning most of them")
    lines = [f"{status.wwid} {status.device or '(not routed)'}",
             f"map generation {picture.generation}: {picture.pages} pages of {page_mib:g} MiB; {grouping}",
             *rows, ""]
    width = max((len(m.name) for m in status.members), default=6)
    for index, member in enumerate(status.members):
        share = member.pages / picture.pages if picture.pages else 0.0
        up = sum(p.state == "active" for p in member.paths)
        lines.append(f" {paint(index, letter(index))}  {member.name:<{width}}  {member.pages:>9} pages "
                     f"{share:6.1%}  paths up {up}/{len(member.paths)}")
    if status.unallocated_pages:
        lines.append(f" {UNALLOCATED_CELL}  {'unallocated':<{width}}  {status.unallocated_pages:>9} pages")
    if picture.moved_since is not None:
        lines.append(f" a-z: cells with pages that moved from generation {picture.moved_since} to "
                     f"{picture.generation} ({picture.moved_pages} pages)")
    return "\n".join(lines)
