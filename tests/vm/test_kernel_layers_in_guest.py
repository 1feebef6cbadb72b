"""Host side: boot the VM rig once and run tests/guest/test_kernel_layers.py inside it.

The rig (python -m tests.vm.run) takes /tmp/switch-agent-vm.lock itself, logs
in to the emulated array and waits for the multipath map; its exit status is
the guest pytest's, or 125 when the rig itself failed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vm.test_rig import check_rig_status, guest_pytest, junit_cases, rig


@pytest.mark.guest
def test_kernel_layers_in_guest(tmp_path: Path) -> None:
    results = tmp_path / "vm"
    proc = rig(results, "--members", "2", "--timeout", "600",
               command=guest_pytest(results, "-s", "-o", "faulthandler_timeout=120",
                                    "tests/guest/test_kernel_layers.py"))
    check_rig_status(proc, results)
    cases = junit_cases(results)
    not_passed = [c for c in cases if c[1] != "passed"]
    assert proc.returncode == 0 and not not_passed, f"guest kernel-layer tests: {not_passed}; logs in {results}"
    assert len(cases) >= 9, cases
