"""The thin device-mapper layer: every dm ioctl goes through one function.

`DeviceMapper` talks to ``/dev/mapper/control`` with the dm ioctl ABI
(``include/uapi/linux/dm-ioctl.h``, interface 4.x) directly; there is no
``dmsetup`` subprocess and no libdevmapper. It holds no policy: each public
method is named after the ioctl it issues (``device_create`` is
``DM_DEV_CREATE``, ``table_load`` is ``DM_TABLE_LOAD``, ...) and returns what
the kernel answered. The model is devicemapper-rs (``src/core/dm.rs``): one
private `DeviceMapper._ioctl` builds ``struct dm_ioctl``, picks the interface
version per command the way libdm does, starts with a 16 KiB buffer and
doubles it while the kernel sets ``DM_BUFFER_FULL_FLAG``, and turns an OSError
into a `DmIoctlError` that names the command and the device.

Ownership guard: the agent must only change its own devices. A
`DeviceMapper` is built with an ``owned_uuid_prefix``; `device_create`
refuses a uuid without it, and every mutating call (load, clear, suspend,
resume, remove, message) first reads the device's uuid with ``DM_DEV_STATUS``
and raises `NotOwnedError` if it lacks the prefix. The mutating ioctl is then
addressed *by that uuid*, so a device renamed between the check and the call
cannot be hit by mistake. Reads are allowed on any device.

udev synchronisation: ``DM_DEV_SUSPEND`` (resume) and ``DM_DEV_REMOVE`` carry a
udev cookie in ``event_nr`` exactly as libdm/dmsetup send it (see `UdevSync`),
so ``55-dm.rules``/``10-dm.rules`` create ``/dev/mapper/<name>`` and honour the
``DM_UDEV_DISABLE_*`` flags, and the call returns only after udev has
finished with the event (``95-dm-notify.rules`` runs ``dmsetup udevcomplete``).

Threads: waiting for udev blocks (and so do suspend with flush, and big table
loads), so the agent calls these methods from a worker thread. One instance
keeps one control fd; every call builds its own buffer and its own cookie, so
concurrent calls on one instance from several threads are safe (the kernel
serialises what needs serialising). Nothing here touches asyncio.

Errors::

    SwitchAgentError
     └── DmError                 anything this module raises on purpose
          ├── DmIoctlError       the kernel refused an ioctl: command, device, errno
          ├── NotOwnedError      a mutating call on a device whose uuid lacks our prefix
          ├── DmUnavailableError /dev/mapper/control cannot be opened (no dm in the kernel?)
          └── DmArgumentError    a caller asked for something the ABI cannot carry
                                 (also a ValueError)
"""

from __future__ import annotations

import ctypes
import enum
import errno
import fcntl
import logging
import os
import random
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from protocol.errors import SwitchAgentError

LOG = logging.getLogger(__name__)

# --- ABI constants: include/uapi/linux/dm-ioctl.h -----------------------------

DM_CONTROL_PATH = "/dev/mapper/control"
DM_IOCTL = 0xFD  # the ioctl "type" byte
DM_NAME_LEN = 128
DM_UUID_LEN = 129
DM_MAX_TYPE_NAME = 16

#: struct dm_ioctl: version[3], data_size, data_start, target_count, open_count,
#: flags, event_nr, padding, dev, name[128], uuid[129], data[7] -- 312 bytes.
_DM_IOCTL = struct.Struct("=3IIIIiIIIQ128s129s7s")
DM_IOCTL_SIZE = _DM_IOCTL.size  # 312; payloads start here (data_start), as in libdm
assert DM_IOCTL_SIZE == 312
#: struct dm_target_spec: sector_start, length, status, next, target_type[16] -- 40 bytes.
_DM_TARGET_SPEC = struct.Struct("=QQiI16s")
#: struct dm_name_list head: dev, next; name[] follows at offset 12.
_DM_NAME_LIST = struct.Struct("=QI")
#: struct dm_target_versions head: next, version[3]; name[] follows at offset 16.
_DM_TARGET_VERSIONS = struct.Struct("=I3I")
#: struct dm_target_deps head: count, padding; dev[] (u64) follows at offset 8.
_DM_TARGET_DEPS = struct.Struct("=II")
#: struct dm_target_msg head: sector; message[] follows at offset 8.
_DM_TARGET_MSG = struct.Struct("=Q")


class DmCommand(enum.IntEnum):
    """ioctl command numbers (the ``DM_*_CMD`` enum in dm-ioctl.h)."""

    VERSION = 0x00
    REMOVE_ALL = 0x01
    LIST_DEVICES = 0x02
    DEV_CREATE = 0x03
    DEV_REMOVE = 0x04
    DEV_RENAME = 0x05
    DEV_SUSPEND = 0x06
    DEV_STATUS = 0x07
    DEV_WAIT = 0x08
    TABLE_LOAD = 0x09
    TABLE_CLEAR = 0x0A
    TABLE_DEPS = 0x0B
    TABLE_STATUS = 0x0C
    LIST_VERSIONS = 0x0D
    TARGET_MSG = 0x0E
    DEV_SET_GEOMETRY = 0x0F
    DEV_ARM_POLL = 0x10
    GET_TARGET_VERSION = 0x11

    @property
    def request(self) -> int:
        """The ioctl request number, ``_IOWR(DM_IOCTL, nr, struct dm_ioctl)`` = 0xc138fd00 + nr."""
        return (3 << 30) | (DM_IOCTL_SIZE << 16) | (DM_IOCTL << 8) | int(self)

    def __str__(self) -> str:
        return f"DM_{self.name}"


