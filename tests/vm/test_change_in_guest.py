"""Host-side wrapper: one VM boot changes the array under continuous verified I/O (tests/guest/test_change.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vm.test_rig import check_rig_status, guest_pytest, junit_cases, rig


@pytest.mark.guest
def test_routing_through_change_in_guest(tmp_path: Path) -> None:
    results = tmp_path / "vm"
    proc = rig(results, "--members", "3", "--no-login", "--timeout", "900",
               command=guest_pytest(results, "-s", "tests/guest/test_change.py"))
    check_rig_status(proc, results)
    cases = junit_cases(results)
    not_passed = [c for c in cases if c[1] != "passed"]
    assert proc.returncode == 0 and not not_passed, f"guest change scenarios: {not_passed}; logs in {results}"
    assert len(cases) >= 3, cases
