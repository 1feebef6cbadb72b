"""A fake udev event source on a real ``os.pipe()``, like pyudev's FakeMonitor.

``UdevMonitor(FakeUdevSource())`` runs exactly the code the agent runs on the
real netlink socket: the loop selects on the pipe's read end, and ``poll()``
reads one byte per event, returning None when nothing is waiting. Tests
``emit()`` events (from any thread) and the async consumer sees them.

The factories at the bottom build events with the properties the kernel and
the stock rules put there (10-dm.rules, 11-dm-mpath.rules, scsi_evt_emit), so
orchestrator tests need not remember the spelling.
"""

from __future__ import annotations

import collections
import errno
import os
import threading
from typing import Iterable, Mapping

from agent.kernel.udev import UdevError, UdevEvent, UdevEventsLostError

_EVENT = b"e"
_OVERFLOW = b"o"


class FakeUdevSource:
    """A ``UdevSource`` fed by the test: ``emit(event)``, ``emit_overflow()``, ``existing``."""

    def __init__(self, existing: Iterable[UdevEvent] = ()) -> None:
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        self._events: collections.deque[UdevEvent] = collections.deque()
        self._lock = threading.Lock()
        self._seqnum = 1000
        self.existing: list[UdevEvent] = list(existing)
        self.closed = False

    # -- the UdevSource side ---------------------------------------------------

    def fileno(self) -> int:
        """The pipe's read end."""
        return self._read_fd

    def poll(self) -> UdevEvent | None:
        """The next emitted event, None when the pipe is empty (like pyudev's ``poll(0)``)."""
        try:
            mark = os.read(self._read_fd, 1)
        except BlockingIOError:
            return None
        if mark == _OVERFLOW:
            raise UdevEventsLostError("udev netlink socket overflowed: events lost", errno.ENOBUFS)
        if mark != _EVENT:
            raise UdevError(f"fake udev pipe: unexpected {mark!r}")
        with self._lock:
            return self._events.popleft()

    def enumerate_existing(self) -> list[UdevEvent]:
        """``existing``, as the real source lists the udev database."""
        return list(self.existing)

    def close(self) -> None:
        """Close both ends of the pipe."""
        if not self.closed:
            self.closed = True
            os.close(self._read_fd)
            os.close(self._write_fd)

    # -- the test side ---------------------------------------------------------

    def emit(self, event: UdevEvent) -> UdevEvent:
        """Queue ``event`` (a SEQNUM is added if it has none) and make the fd readable."""
        with self._lock:
            if event.seqnum is None and event.action is not None:
                self._seqnum += 1
                props = dict(event.properties, SEQNUM=str(self._seqnum))
                event = UdevEvent(event.action, event.subsystem, event.devtype, event.sys_name,
                                  event.sys_path, event.device_node, props, self._seqnum)
            self._events.append(event)
        os.write(self._write_fd, _EVENT)
        return event

    def emit_overflow(self) -> None:
        """Make the next poll report ENOBUFS, as netlink does after dropping events."""
        os.write(self._write_fd, _OVERFLOW)


# -- event factories ---------------------------------------------------------------


def dm_disk_event(
    action: str | None, kernel_name: str, *, dm_name: str, dm_uuid: str = "", devnum: str = "254:0",
    extra: Mapping[str, str] | None = None,
) -> UdevEvent:
    """A block/disk event of a dm device, with 10-dm.rules' properties."""
    props = {
        "ACTION": action or "",
        "SUBSYSTEM": "block",
        "DEVTYPE": "disk",
        "DEVNAME": f"/dev/{kernel_name}",
        "DEVPATH": f"/devices/virtual/block/{kernel_name}",
        "MAJOR": devnum.split(":")[0],
        "MINOR": devnum.split(":")[1],
        "DM_NAME": dm_name,
        "DM_UDEV_RULES_VSN": "3",
    }
    if dm_uuid:
        props["DM_UUID"] = dm_uuid
    if action is None:
        del props["ACTION"]
    props.update(extra or {})
    return UdevEvent(action, "block", "disk", kernel_name, f"/sys/devices/virtual/block/{kernel_name}",
                     f"/dev/{kernel_name}", props)


def mpath_path_event(
    kernel_name: str, *, dm_name: str, wwid: str, dm_action: str, dm_path: str, valid_paths: int,
    devnum: str = "254:0",
) -> UdevEvent:
    """A dm-mpath PATH_FAILED / PATH_REINSTATED change event (drivers/md/dm-uevent.c)."""
    return dm_disk_event(
        "change", kernel_name, dm_name=dm_name, dm_uuid=f"mpath-{wwid}", devnum=devnum,
        extra={
            "DM_TARGET": "multipath",
            "DM_ACTION": dm_action,
            "DM_SEQNUM": "1",
            "DM_PATH": dm_path,
            "DM_NR_VALID_PATHS": str(valid_paths),
            "MPATH_DEVICE_READY": "1" if valid_paths else "0",
        },
    )


def sd_disk_event(action: str, kernel_name: str, *, hctl: str = "2:0:0:0", devnum: str = "8:16",
                  extra: Mapping[str, str] | None = None) -> UdevEvent:
    """A block/disk event of an sd device (a multipath path gets DM_MULTIPATH_DEVICE_PATH=1)."""
    host = hctl.split(":")[0]
    sys_path = f"/sys/devices/platform/host{host}/session1/target{hctl.rsplit(':', 1)[0]}/{hctl}/block/{kernel_name}"
    props = {
        "ACTION": action,
        "SUBSYSTEM": "block",
        "DEVTYPE": "disk",
        "DEVNAME": f"/dev/{kernel_name}",
        "DEVPATH": sys_path.removeprefix("/sys"),
        "MAJOR": devnum.split(":")[0],
        "MINOR": devnum.split(":")[1],
    }
    props.update(extra or {})
    return UdevEvent(action, "block", "disk", kernel_name, sys_path, f"/dev/{kernel_name}", props)


def scsi_ua_event(hctl: str, sdev_ua: str) -> UdevEvent:
    """The change event scsi_evt_emit sends on a scsi_device for a unit attention."""
    host = hctl.split(":")[0]
    sys_path = f"/sys/devices/platform/host{host}/session1/target{hctl.rsplit(':', 1)[0]}/{hctl}"
    props = {
        "ACTION": "change",
        "SUBSYSTEM": "scsi",
        "DEVTYPE": "scsi_device",
        "DEVPATH": sys_path.removeprefix("/sys"),
        "SDEV_UA": sdev_ua,
    }
    return UdevEvent("change", "scsi", "scsi_device", hctl, sys_path, None, props)
