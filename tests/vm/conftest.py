"""tests/vm: host-side tests; those marked ``guest`` each boot one VM.

Deselect the VM boots with ``-m "not guest"``, or set SWITCH_AGENT_SKIP_VM=1.
When the rig's prerequisites (vng, qemu, a /boot/vmlinuz-*) are missing the
``guest`` tests skip and say what is missing, except under CI=true or
SWITCH_AGENT_VM_REQUIRED=1, where they fail instead: a CI run must not go
green by skipping its real-kernel tests.
"""

from __future__ import annotations

import os

import pytest

from tests.vm.run import check_prerequisites


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("guest") is None:
        return
    if os.environ.get("SWITCH_AGENT_SKIP_VM") == "1":
        pytest.skip("SWITCH_AGENT_SKIP_VM=1: VM tests skipped")
    # A wrapper parametrized by guest kernel needs that kernel (setup.sh --kernels fetches it).
    callspec = getattr(item, "callspec", None)
    _, missing = check_prerequisites(callspec.params.get("kernel") if callspec else None)
    if missing:
        msg = ("the VM rig cannot boot here, missing: " + "; ".join(missing)
               + " (run: sh tests/vm/setup.sh --kernels)")
        if os.environ.get("CI") == "true" or os.environ.get("SWITCH_AGENT_VM_REQUIRED") == "1":
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
