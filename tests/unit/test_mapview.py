"""`switch-agent show <lun> --map`: cells from the daemon's map, drawn plain and in colour."""

from __future__ import annotations

import asyncio
import re

import numpy as np
import pytest

from agent import cli, control
from agent.discovery import LunNotFoundError
from agent.lun import LunState, RoutedStack
from agent.mapview import MapPicture, cells_for, picture, render
from agent.reporting import LunStatus, MemberStatus, PathStatus
from protocol.pagemap import Member, PageMap
from tests.unit.fakes_kernel import FakeSystem
from tests.unit.test_daemon import ask, config, routed, running, until

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def lun_with(owners: list[int], members: int = 3, *, moved: list[int] | None = None) -> LunState:
    page_map = PageMap(7, 2048, tuple(Member(10 + k, f"member-{k}") for k in range(members)),
                       np.array(owners, dtype=np.int8))
    lun = LunState("3600a", stack=RoutedStack(plan=None, kernel_map=page_map.owners, page_map=page_map,
                                              fetched_at=0.0))
    if moved is not None:
        lun.moved_pages, lun.moved_since = np.array(moved, dtype=np.uint32), 6
    return lun


def status_of(lun: LunState, paths_up: tuple[int, ...] = (1, 1, 1)) -> LunStatus:
    page_map = lun.stack.page_map
    counts = page_map.pages_per_member()
    members = tuple(MemberStatus(m.member_id, m.name, counts[m.member_id],
                                 paths=(PathStatus("sdb", "active" if paths_up[k] else "failed"),))
                    for k, m in enumerate(page_map.members))
    return LunStatus(lun.wwid, "routed", device="/dev/mapper/switch-3600a", members=members,
                     generation=page_map.generation, page_size_bytes=1 << 20, pages=page_map.total_pages,
                     unallocated_pages=int((page_map.owners < 0).sum()))


def test_one_cell_per_page_when_the_volume_fits():
    lun = lun_with([0, 0, 1, 2, -1, 1], moved=[2, 3])
    shown = picture(lun, 100)
    assert shown.pages_per_cell == 1 and shown.owners == (0, 0, 1, 2, -1, 1)
    assert shown.moved == (2, 3) and shown.moved_pages == 2 and shown.moved_since == 6


def test_a_cell_of_many_pages_shows_the_member_owning_most_of_them():
    # 10 pages in at most 4 cells: 3 pages a cell, the last cell holding one page.
    lun = lun_with([0, 1, 1, 2, 2, 0, -1, -1, 1, 2], moved=[8])
    shown = picture(lun, 4)
    assert shown.pages_per_cell == 3
    assert shown.owners == (1, 2, -1, 2)
    assert shown.moved == (2,)


def test_no_map_no_picture_and_a_bad_cell_count_is_refused():
    with pytest.raises(LunNotFoundError, match="not routed"):
        picture(LunState("3600b"), 10)
    with pytest.raises(ValueError, match="cells"):
        picture(lun_with([0, 1]), 0)


def test_plain_rendering_letters_rows_and_legend():
    lun = lun_with([0] * 5 + [1] * 3 + [2] * 2 + [-1] * 2, moved=[5, 6])
    shown = MapPicture.from_json(picture(lun, 100).to_json())  # as the CLI gets it over the socket
    text = render(status_of(lun, paths_up=(1, 0, 1)), shown, 5, colour=False)
    lines = text.splitlines()
    assert "\x1b" not in text
    assert lines[2:5] == ["AAAAA", "bbBCC", ".."]
    assert "map generation 7: 12 pages of 1 MiB; 1 cell = 1 page" in lines[1]
    legend = "\n".join(lines[5:])
    assert re.search(r"A  member-0 +5 pages +41\.7%  paths up 1/1", legend)
    assert re.search(r"B  member-1 +3 pages +25\.0%  paths up 0/1", legend)
    assert re.search(r"\.  unallocated +2 pages", legend)
    assert "moved from generation 6 to 7 (2 pages)" in legend


def test_colour_rendering_paints_each_member_and_marks_moved_cells():
    lun = lun_with([0, 0, 1, 2], moved=[1])
    text = render(status_of(lun), picture(lun, 100), 80, colour=True)
    strip = text.splitlines()[2]
    assert ANSI.sub("", strip) == "AaBC"  # the same letters under the colours
    assert strip == "\x1b[44;97mA\x1b[0m\x1b[1;4;44;97ma\x1b[0m\x1b[43;30mB\x1b[0m\x1b[42;30mC\x1b[0m"
    legend_a = next(line for line in text.splitlines() if "member-0" in line)
    assert "\x1b[44;97mA\x1b[0m" in legend_a


def test_cells_fit_the_terminal():
    per_row, most = cells_for(80, 24)
    assert per_row == 79 and most == 79 * 12
    assert cells_for(3, 2) == (8, 32)  # a tiny terminal still gets a usable strip


def test_the_cli_draws_the_map_the_daemon_sends(tmp_path, monkeypatch, capsys):
    system = FakeSystem(tmp_path=tmp_path / "store", layout="striped", members=3)
    cfg = config(tmp_path)
    monkeypatch.setenv("COLUMNS", "41")
    monkeypatch.setenv("LINES", "20")

    async def main() -> int:
        async with running(cfg, system) as (daemon, _):
            await until(lambda: routed(system, daemon))
            for bad in ("many", True, 0):
                with pytest.raises(control.ControlError, match="cells"):
                    await ask(cfg, {"command": "show", "lun": system.wwid, "map_cells": bad})
            return await asyncio.to_thread(cli.main, ["--socket", str(cfg.socket_path), "show", system.wwid, "--map"])

    assert asyncio.run(main()) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out  # not a terminal: plain letters
    rows = out.splitlines()[2:7]
    # 192 striped pages fit the 40 x 8 cells a 41 x 20 terminal holds: one page a cell, members in turn.
    assert rows[:4] == ["ABC" * 13 + "A", "BC" + "ABC" * 12 + "AB", "C" + "ABC" * 13, "ABC" * 13 + "A"]
    assert rows[4] == "BC" + "ABC" * 10
    assert out.count("paths up 2/2") == 3
