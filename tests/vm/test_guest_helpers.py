"""Host tests of the pure helpers inside the guest tests (tests/guest): no VM."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocol.multipath import parse_multipath_status
from tests.guest.test_agent import path_states

# `dmsetup status` of a leg: "start length multipath" then the target's words;
# 8:32 was failed once, 8:16 failed and was reinstated twice.
LEG = "0 2097152 multipath 2 0 0 0 2 1 A 0 2 0 8:16 A 2 8:32 F 1 E 0 2 0 8:48 A 0 8:64 A 0"


def test_path_states_reads_state_and_fail_count() -> None:
    assert path_states(LEG) == {"8:16": ("A", 2), "8:32": ("F", 1), "8:48": ("A", 0), "8:64": ("A", 0)}


def test_path_states_agrees_with_the_agents_parser() -> None:
    params = LEG.split(" ", 3)[3]
    assert path_states(LEG) == {p.dev: ("A" if p.active else "F", p.fail_count)
                                for p in parse_multipath_status(params)}


def test_a_reinstated_path_still_shows_that_it_failed() -> None:
    # What test_a_failed_leg_path_is_reinstated waits for: active again, one more failure.
    before = path_states("0 8 multipath 0 0 0 1 1 A 0 1 0 8:0 A 0")["8:0"]
    after = path_states("0 8 multipath 0 0 0 1 1 A 0 1 0 8:0 A 1")["8:0"]
    assert before == ("A", 0) and after == ("A", before[1] + 1) != before


def _junit(tmp: Path, body: str) -> Path:
    (tmp / "vm").mkdir()
    (tmp / "vm" / "junit.xml").write_text(f'<testsuites><testsuite>{body}</testsuite></testsuites>')
    return tmp / "vm"


def test_junit_cases_tells_xfail_from_skip(tmp_path: Path) -> None:
    from tests.vm.test_rig import junit_cases
    results = _junit(tmp_path, '<testcase name="a"/>'
                               '<testcase name="b"><skipped type="pytest.xfail" message="over 5 s"/></testcase>'
                               '<testcase name="c"><skipped type="pytest.skip" message="no module"/></testcase>'
                               '<testcase name="d"><failure message="boom"/></testcase>')
    assert junit_cases(results) == [("a", "passed", ""), ("b", "xfailed", "over 5 s"),
                                    ("c", "skipped", "no module"), ("d", "failure", "boom")]


def test_a_known_gap_may_xfail_but_nothing_else_may(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    from tests.vm import test_rig
    body = ('<testcase name="a"/>'
            '<testcase name="gap"><skipped type="pytest.xfail" message="19 s"/></testcase>')
    _junit(tmp_path, body)
    monkeypatch.setattr(test_rig, "rig", lambda results, *o, command: subprocess.CompletedProcess([], 0))
    test_rig.run_guest_tests(tmp_path, tests=["t.py"], min_cases=2, known_gaps=frozenset({"gap"}))
    with pytest.raises(AssertionError, match="not passed"):
        test_rig.run_guest_tests(tmp_path, tests=["t.py"], min_cases=2)
