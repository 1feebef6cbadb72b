"""Host side: boot the VM rig once and run tests/guest/test_dm.py (agent.kernel.dm) inside it.

With --no-login the rig brings up modules and udevd without the multipath
map, which this test does not need (it builds its own devices over loop
files).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vm.test_rig import run_guest_tests


@pytest.mark.guest
def test_dm_layer_in_guest(tmp_path: Path) -> None:
    run_guest_tests(tmp_path, "--no-login", "--timeout", "600", tests=["tests/guest/test_dm.py"], min_cases=6)