# Interface version sent per command, as libdm's _cmd_data_v4 table
# (lvm2 libdm/ioctl/libdm-iface.c): {4,0,0} except versions {4,1,0} and
# message {4,2,0}. The kernel only requires major 4 and minor <= its own.
_VERSION_FOR = {DmCommand.LIST_VERSIONS: (4, 1, 0), DmCommand.TARGET_MSG: (4, 2, 0)}
_DEFAULT_VERSION = (4, 0, 0)

# struct dm_ioctl flags (dm-ioctl.h "Status bits").
DM_READONLY_FLAG = 1 << 0  # in/out
DM_SUSPEND_FLAG = 1 << 1  # in/out
DM_PERSISTENT_DEV_FLAG = 1 << 3  # in
DM_STATUS_TABLE_FLAG = 1 << 4  # in: TABLE_STATUS returns the table, not the status
DM_ACTIVE_PRESENT_FLAG = 1 << 5  # out
DM_INACTIVE_PRESENT_FLAG = 1 << 6  # out
DM_BUFFER_FULL_FLAG = 1 << 8  # out: retry with a bigger buffer
DM_SKIP_LOCKFS_FLAG = 1 << 10  # in
DM_NOFLUSH_FLAG = 1 << 11  # in
DM_QUERY_INACTIVE_TABLE_FLAG = 1 << 12  # in
DM_UEVENT_GENERATED_FLAG = 1 << 13  # out: a uevent carrying our cookie was sent
DM_UUID_FLAG = 1 << 14  # in: LIST_DEVICES returns uuids too; RENAME sets the uuid
DM_SECURE_DATA_FLAG = 1 << 15  # in
DM_DATA_OUT_FLAG = 1 << 16  # out: TARGET_MSG returned text
DM_DEFERRED_REMOVE = 1 << 17  # in/out
DM_INTERNAL_SUSPEND_FLAG = 1 << 18  # out

# struct dm_name_list flags word (dm-ioctl.h).
DM_NAME_LIST_FLAG_HAS_UUID = 1
DM_NAME_LIST_FLAG_DOESNT_HAVE_UUID = 2

# udev cookie flags, high 16 bits of the cookie (lvm2 libdm/libdevmapper.h).
DM_UDEV_FLAGS_SHIFT = 16
DM_UDEV_DISABLE_DM_RULES_FLAG = 0x0001
DM_UDEV_DISABLE_SUBSYSTEM_RULES_FLAG = 0x0002
DM_UDEV_DISABLE_DISK_RULES_FLAG = 0x0004
DM_UDEV_DISABLE_OTHER_RULES_FLAG = 0x0008
DM_UDEV_LOW_PRIORITY_FLAG = 0x0010
DM_UDEV_DISABLE_LIBRARY_FALLBACK = 0x0020
DM_UDEV_PRIMARY_SOURCE_FLAG = 0x0040
#: DM_COOKIE_MAGIC (lvm2 libdm/libdm-common.c): semaphore key = MAGIC << 16 | base.
DM_COOKIE_MAGIC = 0x0D4D

#: libdm and devicemapper-rs start every buffer at 16 KiB to make BUFFER_FULL rare.
MIN_BUFFER_SIZE = 16 * 1024
#: copy_params() (drivers/md/dm-ioctl.c) rejects data_size above
#: DM_MAX_TARGETS * DM_MAX_TARGET_PARAMS = 1 GiB; stop doubling there.
MAX_BUFFER_SIZE = 1 << 30

IoctlFn = Callable[[int, int, bytearray], object]


# --- errors -------------------------------------------------------------------


class DmError(SwitchAgentError):
    """Root of every error the device-mapper layer raises."""


class DmIoctlError(DmError):
    """The kernel refused a dm ioctl.

    ``command`` is the `DmCommand`, ``name`` the device as the caller named it
    (its uuid when looked up by uuid; None for global commands), ``errno`` the
    kernel's errno. The reason itself is in the kernel log (``DMERR``).
    """

    def __init__(self, command: DmCommand, name: str | None, errno: int, message: str) -> None:
        self.command = command
        self.name = name
        self.errno = errno
        self.message = message
        super().__init__(f"{command} {name or '-'}: {message}")


class NotOwnedError(DmError):
    """A mutating call was refused: the device's uuid does not carry our prefix."""

    def __init__(self, command: DmCommand, name: str, uuid: str, prefix: str) -> None:
        self.command = command
        self.name = name
        self.uuid = uuid
        self.prefix = prefix
        super().__init__(
            f"{command} {name}: refused, uuid {uuid!r} does not start with {prefix!r} "
            "(not a switch-agent device)"
        )


class DmUnavailableError(DmError):
    """The control node cannot be opened: no device-mapper in this kernel, or not root."""

    def __init__(self, path: str, errno: int) -> None:
        self.path = path
        self.errno = errno
        super().__init__(f"{path}: {os.strerror(errno)} (is dm-mod loaded, and are we root?)")


class DmArgumentError(DmError, ValueError):
    """A name, uuid, target or message that the dm ioctl ABI cannot carry."""


# --- values -------------------------------------------------------------------


class Target(NamedTuple):
    """One table line: ``<start> <length> <type> <params>``, in 512-byte sectors."""

    start_sector: int
    length_sectors: int
    target_type: str
    params: str


