"""Host side: boot the VM rig once and run tests/guest/test_dm.py (agent.kernel.dm) inside it.

The rig (python -m tests.vm.run) takes /tmp/switch-agent-vm.lock itself; with
--no-login it brings up modules and udevd without the multipath map, which
this test does not need (it builds its own devices over loop files). Exit
status is the guest pytest's, or 125 when the rig itself failed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GUEST_TESTS = "tests/guest/test_dm.py"
RIG_FAILURE = 125


@pytest.mark.guest
def test_dm_layer_in_guest(tmp_path: Path) -> None:
    results = tmp_path / "vm"
    argv = [
        sys.executable, "-m", "tests.vm.run", "--no-login", "--results", str(results),
        "--timeout", "600", "--",
        # the repository is read-only in the guest: no cache, no hypothesis database
        str(Path(sys.executable)), "-m", "pytest", "-q", "-rs", "-s", "-p", "no:cacheprovider",
        "-p", "no:hypothesispytest", GUEST_TESTS,
    ]
    proc = subprocess.run(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=1500)
    print(proc.stdout[-20000:])
    command_log = results / "command.log"
    if command_log.exists():
        print(command_log.read_text(errors="replace")[-20000:])
    assert proc.returncode != RIG_FAILURE, f"the VM rig failed (logs in {results})"
    assert proc.returncode == 0, f"guest tests failed with status {proc.returncode} (logs in {results})"
    assert re.search(r"\b\d+ passed", proc.stdout), "guest dm tests did not run"
    assert not re.search(r"\b\d+ skipped", proc.stdout), "guest dm tests were skipped"
