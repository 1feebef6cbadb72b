"""Host-side wrapper: one VM boot runs the metrics test (tests/guest/test_metrics.py).

node_exporter (Debian's prometheus-node-exporter, textfile collector only) and
tmux run in the guest beside the daemon; the array is logged in at boot.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vm.test_rig import run_guest_tests


@pytest.mark.guest
def test_metrics_in_guest(tmp_path: Path) -> None:
    run_guest_tests(tmp_path, "--members", "3", "--timeout", "600", tests=["tests/guest/test_metrics.py"], min_cases=4)