@dataclass(frozen=True)
class DeviceInfo:
    """What ``DM_DEV_STATUS`` (and every device command) reports about a device."""

    name: str
    uuid: str  # "" if the device has none
    major: int
    minor: int
    open_count: int
    target_count: int
    event_nr: int
    suspended: bool
    read_only: bool
    active_present: bool
    inactive_present: bool
    deferred_remove: bool
    flags: int  # the raw dm_ioctl flags word


@dataclass(frozen=True)
class DeviceEntry:
    """One device from ``DM_LIST_DEVICES``."""

    name: str
    uuid: str  # "" if the device has none
    major: int
    minor: int
    event_nr: int | None  # None: the kernel's list carries no event numbers (before 4.14)
    uuid_listed: bool = field(default=True, compare=False)
    """False: the kernel's list said nothing about the uuid (Linux 5.10's dm ioctl 4.43 ignores
    DM_UUID_FLAG here; later kernels set HAS_UUID or DOESNT_HAVE_UUID), so ``uuid`` is unknown,
    not empty; list_devices() asks each such device."""


class _Header(NamedTuple):
    version: tuple[int, int, int]
    data_size: int
    data_start: int
    target_count: int
    open_count: int
    flags: int
    event_nr: int
    dev: int
    name: str
    uuid: str


def decode_dev(dev: int) -> tuple[int, int]:
    """Split a kernel ``huge_encode_dev`` value into (major, minor).

    ``include/linux/kdev_t.h`` new_encode_dev: minor low byte in bits 0-7,
    major in bits 8-19, the rest of the minor from bit 20 up.
    """
    return (dev & 0xFFF00) >> 8, (dev & 0xFF) | ((dev >> 12) & 0xFFF00)


def _cstr(buf: bytes | bytearray | memoryview, start: int = 0, end: int | None = None) -> str:
    raw = bytes(buf[start:end])
    nul = raw.find(b"\0")
    return (raw if nul < 0 else raw[:nul]).decode("utf-8", "replace")


def _align8(n: int) -> int:
    return (n + 7) & ~7


# --- wire format (pure, host-testable) ----------------------------------------


def pack_header(
    command: DmCommand,
    *,
    data_size: int,
    name: str = "",
    uuid: str = "",
    flags: int = 0,
    event_nr: int = 0,
    target_count: int = 0,
) -> bytes:
    """Build the 312-byte ``struct dm_ioctl`` for ``command`` (data_start = 312)."""
    return _DM_IOCTL.pack(
        *_VERSION_FOR.get(command, _DEFAULT_VERSION),
        data_size,
        DM_IOCTL_SIZE,
        target_count,
        0,
        flags,
        event_nr,
        0,
        0,
        name.encode(),
        uuid.encode(),
        b"",
    )


def unpack_header(buf: bytes | bytearray) -> _Header:
    """Read back the ``struct dm_ioctl`` the kernel left at the start of ``buf``."""
    v0, v1, v2, size, start, count, opens, flags, event_nr, _pad, dev, name, uuid, _d = (
        _DM_IOCTL.unpack_from(buf)
    )
    return _Header((v0, v1, v2), size, start, count, opens, flags, event_nr, dev,
                   _cstr(name), _cstr(uuid))


def pack_targets(targets: Iterable[Target | tuple[int, int, str, str]]) -> tuple[bytes, int]:
    """Serialise a table for ``DM_TABLE_LOAD``: returns (payload, target count).

    Each ``struct dm_target_spec`` is followed by its NUL-terminated parameter
    string and padded so the next spec is 8-byte aligned; ``next`` is the
    offset from *this* spec to the next (``next_target`` in dm-ioctl.c
    rejects anything unaligned). TABLE_STATUS answers differently: there
    ``next`` counts from the first spec (see `parse_target_specs`).
    """
    out = bytearray()
    count = 0
    for start, length, ttype, params in targets:
        tname = ttype.encode()
        if not tname or len(tname) >= DM_MAX_TYPE_NAME:
            raise DmArgumentError(f"target type {ttype!r}: 1 to {DM_MAX_TYPE_NAME - 1} bytes")
        body = params.encode()
        if b"\0" in body:
            raise DmArgumentError(f"target params contain a NUL: {params!r}")
        if start < 0 or length <= 0:
            raise DmArgumentError(f"target at {start} length {length}: bad extent")
        size = _align8(_DM_TARGET_SPEC.size + len(body) + 1)
        spec = _DM_TARGET_SPEC.pack(start, length, 0, size, tname)
        out += spec + body + b"\0" * (size - _DM_TARGET_SPEC.size - len(body))
        count += 1
    return bytes(out), count


def parse_target_specs(data: bytes | bytearray, count: int) -> list[Target]:
    """Parse the specs ``DM_TABLE_STATUS`` returns (``next`` relative to the first spec)."""
    out = []
    off = 0
    for _ in range(count):
        if off + _DM_TARGET_SPEC.size > len(data):
            raise DmArgumentError(f"status spec at {off} beyond {len(data)} bytes of data")
        start, length, _status, nxt, ttype = _DM_TARGET_SPEC.unpack_from(data, off)
        out.append(Target(start, length, _cstr(ttype), _cstr(data, off + _DM_TARGET_SPEC.size)))
        off = nxt
    return out


