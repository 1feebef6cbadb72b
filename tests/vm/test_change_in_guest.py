"""Host-side wrapper: one VM boot changes the array under continuous verified I/O (tests/guest/test_change.py).

On the default kernel; `python -m tests.vm.kernels` runs it on the others.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vm.kernels import TESTS
from tests.vm.test_rig import run_guest_tests


@pytest.mark.guest
def test_routing_through_change_in_guest(tmp_path: Path) -> None:
    change = TESTS["change"]
    run_guest_tests(tmp_path, *change.rig_options, tests=[change.path], min_cases=change.min_cases)
