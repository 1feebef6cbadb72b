"""Host tests of the kernel x test table (tests/vm/kernels.py) from saved rig results: no VM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.vm import kernels

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
{cases}
</testsuite></testsuites>"""


def fake_cell(path: Path, *, cases: list[str], rig_ok: bool = True) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "status.json").write_text(json.dumps({"rig_ok": rig_ok, "command_rc": 0}))
    (path / "rig.log").write_text("vm-rig: [   0.1s] guest up: kernel 5.10.0-32-amd64, uptime 9.0 s\n")
    (path / "dm-version.txt").write_text("Library version:   1.02.185 (2022-05-18)\nDriver version:    4.43.0\n"
                                       "switch           v1.1.0\nmultipath        v1.14.0\nzero             v1.1.0\n")
    (path / "timings.json").write_text(json.dumps({"host": {"total": 240.0}, "guest": {}}))
    (path / "junit.xml").write_text(JUNIT.format(cases="\n".join(cases)))
    return path


PASS = '<testcase classname="t" name="test_{i}" time="1"/>'


def test_a_passing_agent_cell_shows_release_dm_version_and_route_time(tmp_path: Path) -> None:
    cell_dir = fake_cell(tmp_path / "5.10-agent", cases=[PASS.format(i=i) for i in range(12)])
    (cell_dir / "agent-route-time.txt").write_text("7.25\n")
    cell = kernels.read_cell("5.10", "agent", cell_dir)
    assert cell.ok and (cell.passed, cell.cases) == (12, 12)
    row = kernels.render([cell]).splitlines()[-1]
    assert row == ("| 5.10 | 5.10.0-32-amd64 | 4.43.0 (switch 1.1.0, multipath 1.14.0) | agent | 12/12 passed "
                   "| routed 7.2 s after login; VM 4.0 min |")


def test_a_failed_case_fails_the_cell_and_is_named(tmp_path: Path) -> None:
    cases = [PASS.format(i=i) for i in range(8)]
    cases.append('<testcase classname="t" name="test_grow" time="1"><failure message="boom"/></testcase>')
    cell_dir = fake_cell(tmp_path / "6.12-change", cases=cases)
    (cell_dir / "convergence.json").write_text(json.dumps({"move": {"last_forwarded_write_s": 3.04}}))
    cell = kernels.read_cell("6.12", "change", cell_dir)
    assert not cell.ok
    text = kernels.render([cell])
    assert "**FAILED** 8/9 passed: test_grow" in text and "last misrouted write: move: 3.0 s" in text


def test_too_few_cases_is_not_a_pass(tmp_path: Path) -> None:
    cell = kernels.read_cell("6.1", "agent", fake_cell(tmp_path / "c", cases=[PASS.format(i=0)]))
    assert not cell.ok


def test_a_rig_failure_and_a_cell_never_run(tmp_path: Path) -> None:
    failed = kernels.read_cell("6.1-rt", "agent", fake_cell(tmp_path / "r", cases=[], rig_ok=False))
    absent = kernels.read_cell("6.1-rt", "change", tmp_path / "absent")
    (tmp_path / "booting").mkdir()
    (tmp_path / "booting" / "config.json").write_text("{}")
    booting = kernels.read_cell("6.1-rt", "change", tmp_path / "booting")
    assert kernels.result_text(booting).startswith("**no status**") and not booting.ok
    assert kernels.result_text(failed) == "**rig failed**" and not failed.ok
    assert kernels.result_text(absent) == "not run" and not absent.ran


def test_a_qemu_abort_the_rig_retried_is_noted_in_the_cell(tmp_path: Path) -> None:
    cell_dir = fake_cell(tmp_path / "6.1-rt-agent", cases=[PASS.format(i=i) for i in range(9)])
    (cell_dir / "timings.json").write_text(json.dumps(
        {"host": {"total": 200.0}, "guest": {}, "qemu_aborts_at_boot": ["qemu-system-x86_64: msix.c:218: ..."]}))
    cell = kernels.read_cell("6.1-rt", "agent", cell_dir)
    assert cell.ok
    assert kernels.result_text(cell) == ("9/9 passed (QEMU itself aborted at boot once before the guest ran "
                                         "anything, a QEMU TCG bug; the rig booted again)")
    plain = kernels.read_cell("6.1", "agent", fake_cell(tmp_path / "6.1-agent", cases=[PASS.format(i=0)] * 9))
    assert "QEMU" not in kernels.result_text(plain)


def test_the_section_replaces_only_its_markers() -> None:
    doc = f"# K\n\nbefore\n\n{kernels.BEGIN_MARK}\nold table\n{kernels.END_MARK}\n\nafter\n"
    new = kernels.replace_section(doc, "new table")
    assert new == f"# K\n\nbefore\n\n{kernels.BEGIN_MARK}\nnew table\n{kernels.END_MARK}\n\nafter\n"
    with pytest.raises(ValueError):
        kernels.replace_section(doc.replace(kernels.END_MARK, ""), "x")
