"""Host-side wrapper: issue #16's install-and-reboot scenario in the systemd-booted guest.

One QEMU run (tests/vm/system_vm.py): the cached Debian 12 image boots with
systemd as init, tests/vm/system/scenario.py installs the .deb with apt,
sets up the array, the agent, iSCSI and an fstab mount, reboots the guest,
and checks everything again after the reboot. Every step's result and time
is printed (pytest -s, or the captured output of a failure).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.vm.system_vm import report, run_scenario

STEPS_AFTER_REBOOT = (
    "mounted through the routed device, no human action",
    "every file verifies",
    "a window of I/O forwards nothing (after the reboot)",
    "systemctl restart switch-agent under fio verify=crc32c",
    "systemctl stop switch-agent: I/O goes on",
    "a move's unit attention: udev's trigger starts the daemon, moved pages routed",
    "journalctl -u switch-agent -o json: structured fields",
)


def _missing() -> list[str]:
    needs = {"mmdebstrap": "mmdebstrap (sh tests/vm/setup.sh)", "qemu-system-x86_64": "qemu-system-x86",
             "mke2fs": "e2fsprogs"}
    missing = [what for tool, what in needs.items() if not shutil.which(tool)]
    if os.geteuid() != 0:
        missing.append("root (mmdebstrap --mode=root, the package build)")
    return missing


@pytest.mark.guest
@pytest.mark.systemd_guest
def test_install_and_reboot_in_systemd_guest(tmp_path: Path) -> None:
    missing = _missing()
    if missing:
        msg = "the systemd guest cannot be built here, missing: " + "; ".join(missing)
        if os.environ.get("CI") == "true" or os.environ.get("SWITCH_AGENT_VM_REQUIRED") == "1":
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    result = run_scenario(tmp_path / "sysvm")
    print(report(result))
    steps = {s["step"]: s for s in result.steps()}
    failed = [f"boot {s['boot']} {s['step']}: {s.get('error')}" for s in result.steps() if not s["ok"]]
    assert not failed, "steps failed:\n" + "\n".join(failed) + "\n" + report(result)
    missing_steps = [name for name in STEPS_AFTER_REBOOT if name not in steps]
    assert not missing_steps, f"the scenario never reached: {missing_steps}\n{report(result)}"
    assert result.results.get("boot2_ok") is True
    # The second boot found its filesystem on the routed device and its files intact.
    mounted = steps["mounted through the routed device, no human action"]["details"]
    assert mounted["dm_uuid"].startswith("SWAGENT-top-")
    assert steps["a window of I/O forwards nothing (after the reboot)"]["details"]["forwarded_cmds"] == 0
    assert steps["systemctl restart switch-agent under fio verify=crc32c"]["details"]["error"] == 0
    trigger = steps["a move's unit attention: udev's trigger starts the daemon, moved pages routed"]["details"]
    assert trigger["udev_trigger_count"] > 0
    assert trigger["record_generation"] == trigger["generation"]
    assert "WWID" in steps["journalctl -u switch-agent -o json: structured fields"]["details"]["fields"]
    for disk in ("root.img", "array.img"):  # ~1 GB each; the logs and results stay
        (result.workdir / disk).unlink(missing_ok=True)
