"""Host-side wrapper: one VM boot runs the emulated array's guest checks (tests/guest/test_array.py).

Identity per path, GET PAGE MAP over SG_IO, the no-agent baseline (about
2/3 of I/O forwarded with 3 members) and bad input, against the real LIO
target, open-iscsi and multipathd.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vm.test_rig import check_rig_status, guest_pytest, junit_cases, rig


@pytest.mark.guest
def test_emulated_array_in_guest(tmp_path: Path) -> None:
    results = tmp_path / "vm"
    proc = rig(results, "--members", "3", "--size", "256M", "--page-size", "1M", "--timeout", "900",
               command=guest_pytest(results, "-s", "tests/guest/test_array.py"))
    check_rig_status(proc, results)
    cases = junit_cases(results)
    not_passed = [c for c in cases if c[1] != "passed"]
    assert proc.returncode == 0 and not not_passed, f"guest array checks: {not_passed}; logs in {results}"
    assert len(cases) >= 7, cases
