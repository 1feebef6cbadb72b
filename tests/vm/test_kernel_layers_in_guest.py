"""Host side: boot the VM rig once and run tests/guest/test_kernel_layers.py inside it.

The rig (python -m tests.vm.run) takes /tmp/switch-agent-vm.lock itself, logs
in to the emulated array and waits for the multipath map; its exit status is
the guest pytest's, or 125 when the rig itself failed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GUEST_TESTS = "tests/guest/test_kernel_layers.py"
RIG_FAILURE = 125


@pytest.mark.guest
def test_kernel_layers_in_guest(tmp_path: Path) -> None:
    results = tmp_path / "vm"
    argv = [
        sys.executable, "-m", "tests.vm.run", "--members", "2", "--results", str(results), "--timeout", "600",
        "--", str(Path(sys.executable)), "-m", "pytest", "-v", "-rs", "-s", "-p", "no:cacheprovider",
        "-o", "faulthandler_timeout=120", GUEST_TESTS,
    ]
    proc = subprocess.run(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=1500)
    print(proc.stdout[-20000:])
    command_log = results / "command.log"
    if command_log.exists():
        print(command_log.read_text(errors="replace")[-20000:])
    assert proc.returncode != RIG_FAILURE, f"the VM rig failed (logs in {results})"
    assert proc.returncode == 0, f"guest tests failed with status {proc.returncode} (logs in {results})"
