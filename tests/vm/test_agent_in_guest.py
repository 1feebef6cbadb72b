"""Host-side wrapper: one VM boot runs the agent end to end (tests/guest/test_agent.py).

The array comes up without login, so the daemon is running before the LUN
appears, as it would be on a host that boots with switch-agent enabled.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vm.test_rig import run_guest_tests


@pytest.mark.guest
def test_agent_end_to_end_in_guest(tmp_path: Path) -> None:
    run_guest_tests(tmp_path, "--members", "3", "--no-login", "--timeout", "900", tests=["tests/guest/test_agent.py"], min_cases=9)