def parse_name_list(data: bytes | bytearray) -> list[DeviceEntry]:
    """Parse ``DM_LIST_DEVICES`` output (a chain of ``struct dm_name_list``).

    After each NUL-terminated name, 8-aligned, come ``event_nr`` and a flags
    word, then (8-aligned) the uuid if the flags say DM_NAME_LIST_FLAG_HAS_UUID.
    ``next`` is relative to the current record; 0 ends the chain; an empty
    list is either no data or a first record with ``dev == 0``.
    """
    out: list[DeviceEntry] = []
    if len(data) < _DM_NAME_LIST.size:
        return out
    off = 0
    while True:
        dev, nxt = _DM_NAME_LIST.unpack_from(data, off)
        if dev == 0 and off == 0:
            return out
        end = off + nxt if nxt else len(data)
        name_at = off + _DM_NAME_LIST.size
        nul = data.index(b"\0", name_at, end)
        name = bytes(data[name_at:nul]).decode("utf-8", "replace")
        tail = _align8(nul + 1)
        event_nr, uuid, listed = None, "", False
        if tail + 8 <= end:
            # On a kernel that lists no uuids the word after event_nr is alignment
            # padding (ours: zero), so neither flag says whether there is a uuid.
            event_nr, lflags = struct.unpack_from("=II", data, tail)
            listed = bool(lflags & (DM_NAME_LIST_FLAG_HAS_UUID | DM_NAME_LIST_FLAG_DOESNT_HAVE_UUID))
            if lflags & DM_NAME_LIST_FLAG_HAS_UUID:
                uuid = _cstr(data, _align8(tail + 8), end)
        major, minor = decode_dev(dev)
        out.append(DeviceEntry(name, uuid, major, minor, event_nr, listed))
        if not nxt:
            return out
        off += nxt


def parse_target_versions(data: bytes | bytearray) -> dict[str, tuple[int, int, int]]:
    """Parse ``DM_LIST_VERSIONS`` output (``struct dm_target_versions``, ``next`` relative)."""
    out: dict[str, tuple[int, int, int]] = {}
    off = 0
    while off + _DM_TARGET_VERSIONS.size <= len(data):
        nxt, v0, v1, v2 = _DM_TARGET_VERSIONS.unpack_from(data, off)
        out[_cstr(data, off + _DM_TARGET_VERSIONS.size)] = (v0, v1, v2)
        if not nxt:
            break
        off += nxt
    return out


def parse_deps(data: bytes | bytearray) -> list[tuple[int, int]]:
    """Parse ``DM_TABLE_DEPS`` output into (major, minor) pairs."""
    if len(data) < _DM_TARGET_DEPS.size:
        return []
    count, _pad = _DM_TARGET_DEPS.unpack_from(data)
    devs = struct.unpack_from(f"={count}Q", data, _DM_TARGET_DEPS.size)
    return [decode_dev(d) for d in devs]


def _info(h: _Header) -> DeviceInfo:
    major, minor = decode_dev(h.dev)
    return DeviceInfo(
        name=h.name,
        uuid=h.uuid,
        major=major,
        minor=minor,
        open_count=h.open_count,
        target_count=h.target_count,
        event_nr=h.event_nr,
        suspended=bool(h.flags & DM_SUSPEND_FLAG),
        read_only=bool(h.flags & DM_READONLY_FLAG),
        active_present=bool(h.flags & DM_ACTIVE_PRESENT_FLAG),
        inactive_present=bool(h.flags & DM_INACTIVE_PRESENT_FLAG),
        deferred_remove=bool(h.flags & DM_DEFERRED_REMOVE),
        flags=h.flags,
    )


# --- udev cookies (libdm's SysV semaphore protocol) ----------------------------


class _Sembuf(ctypes.Structure):
    _fields_ = [("sem_num", ctypes.c_ushort), ("sem_op", ctypes.c_short), ("sem_flg", ctypes.c_short)]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


# <bits/ipc.h>, <bits/sem.h> (Linux)
_IPC_CREAT = 0o1000
_IPC_EXCL = 0o2000
_IPC_NOWAIT = 0o4000
_IPC_RMID = 0
_GETVAL = 12
_SETVAL = 16


@dataclass(frozen=True)
class UdevCookie:
    """A cookie for one ioctl: ``value`` goes into ``event_nr``; ``semid`` is None when not waiting."""

    value: int
    semid: int | None = None

    @property
    def base(self) -> int:
        """The low 16 bits: the semaphore's key is ``DM_COOKIE_MAGIC << 16 | base`` (0: flags only)."""
        return self.value & 0xFFFF


