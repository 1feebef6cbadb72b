"""Host-side wrapper: one VM boot runs the agent end to end (tests/guest/test_agent.py).

The array comes up without login, so the daemon is running before the LUN
appears, as it would be on a host that boots with switch-agent enabled.

On the default kernel (Debian 12's 6.1), and on the oldest and the newest
kernel users run (Debian 11's 5.10, 6.12 of Debian 12 backports and Debian 13),
fetched by `sh tests/vm/setup.sh --kernels`.  `python -m tests.vm.kernels`
runs the whole kernel x test matrix and writes docs/kernels.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vm.kernels import TESTS
from tests.vm.test_rig import run_guest_tests


@pytest.mark.guest
@pytest.mark.parametrize("kernel", ["6.1", "5.10", "6.12"])
def test_agent_end_to_end_in_guest(tmp_path: Path, kernel: str) -> None:
    agent = TESTS["agent"]
    run_guest_tests(tmp_path, "--kernel", kernel, *agent.rig_options, tests=[agent.path], min_cases=agent.min_cases)
