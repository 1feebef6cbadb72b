"""The device-mapper ioctl ABI, pure and host-testable: no file is opened here.

Constants, command numbers and flags of ``include/uapi/linux/dm-ioctl.h``
(interface 4.x); ``struct dm_ioctl`` packed and unpacked; target specs as
``DM_TABLE_LOAD`` takes them and ``DM_TABLE_STATUS`` returns them; the lists
``DM_LIST_DEVICES``, ``DM_LIST_VERSIONS`` and ``DM_TABLE_DEPS`` return. The
model is devicemapper-rs's ``dm_ioctl.rs``; agent.kernel.dm issues the calls.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from agent.kernel.dm_errors import DmArgumentError
from protocol.dmtable import Target

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
DM_TARGET_MSG = struct.Struct("=Q")


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
    not empty; DeviceMapper.list_devices() asks each such device."""


class Header(NamedTuple):
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


def cstr(buf: bytes | bytearray | memoryview, start: int = 0, end: int | None = None) -> str:
    raw = bytes(buf[start:end])
    nul = raw.find(b"\0")
    return (raw if nul < 0 else raw[:nul]).decode("utf-8", "replace")


def _align8(n: int) -> int:
    return (n + 7) & ~7


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


def unpack_header(buf: bytes | bytearray) -> Header:
    """Read back the ``struct dm_ioctl`` the kernel left at the start of ``buf``."""
    v0, v1, v2, size, start, count, opens, flags, event_nr, _pad, dev, name, uuid, _d = (
        _DM_IOCTL.unpack_from(buf)
    )
    return Header((v0, v1, v2), size, start, count, opens, flags, event_nr, dev,
                   cstr(name), cstr(uuid))


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
        out.append(Target(start, length, cstr(ttype), cstr(data, off + _DM_TARGET_SPEC.size)))
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
                uuid = cstr(data, _align8(tail + 8), end)
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
        out[cstr(data, off + _DM_TARGET_VERSIONS.size)] = (v0, v1, v2)
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


def header_info(h: Header) -> DeviceInfo:
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
