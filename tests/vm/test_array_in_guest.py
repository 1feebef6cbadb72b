"""Host-side wrapper: one VM boot runs the emulated array's guest checks (tests/guest/test_array.py).

Identity per path, GET PAGE MAP over SG_IO, the no-agent baseline (about
2/3 of I/O forwarded with 3 members) and bad input, against the real LIO
target, open-iscsi and multipathd.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vm.test_rig import run_guest_tests


@pytest.mark.guest
def test_emulated_array_in_guest(tmp_path: Path) -> None:
    run_guest_tests(tmp_path, "--members", "3", "--size", "256M", "--page-size", "1M", "--timeout", "900", tests=["tests/guest/test_array.py"], min_cases=7)
