"""Host side: boot the VM rig once and run tests/guest/test_dm.py (agent.kernel.dm) inside it.

With --no-login the rig brings up modules and udevd without the multipath
map, which this test does not need (it builds its own devices over loop
files).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vm.test_rig import check_rig_status, guest_pytest, junit_cases, rig


@pytest.mark.guest
def test_dm_layer_in_guest(tmp_path: Path) -> None:
    results = tmp_path / "vm"
    proc = rig(results, "--no-login", "--timeout", "600",
               command=guest_pytest(results, "-s", "tests/guest/test_dm.py"))
    check_rig_status(proc, results)
    cases = junit_cases(results)
    not_passed = [c for c in cases if c[1] != "passed"]
    assert proc.returncode == 0 and not not_passed, f"guest dm tests: {not_passed}; logs in {results}"
    assert len(cases) >= 6, cases