class UdevSync:
    """libdm's udev cookie protocol over SysV semaphores (lvm2 libdm/libdm-common.c).

    `begin` creates a semaphore with key ``(DM_COOKIE_MAGIC << 16) | base``
    for a random non-zero 16-bit base, sets it to 1 and increments it for the
    task; the cookie ``(udev_flags << 16) | base`` goes into ``event_nr``. The
    kernel puts it into the uevent as ``DM_COOKIE``; ``95-dm-notify.rules``
    runs ``dmsetup udevcomplete $DM_COOKIE``, which decrements. `complete`
    decrements once more if the kernel sent no uevent
    (``DM_UEVENT_GENERATED_FLAG`` clear), drops the initial 1, waits for zero
    (at most ``timeout`` seconds) and destroys the semaphore.

    If udev is not running (``/run/udev/control`` absent) or SysV semaphores
    are unavailable, the cookie carries the flags only (base 0), which
    ``udevcomplete`` accepts, and nothing is waited for. A timeout is logged at
    WARNING and does not raise: the ioctl itself has already succeeded.
    """

    def __init__(
        self,
        *,
        timeout: float = 30.0,
        udev_control: str = "/run/udev/control",
        rng: random.Random | None = None,
    ) -> None:
        self.timeout = timeout
        self.udev_control = udev_control
        self._rng = rng or random.SystemRandom()
        self._libc = ctypes.CDLL(None, use_errno=True)  # the process's own libc
        self._libc.semtimedop.argtypes = [ctypes.c_int, ctypes.POINTER(_Sembuf), ctypes.c_size_t,
                                          ctypes.POINTER(_Timespec)]
        self._libc.semop.argtypes = [ctypes.c_int, ctypes.POINTER(_Sembuf), ctypes.c_size_t]

    def udev_running(self) -> bool:
        """True if udevd's control socket exists (what libdm and devicemapper-rs check)."""
        return os.path.exists(self.udev_control)

    def begin(self, udev_flags: int) -> UdevCookie:
        """Make the cookie for one ioctl, with a semaphore to wait on when udev runs."""
        flags_part = (udev_flags & 0xFFFF) << DM_UDEV_FLAGS_SHIFT
        if not self.udev_running():
            LOG.debug("udev not running: flags-only cookie %#x", flags_part)
            return UdevCookie(flags_part)
        err = 0
        for _ in range(16):
            base = self._rng.randint(1, 0xFFFF)
            semid = self._libc.semget((DM_COOKIE_MAGIC << 16) | base, 1,
                                      0o600 | _IPC_CREAT | _IPC_EXCL)
            if semid >= 0:
                break
            err = ctypes.get_errno()
            if err != errno.EEXIST:
                break
        else:
            semid = -1
        if semid < 0:
            LOG.warning("udev cookie semaphore not created (%s): not waiting for udev",
                        os.strerror(err))
            return UdevCookie(flags_part)
        cookie = UdevCookie(flags_part | base, semid)
        try:
            self._check(self._libc.semctl(semid, 0, _SETVAL, ctypes.c_int(1)), "semctl SETVAL")
            self._semop(semid, +1, 0)
        except OSError as exc:
            LOG.warning("udev cookie %#x: %s: not waiting for udev", cookie.value, exc)
            self.cancel(cookie)
            return UdevCookie(flags_part)
        LOG.debug("udev cookie %#x (semid %d)", cookie.value, semid)
        return cookie

    def complete(self, cookie: UdevCookie, ioctl_flags: int) -> bool:
        """Wait until udev has processed the event for ``cookie``; True if it did.

        False if it timed out or the semaphore failed (logged at WARNING).
        The semaphore is destroyed in every case.
        """
        if cookie.semid is None:
            return True
        try:
            if not ioctl_flags & DM_UEVENT_GENERATED_FLAG:
                self._semop(cookie.semid, -1, _IPC_NOWAIT)
            self._semop(cookie.semid, -1, _IPC_NOWAIT)  # the initial 1
            deadline = time.monotonic() + self.timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    LOG.warning("udev cookie %#x: udev did not complete within %.1f s "
                                "(is 95-dm-notify.rules installed?)", cookie.value, self.timeout)
                    return False
                ts = _Timespec(int(left), int((left % 1) * 1e9))
                sb = _Sembuf(0, 0, 0)
                if self._libc.semtimedop(cookie.semid, ctypes.byref(sb), 1, ctypes.byref(ts)) == 0:
                    LOG.debug("udev cookie %#x: udev done", cookie.value)
                    return True
                err = ctypes.get_errno()
                if err not in (errno.EINTR, errno.EAGAIN):
                    raise OSError(err, f"semtimedop: {os.strerror(err)}")
        except OSError as exc:
            LOG.warning("udev cookie %#x: %s", cookie.value, exc)
            return False
        finally:
            self.cancel(cookie)

    def cancel(self, cookie: UdevCookie) -> None:
        """Destroy the cookie's semaphore without waiting (the ioctl failed)."""
        if cookie.semid is not None and self._libc.semctl(cookie.semid, 0, _IPC_RMID) < 0:
            LOG.warning("udev cookie %#x: removing semaphore %d: %s", cookie.value,
                        cookie.semid, os.strerror(ctypes.get_errno()))

    def _semop(self, semid: int, op: int, flg: int) -> None:
        sb = _Sembuf(0, op, flg)
        self._check(self._libc.semop(semid, ctypes.byref(sb), 1), f"semop {op:+d}")

    @staticmethod
    def _check(rc: int, what: str) -> None:
        if rc < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")


class NoUdevSync:
    """Flags-only cookies and no waiting: for hosts without udev, and for tests."""

    def begin(self, udev_flags: int) -> UdevCookie:
        """A cookie with the flags and base 0."""
        return UdevCookie((udev_flags & 0xFFFF) << DM_UDEV_FLAGS_SHIFT)

    def complete(self, cookie: UdevCookie, ioctl_flags: int) -> bool:
        """Nothing to wait for."""
        return True

    def cancel(self, cookie: UdevCookie) -> None:
        """Nothing to destroy."""


def _fcntl_ioctl(fd: int, request: int, buf: bytearray) -> object:
    return fcntl.ioctl(fd, request, buf, True)


# --- the device-mapper control device ------------------------------------------


