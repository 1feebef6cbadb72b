"""Who holds a block device open: the dm devices stacked on it, mounts, and processes. Read-only.

For an error message only (`switch-agent logout` refusing to remove a routed
device in use): what is found is named, and anything unreadable is skipped.
"""

from __future__ import annotations

import os
from pathlib import Path


def holders_of(major: int, minor: int, *, sys_root: str = "/sys", proc_root: str = "/proc") -> list[str]:
    """Human-readable holders of block device major:minor: "dm-3 (holder)", "mount /srv", "pid 42 (fio)"."""
    found: list[str] = []
    kernel_name = _kernel_name(major, minor, sys_root)
    if kernel_name:
        try:
            found += [f"{h} (stacked device)" for h in sorted(os.listdir(Path(sys_root, "block", kernel_name,
                                                                              "holders")))]
        except OSError:
            pass
    try:
        for line in Path(proc_root, "self", "mountinfo").read_text().splitlines():
            fields = line.split()
            if len(fields) > 4 and fields[2] == f"{major}:{minor}":
                found.append(f"mounted at {fields[4]}")
    except OSError:
        pass
    wanted = os.makedev(major, minor)
    try:
        pids = [p for p in os.listdir(proc_root) if p.isdigit()]
    except OSError:
        pids = []
    for pid in sorted(pids, key=int):
        fd_dir = Path(proc_root, pid, "fd")
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(fd_dir / fd)
            except OSError:
                continue
            if st.st_rdev == wanted and (st.st_mode & 0o170000) == 0o060000:
                found.append(f"pid {pid} ({_comm(proc_root, pid)})")
                break
    return found


def _kernel_name(major: int, minor: int, sys_root: str) -> str | None:
    try:
        return os.path.basename(os.path.realpath(Path(sys_root, "dev", "block", f"{major}:{minor}")))
    except OSError:
        return None


def _comm(proc_root: str, pid: str) -> str:
    try:
        return Path(proc_root, pid, "comm").read_text().strip()
    except OSError:
        return "?"
