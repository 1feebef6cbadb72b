"""tests/guest: tests that need the real kernel; they run inside the VM rig.

    python -m tests.vm.run [--no-login] -- python -m pytest tests/guest/...

Every test collected from this directory gets the ``guest`` marker (so
``-m "not guest"`` deselects it) and is skipped, with the reason, when this
is not the rig's guest: not root, or no device-mapper (/dev/mapper/control
does not open).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def guest_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root inside the VM rig (python -m tests.vm.run -- python -m pytest tests/guest)"
    try:
        os.close(os.open("/dev/mapper/control", os.O_RDWR))
    except OSError as e:
        # A container's static /dev may have the node while the kernel has no dm (ENODEV).
        return (f"no device-mapper in this kernel (/dev/mapper/control: {e.strerror}): needs the VM "
                "rig's real kernel (python -m tests.vm.run -- python -m pytest tests/guest)")
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = guest_skip_reason()
    for item in items:
        if HERE not in Path(item.path).resolve().parents:
            continue
        item.add_marker(pytest.mark.guest)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """A failure's traceback at once, not only in the summary: a guest run that hits the rig's
    timeout is killed before pytest prints its summary."""
    if report.failed and os.environ.get("SWITCH_AGENT_VM"):
        print(f"\n--- {report.nodeid} {report.when} failed:\n{report.longreprtext[-4000:]}", flush=True)
