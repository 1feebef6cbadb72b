"""Host-side wrapper: one VM boot checks member portals after a group login (tests/guest/test_portals.py).

The rig logs in to member 0's portal only (--login first); the guest test
reads VPD 0xC1 through that one path, compares SendTargets discovery, follows
add-member / remove-member, and brings the array up again with CHAP required.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vm.test_rig import run_guest_tests


@pytest.mark.guest
def test_member_portals_in_guest(tmp_path: Path) -> None:
    run_guest_tests(tmp_path, "--members", "3", "--login", "first", "--size", "256M", "--page-size", "1M",
                    "--timeout", "900", tests=["tests/guest/test_portals.py"], min_cases=5)
