"""Host-side wrapper: one VM boot changes the array under continuous verified I/O (tests/guest/test_change.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vm.test_rig import run_guest_tests


@pytest.mark.guest
def test_routing_through_change_in_guest(tmp_path: Path) -> None:
    run_guest_tests(tmp_path, "--members", "3", "--no-login", "--timeout", "900", tests=["tests/guest/test_change.py"], min_cases=7)
