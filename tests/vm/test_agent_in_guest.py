"""Host-side wrapper: one VM boot runs the agent end to end (tests/guest/test_agent.py).

The array comes up without login, so the daemon is running before the LUN
appears, as it would be on a host that boots with switch-agent enabled.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vm.test_rig import check_rig_status, guest_pytest, junit_cases, rig


@pytest.mark.guest
def test_agent_end_to_end_in_guest(tmp_path: Path) -> None:
    results = tmp_path / "vm"
    proc = rig(results, "--members", "3", "--no-login", "--timeout", "900",
               command=guest_pytest(results, "-s", "tests/guest/test_agent.py"))
    check_rig_status(proc, results)
    cases = junit_cases(results)
    not_passed = [c for c in cases if c[1] != "passed"]
    assert proc.returncode == 0 and not not_passed, f"guest agent tests: {not_passed}; logs in {results}"
    assert len(cases) >= 9, cases
