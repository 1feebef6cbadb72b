"""Who holds a routed device open, read from fake /sys and /proc trees (for `logout`'s refusal)."""

from __future__ import annotations

import os

from agent.kernel.holders import holders_of


def test_stacked_devices_and_mounts_are_named(tmp_path):
    sys_root, proc_root = tmp_path / "sys", tmp_path / "proc"
    (sys_root / "block" / "dm-7" / "holders" / "dm-9").mkdir(parents=True)
    (sys_root / "dev" / "block").mkdir(parents=True)
    os.symlink("../../block/dm-7", sys_root / "dev" / "block" / "253:7")
    (proc_root / "self").mkdir(parents=True)
    (proc_root / "self" / "mountinfo").write_text(
        "36 25 253:7 / /srv/data rw,relatime shared:1 - xfs /dev/mapper/switch-x rw\n"
        "37 25 253:8 / /other rw - ext4 /dev/dm-8 rw\n")
    (proc_root / "42" / "fd").mkdir(parents=True)  # a process holding nothing of it
    (proc_root / "42" / "comm").write_text("fio\n")
    assert holders_of(253, 7, sys_root=str(sys_root), proc_root=str(proc_root)) == [
        "dm-9 (stacked device)", "mounted at /srv/data"]


def test_nothing_readable_gives_nothing(tmp_path):
    assert holders_of(253, 7, sys_root=str(tmp_path / "no-sys"), proc_root=str(tmp_path / "no-proc")) == []
