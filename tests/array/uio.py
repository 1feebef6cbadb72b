"""TCMU uio devices: find the one LIO made for a backstore, map it, serve its ring.

LIO names each user backstore's uio device `tcm-user/<hba>/<dev>/<config>`
(/sys/class/uio/uioN/name). The mapping must be exactly maps/map0/size
bytes long, and only one process may hold the device open. The kernel
signals new entries through the uio event counter (poll/read on the fd);
we answer by completing entries and writing 4 bytes (the "kick").
"""

from __future__ import annotations

import errno
import mmap
import os
import time
from dataclasses import dataclass
from pathlib import Path

from tests.array.errors import UioDeviceError
from tests.array.ring import CommandHandler, CommandRing

UIO_CLASS = Path("/sys/class/uio")
_NAME_PREFIX = "tcm-user/"


@dataclass(frozen=True)
class UioEntry:
    """One TCMU uio device as sysfs lists it."""

    device: str  # "uio3"
    hba: str
    backstore: str
    config: str
    map_size: int


def list_tcmu_devices(uio_class: Path = UIO_CLASS) -> list[UioEntry]:
    """Every TCMU uio device present now."""
    found = []
    for entry in sorted(uio_class.glob("uio*")):
        try:
            name = (entry / "name").read_text().strip()
            size = int((entry / "maps/map0/size").read_text().strip(), 0)
        except OSError:
            continue  # removed while we looked
        if not name.startswith(_NAME_PREFIX):
            continue
        hba, backstore, config = name[len(_NAME_PREFIX):].split("/", 2)
        found.append(UioEntry(entry.name, hba, backstore, config, size))
    return found


def find_tcmu_device(config: str, *, timeout: float = 10.0,
                     uio_class: Path = UIO_CLASS) -> UioEntry:
    """The uio device whose config string is `config`, waiting for udev/sysfs up to `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        for entry in list_tcmu_devices(uio_class):
            if entry.config == config:
                return entry
        if time.monotonic() >= deadline:
            raise UioDeviceError(f"no TCMU uio device with config {config!r} after {timeout} s")
        time.sleep(0.05)  # polling sysfs with a deadline: no event source for this here


class TcmuDevice:
    """An open, mapped TCMU device: a file descriptor to poll and a ring to walk."""

    def __init__(self, entry: UioEntry, *, dev_dir: Path = Path("/dev"), timeout: float = 10.0) -> None:
        self.entry = entry
        path = dev_dir / entry.device
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
                break
            except FileNotFoundError:
                # udev may not have made the node yet.
                if time.monotonic() >= deadline:
                    raise UioDeviceError(f"{path} did not appear within {timeout} s") from None
                time.sleep(0.05)
            except OSError as exc:
                if exc.errno == errno.EBUSY:
                    raise UioDeviceError(f"{path} is open in another process (tcmu-runner?)") from exc
                raise UioDeviceError(f"cannot open {path}: {exc}") from exc
        try:
            self.map = mmap.mmap(self.fd, entry.map_size, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            os.close(self.fd)
            raise UioDeviceError(f"cannot map {entry.map_size} bytes of {path}: {exc}") from exc
        self.ring = CommandRing(self.map)

    def service(self, handler: CommandHandler) -> int:
        """Consume the event, complete every pending entry, kick the kernel; return the count."""
        try:
            os.read(self.fd, 4)  # resets poll readiness; the count itself is not needed
        except BlockingIOError:
            pass
        completed = self.ring.process(handler)
        if completed:
            os.write(self.fd, b"\0\0\0\0")
        return completed

    def close(self) -> None:
        """Unmap and close (the kernel fails what is still queued only when the device goes)."""
        self.ring.view.release()
        self.map.close()
        os.close(self.fd)