class DeviceMapper:
    """The dm control device, one method per ioctl, guarded by uuid ownership.

    Methods address a device by ``name`` or by keyword ``uuid`` (exactly one).
    ``ioctl`` replaces ``fcntl.ioctl`` (signature ``(fd, request, bytearray)``,
    mutating the buffer in place) so host tests can hand a fake kernel; with
    ``fd`` given the control node is not opened. ``udev`` is a `UdevSync`
    (default) or `NoUdevSync`. Thread-safe per call (see the module notes).
    """

    def __init__(
        self,
        owned_uuid_prefix: str,
        *,
        control_path: str = DM_CONTROL_PATH,
        fd: int | None = None,
        ioctl: IoctlFn | None = None,
        udev: UdevSync | NoUdevSync | None = None,
    ) -> None:
        if not owned_uuid_prefix:
            raise DmArgumentError("owned_uuid_prefix must not be empty (it would own every device)")
        self.owned_uuid_prefix = owned_uuid_prefix
        self._ioctl_fn: IoctlFn = ioctl or _fcntl_ioctl
        self._last_list: tuple[bytes, tuple[DeviceEntry, ...]] = (b"", ())
        self._own_fd = fd is None
        if fd is None:
            try:
                fd = os.open(control_path, os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                raise DmUnavailableError(control_path, exc.errno or 0) from exc
        self._fd = fd
        self.udev = udev if udev is not None else UdevSync()
        self._closed = threading.Event()

    def close(self) -> None:
        """Close the control fd (if this instance opened it)."""
        if not self._closed.is_set():
            self._closed.set()
            if self._own_fd:
                os.close(self._fd)

    def __enter__(self) -> DeviceMapper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the one ioctl ---------------------------------------------------------

    def _ioctl(
        self,
        command: DmCommand,
        name: str | None = None,
        uuid: str | None = None,
        flags: int = 0,
        payload: bytes = b"",
        event_nr: int = 0,
        target_count: int = 0,
        *,
        label: str | None = None,
    ) -> tuple[_Header, bytes]:
        """Issue one dm ioctl; return the kernel's header and its output data.

        Starts with max(16 KiB, header + payload) and doubles the buffer while
        the kernel answers DM_BUFFER_FULL_FLAG (up to 1 GiB). An OSError
        becomes DmIoctlError naming the command and the device (``label``,
        else the name or uuid the ioctl is addressed by).
        """
        device = label or (name if name is not None else uuid)
        if name is not None and len(name.encode()) >= DM_NAME_LEN:
            raise DmArgumentError(f"device name {name!r} longer than {DM_NAME_LEN - 1} bytes")
        if uuid is not None and len(uuid.encode()) >= DM_UUID_LEN:
            raise DmArgumentError(f"device uuid {uuid!r} longer than {DM_UUID_LEN - 1} bytes")
        size = max(MIN_BUFFER_SIZE, DM_IOCTL_SIZE + len(payload))
        while True:
            buf = bytearray(size)
            buf[:DM_IOCTL_SIZE] = pack_header(command, data_size=size, name=name or "",
                                              uuid=uuid or "", flags=flags, event_nr=event_nr,
                                              target_count=target_count)
            buf[DM_IOCTL_SIZE:DM_IOCTL_SIZE + len(payload)] = payload
            LOG.debug("%s %s flags=%#x event_nr=%#x buffer=%d", command, device or "-", flags,
                      event_nr, size)
            try:
                self._ioctl_fn(self._fd, command.request, buf)
            except OSError as exc:
                raise DmIoctlError(command, device, exc.errno or 0,
                                   os.strerror(exc.errno or 0)) from exc
            hdr = unpack_header(buf)
            if not hdr.flags & DM_BUFFER_FULL_FLAG:
                break
            if size >= MAX_BUFFER_SIZE:
                raise DmIoctlError(command, device, errno.ENOBUFS,
                                   f"kernel output still did not fit in {size} bytes")
            size = min(size * 2, MAX_BUFFER_SIZE)
            LOG.debug("%s %s: DM_BUFFER_FULL, retrying with %d bytes", command, device or "-",
                      size)
        data = bytes(buf[hdr.data_start:hdr.data_size]) if hdr.data_size > hdr.data_start else b""
        return hdr, data

    @staticmethod
    def _one(name: str | None, uuid: str | None) -> tuple[str | None, str | None]:
        if (name is None) == (uuid is None):
            raise DmArgumentError("give exactly one of name or uuid")
        if name == "" or uuid == "":
            raise DmArgumentError("empty device name or uuid")
        return name, uuid

    def _owned(self, command: DmCommand, name: str | None, uuid: str | None) -> tuple[str, str]:
        """Check the device is ours; return (uuid, name): address the mutating ioctl by uuid."""
        name, uuid = self._one(name, uuid)
        info = self.device_info(name, uuid=uuid)
        if not info.uuid.startswith(self.owned_uuid_prefix):
            LOG.warning("%s %s: refused, uuid %r is not ours", command, info.name, info.uuid)
            raise NotOwnedError(command, info.name, info.uuid, self.owned_uuid_prefix)
        return info.uuid, info.name

    def _with_cookie(self, command: DmCommand, owned: tuple[str, str], udev_flags: int,
                     flags: int, wait_for_udev: bool = True) -> _Header:
        # A flags-only cookie (base 0) still carries the flags to the rules; 95-dm-notify's
        # udevcomplete accepts it, and there is no semaphore to wait on.
        sync = self.udev if wait_for_udev else NoUdevSync()
        cookie = sync.begin(DM_UDEV_PRIMARY_SOURCE_FLAG | udev_flags)
        try:
            hdr, _ = self._ioctl(command, uuid=owned[0], flags=flags, event_nr=cookie.value,
                                 label=owned[1])
        except BaseException:
            sync.cancel(cookie)
            raise
        sync.complete(cookie, hdr.flags)
        return hdr

    # -- global commands -------------------------------------------------------

    def version(self) -> tuple[int, int, int]:
        """``DM_VERSION``: the kernel's dm ioctl interface version, e.g. (4, 47, 0)."""
        hdr, _ = self._ioctl(DmCommand.VERSION)
        return hdr.version

    def list_devices(self) -> list[DeviceEntry]:
        """``DM_LIST_DEVICES`` with DM_UUID_FLAG: every dm device's name, uuid, dev, event_nr."""
        _, data = self._ioctl(DmCommand.LIST_DEVICES, flags=DM_UUID_FLAG)
        # The same bytes as last time parse to the same list: the idle daemon lists every
        # poll round, and parsing 400 devices costs 2 ms natively, ~100x that under TCG.
        # (One tuple, assigned at once: callers in several threads.)
        last = self._last_list
        if data != last[0]:
            last = self._last_list = (data, tuple(parse_name_list(data)))
        if all(e.uuid_listed for e in last[1]):
            return list(last[1])
        # An older kernel (5.10) lists no uuids: ask each device, every time (a device
        # removed and made again under the same name and minor would list the same bytes).
        return [e for e in map(self._with_uuid, last[1]) if e is not None]

    def _with_uuid(self, entry: DeviceEntry) -> DeviceEntry | None:
        """`entry` with its uuid from DM_DEV_STATUS; None if it went away since the list."""
        if entry.uuid_listed:
            return entry
        try:
            info = self.device_info(entry.name)
        except DmIoctlError as exc:
            if exc.errno == errno.ENXIO:
                return None
            raise
        if (info.major, info.minor) != (entry.major, entry.minor):
            return None  # the name now belongs to another device: the next list shows it
        return replace(entry, uuid=info.uuid, uuid_listed=True)

    def list_versions(self) -> dict[str, tuple[int, int, int]]:
        """``DM_LIST_VERSIONS``: loaded target types and their versions (is ``switch`` there?)."""
        _, data = self._ioctl(DmCommand.LIST_VERSIONS)
        return parse_target_versions(data)

    # -- reads (any device) ----------------------------------------------------

    def device_info(self, name: str | None = None, *, uuid: str | None = None,
                    inactive: bool = False) -> DeviceInfo:
        """``DM_DEV_STATUS``: a device's state (read_only/target_count of the inactive table if asked)."""
        name, uuid = self._one(name, uuid)
        hdr, _ = self._ioctl(DmCommand.DEV_STATUS, name, uuid,
                             flags=DM_QUERY_INACTIVE_TABLE_FLAG if inactive else 0)
        return _info(hdr)

    def table_status(self, name: str | None = None, *, uuid: str | None = None,
                     table: bool = False, inactive: bool = False) -> list[Target]:
        """``DM_TABLE_STATUS``: per target, the status line (``dmsetup status``) or,
        with ``table=True``, the table line (``dmsetup table``; devices as major:minor).

        ``inactive=True`` reads the inactive slot ([] if it is empty).
        """
        name, uuid = self._one(name, uuid)
        flags = (DM_STATUS_TABLE_FLAG if table else 0) | (
            DM_QUERY_INACTIVE_TABLE_FLAG if inactive else 0)
        hdr, data = self._ioctl(DmCommand.TABLE_STATUS, name, uuid, flags=flags)
        if inactive and not hdr.flags & DM_INACTIVE_PRESENT_FLAG:
            return []
        return parse_target_specs(data, hdr.target_count)

    def table_deps(self, name: str | None = None, *, uuid: str | None = None,
                   inactive: bool = False) -> list[tuple[int, int]]:
        """``DM_TABLE_DEPS``: (major, minor) of every device the table opens."""
        name, uuid = self._one(name, uuid)
        _, data = self._ioctl(DmCommand.TABLE_DEPS, name, uuid,
                              flags=DM_QUERY_INACTIVE_TABLE_FLAG if inactive else 0)
        return parse_deps(data)

    # -- mutations (owned devices only) ----------------------------------------

    def device_create(self, name: str, uuid: str, *, read_only: bool = False) -> DeviceInfo:
        """``DM_DEV_CREATE``: a new device with no table (I/O fails until a resume); ``uuid`` must be ours.

        No udev cookie: the kernel's dev_create sends no uevent with one (the
        disk's "add" uevent has no DM_COOKIE, and the dm rules only create
        ``/dev/mapper/<name>`` on the first resume), so udev flags belong on
        `device_resume`.
        """
        if not name or "/" in name or name in (".", "..", "control"):
            raise DmArgumentError(f"device name {name!r} not allowed (dm-ioctl.c check_name)")
        if not uuid.startswith(self.owned_uuid_prefix):
            raise NotOwnedError(DmCommand.DEV_CREATE, name, uuid, self.owned_uuid_prefix)
        hdr, _ = self._ioctl(DmCommand.DEV_CREATE, name, uuid,
                             flags=DM_READONLY_FLAG if read_only else 0)
        return _info(hdr)

    def table_load(self, name: str | None, targets: Sequence[Target | tuple[int, int, str, str]],
                   *, uuid: str | None = None, read_only: bool = False) -> DeviceInfo:
        """``DM_TABLE_LOAD``: put ``targets`` into the inactive slot (live after `device_resume`).

        Each load runs the targets' constructors: for dm-switch that means a
        fresh round-robin region table, whatever was loaded before.
        """
        payload, count = pack_targets(targets)
        if not count:
            raise DmArgumentError("table_load needs at least one target")
        owned = self._owned(DmCommand.TABLE_LOAD, name, uuid)
        hdr, _ = self._ioctl(DmCommand.TABLE_LOAD, uuid=owned[0], payload=payload,
                             target_count=count, flags=DM_READONLY_FLAG if read_only else 0,
                             label=owned[1])
        return _info(hdr)

    def table_clear(self, name: str | None = None, *, uuid: str | None = None) -> DeviceInfo:
        """``DM_TABLE_CLEAR``: drop the inactive table, if any."""
        owned = self._owned(DmCommand.TABLE_CLEAR, name, uuid)
        hdr, _ = self._ioctl(DmCommand.TABLE_CLEAR, uuid=owned[0], label=owned[1])
        return _info(hdr)

    def device_suspend(self, name: str | None = None, *, uuid: str | None = None,
                       noflush: bool = False, skip_lockfs: bool = False) -> DeviceInfo:
        """``DM_DEV_SUSPEND`` with DM_SUSPEND_FLAG: waits for in-flight I/O unless ``noflush``.

        Sends no uevent, hence no cookie.
        """
        owned = self._owned(DmCommand.DEV_SUSPEND, name, uuid)
        flags = DM_SUSPEND_FLAG | (DM_NOFLUSH_FLAG if noflush else 0) | (
            DM_SKIP_LOCKFS_FLAG if skip_lockfs else 0)
        hdr, _ = self._ioctl(DmCommand.DEV_SUSPEND, uuid=owned[0], flags=flags, label=owned[1])
        return _info(hdr)

    def device_resume(self, name: str | None = None, *, uuid: str | None = None,
                      udev_flags: int = 0, noflush: bool = False,
                      skip_lockfs: bool = False, wait_for_udev: bool = True) -> DeviceInfo:
        """``DM_DEV_SUSPEND`` without DM_SUSPEND_FLAG: swap in the inactive table and resume.

        Sends a udev cookie with DM_UDEV_PRIMARY_SOURCE_FLAG plus ``udev_flags``
        (e.g. DM_UDEV_DISABLE_DISK_RULES_FLAG | DM_UDEV_DISABLE_OTHER_RULES_FLAG
        for hidden legs) and returns after udev has handled the change event.
        With an inactive table the device is suspended first (``noflush`` and
        ``skip_lockfs`` apply). A dm-switch region table starts over here.
        ``wait_for_udev=False`` returns at once (for devices nobody opens by path).
        """
        owned = self._owned(DmCommand.DEV_SUSPEND, name, uuid)
        flags = (DM_NOFLUSH_FLAG if noflush else 0) | (DM_SKIP_LOCKFS_FLAG if skip_lockfs else 0)
        return _info(self._with_cookie(DmCommand.DEV_SUSPEND, owned, udev_flags, flags, wait_for_udev))

    def device_remove(self, name: str | None = None, *, uuid: str | None = None,
                      udev_flags: int = 0, deferred: bool = False, wait_for_udev: bool = True) -> bool:
        """``DM_DEV_REMOVE``: remove the device; True if it is gone, False if removal was deferred.

        An open device fails with EBUSY, unless ``deferred``: then the kernel
        removes it on last close and leaves DM_DEFERRED_REMOVE set. Waits for
        udev to process the remove event (``/dev/mapper/<name>`` gone), unless
        ``wait_for_udev=False`` (devices nobody opens by path).
        """
        owned = self._owned(DmCommand.DEV_REMOVE, name, uuid)
        hdr = self._with_cookie(DmCommand.DEV_REMOVE, owned, udev_flags,
                                DM_DEFERRED_REMOVE if deferred else 0, wait_for_udev)
        return not hdr.flags & DM_DEFERRED_REMOVE

    def target_message(self, name: str | None, sector: int, message: str, *,
                       uuid: str | None = None) -> str | None:
        """``DM_TARGET_MSG``: send ``message`` to the live table's target at ``sector``.

        Returns the target's reply when the kernel set DM_DATA_OUT_FLAG, else
        None. Note for dm-switch ``set_region_mappings``: the kernel applies a
        message token by token, so a rejected message (EINVAL) is partly
        applied, and a message with too many tokens fails with ENOMEM (the
        argv array is kmalloc'd): send chunks of at most ~64k tokens. A reply
        that overflows is retried with a bigger buffer, which re-sends the
        message (as libdm does).
        """
        body = message.encode()
        if not body.strip() or b"\0" in body:
            raise DmArgumentError(f"target message must be non-empty text without NUL: {message!r}")
        owned = self._owned(DmCommand.TARGET_MSG, name, uuid)
        payload = _DM_TARGET_MSG.pack(sector) + body + b"\0"
        hdr, data = self._ioctl(DmCommand.TARGET_MSG, uuid=owned[0], payload=payload,
                                label=owned[1])
        if hdr.flags & DM_DATA_OUT_FLAG:
            return _cstr(data)
        return None
