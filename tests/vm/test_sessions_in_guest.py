"""Host-side wrapper: one VM boot checks the agent's session management (tests/guest/test_sessions.py).

The array is up with no session at all (--no-login); the guest test makes
the one login, then adds, removes and kills sessions' members under the
verified writer, changes sessions_per_member, and ends with CHAP required.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vm.test_rig import run_guest_tests


@pytest.mark.guest
def test_session_management_in_guest(tmp_path: Path) -> None:
    run_guest_tests(tmp_path, "--members", "3", "--no-login", "--size", "256M", "--page-size", "1M",
                    "--timeout", "900", tests=["tests/guest/test_sessions.py"], min_cases=8)
