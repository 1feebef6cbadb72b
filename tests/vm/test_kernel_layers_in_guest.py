"""Host side: boot the VM rig once and run tests/guest/test_kernel_layers.py inside it.

The rig (python -m tests.vm.run) takes /tmp/switch-agent-vm.lock itself, logs
in to the emulated array and waits for the multipath map; its exit status is
the guest pytest's, or 125 when the rig itself failed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vm.test_rig import run_guest_tests


@pytest.mark.guest
def test_kernel_layers_in_guest(tmp_path: Path) -> None:
    run_guest_tests(tmp_path, "--members", "2", "--timeout", "600",
                    tests=["-o", "faulthandler_timeout=120", "tests/guest/test_kernel_layers.py"], min_cases=9)
