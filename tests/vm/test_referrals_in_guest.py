"""Host-side wrapper: one VM boot runs the agent against LIO's own REPORT REFERRALS (tests/guest/test_referrals.py).

The rig sets up LIO's fileio LUN with four ALUA port groups and a striped
lba_map; the guest test reconfigures LIO in the same boot for three groups
and an uneven layout, and rewrites the lba_map under a routed LUN.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vm.test_rig import run_guest_tests


@pytest.mark.guest
def test_referrals_against_lio_in_guest(tmp_path: Path) -> None:
    run_guest_tests(tmp_path, "--array", "lio-referrals", "--members", "4", "--size", "512M",
                    "--lba-map", "striped:32M", "--timeout", "900",
                    tests=["tests/guest/test_referrals.py"], min_cases=4)
