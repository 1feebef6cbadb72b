"""agent.kernel.dm against a fake kernel: the ABI layout, buffer growth, parsing, errors, ownership.

The fake (`FakeDmKernel`) stands where ``fcntl.ioctl`` on /dev/mapper/control
would: it reads ``struct dm_ioctl`` at the raw offsets of the reference doc
(not through the module's own structs), and answers the way
``drivers/md/dm-ioctl.c`` does -- BUFFER_FULL when output does not fit,
TABLE_LOAD ``next`` relative to the current spec, TABLE_STATUS ``next``
relative to the first, errno via OSError. The udev cookie tests at the end
use real SysV semaphores (this host has them), with the udevd control
socket path pointed at a temporary file.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import struct
import threading
import time
from dataclasses import dataclass, field

import pytest

from agent.kernel import dm, dm_abi, dm_errors, dm_udev_sync
from protocol.dmtable import DmUdevFlags, Target
from protocol.errors import SwitchAgentError

PREFIX = "SWAGENT-"

# Raw offsets of struct dm_ioctl (reference doc section 2, dm-ioctl.h).
OFF_VERSION, OFF_DATA_SIZE, OFF_DATA_START, OFF_TARGET_COUNT = 0, 12, 16, 20
OFF_OPEN_COUNT, OFF_FLAGS, OFF_EVENT_NR, OFF_DEV, OFF_NAME, OFF_UUID = 24, 28, 32, 40, 48, 176
HDR = 312


def u32(buf, off):
    return struct.unpack_from("=I", buf, off)[0]


def cstr(buf, off, end=None):
    raw = bytes(buf[off:end])
    return raw[: raw.index(b"\0")].decode()


def align8(n):
    return (n + 7) & ~7


def encode_dev(major, minor):
    """include/linux/kdev_t.h new_encode_dev."""
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


@dataclass
class FakeDev:
    name: str
    uuid: str
    minor: int
    live: list | None = None
    inactive: list | None = None
    suspended: bool = True
    open_count: int = 0
    event_nr: int = 0
    reply: str | None = None  # what a message to this device answers


@dataclass
class Call:
    nr: int
    version: tuple
    size: int
    flags: int
    event_nr: int
    name: str
    uuid: str
    target_count: int
    payload: bytes


@dataclass
class FakeDmKernel:
    """What drivers/md/dm-ioctl.c does, for the commands dm.py issues."""

    devices: dict[str, FakeDev] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    targets: dict[str, tuple[int, int, int]] = field(
        default_factory=lambda: {"linear": (1, 4, 0), "zero": (1, 2, 0), "switch": (1, 1, 0)})
    messages: list[tuple[str, int, str]] = field(default_factory=list)
    fail: dict[int, int] = field(default_factory=dict)  # command nr -> errno
    next_minor: int = 0
    lists_uuids: bool = True  # False: Linux 5.10 (dm ioctl 4.43), whose LIST_DEVICES ignores DM_UUID_FLAG

    def add(self, name, uuid, **kw) -> FakeDev:
        d = FakeDev(name, uuid, self.next_minor, **kw)
        self.next_minor += 1
        self.devices[name] = d
        return d

    def mutating(self):
        return [c for c in self.calls if c.nr not in (0x00, 0x02, 0x07, 0x0B, 0x0C, 0x0D)]

    # -- the ioctl -----------------------------------------------------------
    def __call__(self, fd, request, buf):
        assert isinstance(buf, bytearray)
        assert request >> 30 == 3 and (request >> 16) & 0x3FFF == HDR and (request >> 8) & 0xFF == 0xFD
        nr = request & 0xFF
        version = struct.unpack_from("=3I", buf, OFF_VERSION)
        size = u32(buf, OFF_DATA_SIZE)
        assert size == len(buf), "data_size must be the whole buffer"
        assert u32(buf, OFF_DATA_START) == HDR
        name, uuid = cstr(buf, OFF_NAME, OFF_UUID), cstr(buf, OFF_UUID, 305)
        flags = u32(buf, OFF_FLAGS)
        call = Call(nr, version, size, flags, u32(buf, OFF_EVENT_NR), name, uuid,
                    u32(buf, OFF_TARGET_COUNT), bytes(buf[HDR:]))
        self.calls.append(call)
        struct.pack_into("=3I", buf, 0, 4, 47, 0)
        if version[0] != 4 or version[1] > 47:
            raise OSError(errno.EINVAL, "version")
        if nr in self.fail:
            raise OSError(self.fail[nr], os.strerror(self.fail[nr]))
        flags &= ~(dm_abi.DM_BUFFER_FULL_FLAG | dm_abi.DM_UEVENT_GENERATED_FLAG | dm_abi.DM_DATA_OUT_FLAG)
        self.out_flags = flags
        self.data_size = 305
        if nr not in (0x00, 0x02, 0x0D, 0x03) and name and uuid:
            raise OSError(errno.EINVAL, "only one of name or uuid")
        handler = getattr(self, f"cmd_{nr:02x}")
        dev = handler(call, buf)
        if dev is not None:
            self.status(dev, buf)
        struct.pack_into("=I", buf, OFF_FLAGS, self.out_flags)
        struct.pack_into("=I", buf, OFF_DATA_SIZE, self.data_size)
        struct.pack_into("=I", buf, OFF_DATA_START, HDR)
        return 0

    def find(self, call) -> FakeDev:
        for d in self.devices.values():
            if (call.uuid and d.uuid == call.uuid) or (not call.uuid and d.name == call.name):
                return d
        raise OSError(errno.ENXIO, "no such device")

    def status(self, d: FakeDev, buf):
        f = self.out_flags & ~(dm_abi.DM_SUSPEND_FLAG | dm_abi.DM_ACTIVE_PRESENT_FLAG
                               | dm_abi.DM_INACTIVE_PRESENT_FLAG | dm_abi.DM_READONLY_FLAG)
        f |= (dm_abi.DM_SUSPEND_FLAG if d.suspended else 0) | (dm_abi.DM_ACTIVE_PRESENT_FLAG if d.live else 0)
        f |= dm_abi.DM_INACTIVE_PRESENT_FLAG if d.inactive else 0
        self.out_flags = f
        struct.pack_into("=iI", buf, OFF_OPEN_COUNT, d.open_count, f)
        struct.pack_into("=I", buf, OFF_EVENT_NR, d.event_nr)
        struct.pack_into("=I", buf, OFF_TARGET_COUNT, len(d.live or []))
        struct.pack_into("=Q", buf, OFF_DEV, encode_dev(253, d.minor))
        struct.pack_into("=128s129s", buf, OFF_NAME, d.name.encode(), d.uuid.encode())

    def room(self, buf):
        return len(buf) - HDR

    # -- commands ------------------------------------------------------------
    def cmd_00(self, call, buf):  # VERSION
        return None

    def cmd_02(self, call, buf):  # LIST_DEVICES, as list_devices()
        recs = []
        for d in sorted(self.devices.values(), key=lambda d: d.name):
            rec = bytearray(align8(12 + len(d.name) + 1) + 8)
            struct.pack_into("=QI", rec, 0, encode_dev(253, d.minor), 0)
            rec[12:12 + len(d.name)] = d.name.encode()
            tail = align8(12 + len(d.name) + 1)
            lflags = 0
            if call.flags & dm_abi.DM_UUID_FLAG and self.lists_uuids:
                lflags = dm_abi.DM_NAME_LIST_FLAG_HAS_UUID if d.uuid else dm_abi.DM_NAME_LIST_FLAG_DOESNT_HAVE_UUID
                if d.uuid:
                    rec += d.uuid.encode() + b"\0" * (align8(len(d.uuid) + 1) - len(d.uuid))
            struct.pack_into("=II", rec, tail, d.event_nr, lflags)
            recs.append(rec)
        needed = sum(map(len, recs))
        if self.room(buf) < max(needed, 8):
            self.out_flags |= dm_abi.DM_BUFFER_FULL_FLAG
            return None
        off = HDR
        struct.pack_into("=Q", buf, HDR, 0)
        for i, rec in enumerate(recs):
            if i + 1 < len(recs):
                struct.pack_into("=I", rec, 8, len(rec))
            buf[off:off + len(rec)] = rec
            off += len(rec)
        self.data_size = HDR + needed
        return None

    def cmd_03(self, call, buf):  # DEV_CREATE
        if call.name in self.devices or any(d.uuid == call.uuid for d in self.devices.values()):
            raise OSError(errno.EBUSY, "exists")
        return self.add(call.name, call.uuid)

    def cmd_04(self, call, buf):  # DEV_REMOVE
        d = self.find(call)
        if d.open_count:
            if call.flags & dm_abi.DM_DEFERRED_REMOVE:
                return None  # removed on last close; the flag stays set
            raise OSError(errno.EBUSY, "open")
        del self.devices[d.name]
        self.out_flags &= ~dm_abi.DM_DEFERRED_REMOVE
        self.out_flags |= dm_abi.DM_UEVENT_GENERATED_FLAG
        return None

    def cmd_06(self, call, buf):  # DEV_SUSPEND
        d = self.find(call)
        if call.flags & dm_abi.DM_SUSPEND_FLAG:
            d.suspended = True
        else:
            if d.inactive:
                d.live, d.inactive = d.inactive, None
            if d.suspended:
                d.suspended = False
                self.out_flags |= dm_abi.DM_UEVENT_GENERATED_FLAG
        return d

    def cmd_07(self, call, buf):  # DEV_STATUS
        return self.find(call)

    def cmd_09(self, call, buf):  # TABLE_LOAD, as populate_table()/next_target()
        d = self.find(call)
        if not call.target_count:
            raise OSError(errno.EINVAL, "no targets")
        end = len(buf)
        spec, nxt, table = 0, HDR, []
        for _ in range(call.target_count):
            if end - spec - 40 <= nxt or nxt % 8:
                raise OSError(errno.EINVAL, "bad next")
            spec += nxt
            start, length, _st, nxt, ttype = struct.unpack_from("=QQiI16s", buf, spec)
            params_end = buf.index(b"\0", spec + 40)
            ttype = ttype.rstrip(b"\0").decode()
            if ttype not in self.targets:
                raise OSError(errno.EINVAL, "unknown target type")
            table.append((start, length, ttype, buf[spec + 40:params_end].decode()))
        d.inactive = table
        return d

    def cmd_0a(self, call, buf):  # TABLE_CLEAR
        d = self.find(call)
        d.inactive = None
        return d

    def _table(self, call, d):
        return d.inactive if call.flags & dm_abi.DM_QUERY_INACTIVE_TABLE_FLAG else d.live

    def cmd_0b(self, call, buf):  # TABLE_DEPS
        d = self.find(call)
        self.status(d, buf)
        devs = sorted({(int(a), int(b)) for t in self._table(call, d) or []
                       for a, b in re.findall(r"(\d+):(\d+)", t[3])})
        need = 8 + 8 * len(devs)
        if self.room(buf) < need:
            self.out_flags |= dm_abi.DM_BUFFER_FULL_FLAG
        else:
            struct.pack_into(f"=II{len(devs)}Q", buf, HDR, len(devs), 0,
                             *[encode_dev(*x) for x in devs])
            self.data_size = HDR + need
        return None

    def cmd_0c(self, call, buf):  # TABLE_STATUS, as retrieve_status()
        d = self.find(call)
        self.status(d, buf)
        table = self._table(call, d)
        if table is None:
            return None
        out = HDR
        used = 0
        for start, length, ttype, params in table:
            text = params if call.flags & dm_abi.DM_STATUS_TABLE_FLAG else f"{ttype}-status"
            if len(buf) - out <= 40 + len(text) + 1:
                self.out_flags |= dm_abi.DM_BUFFER_FULL_FLAG
                break
            spec = out
            out += 40
            buf[out:out + len(text) + 1] = text.encode() + b"\0"
            out += len(text) + 1
            used = out
            out = align8(out)
            struct.pack_into("=QQiI16s", buf, spec, start, length, 0, out - HDR, ttype.encode())
        if used:
            self.data_size = used
        struct.pack_into("=I", buf, OFF_TARGET_COUNT, len(table))
        return None

    def cmd_0d(self, call, buf):  # LIST_VERSIONS
        recs = []
        for tname, v in self.targets.items():
            rec = bytearray(align8(16 + len(tname) + 1))
            struct.pack_into("=I3I", rec, 0, 0, *v)
            rec[16:16 + len(tname)] = tname.encode()
            recs.append(rec)
        off = HDR
        for i, rec in enumerate(recs):
            if i + 1 < len(recs):
                struct.pack_into("=I", rec, 0, len(rec))
            buf[off:off + len(rec)] = rec
            off += len(rec)
        self.data_size = off
        return None

    def cmd_0e(self, call, buf):  # TARGET_MSG
        d = self.find(call)
        (sector,) = struct.unpack_from("=Q", buf, HDR)
        msg = cstr(buf, HDR + 8)
        if not d.live:
            raise OSError(errno.EINVAL, "no live table")
        self.messages.append((d.name, sector, msg))
        self.status(d, buf)
        if d.reply is not None:
            self.out_flags |= dm_abi.DM_DATA_OUT_FLAG
            if len(d.reply) + 1 > self.room(buf):
                self.out_flags |= dm_abi.DM_BUFFER_FULL_FLAG
            else:
                buf[HDR:HDR + len(d.reply) + 1] = d.reply.encode() + b"\0"
                self.data_size = HDR + len(d.reply) + 1
        return None


@dataclass
class RecordingUdev:
    log: list = field(default_factory=list)

    def begin(self, udev_flags):
        self.log.append(("begin", udev_flags))
        return dm_udev_sync.UdevCookie((udev_flags << 16) | 0x1234, semid=99)

    def complete(self, cookie, ioctl_flags):
        self.log.append(("complete", cookie.value, ioctl_flags))
        return True

    def cancel(self, cookie):
        self.log.append(("cancel", cookie.value))


@pytest.fixture
def kernel():
    return FakeDmKernel()


@pytest.fixture
def udev():
    return RecordingUdev()


@pytest.fixture
def dmc(kernel, udev):
    return dm.DeviceMapper(PREFIX, fd=-1, ioctl=kernel, udev=udev)


# --- layout -----------------------------------------------------------------


def test_dm_ioctl_struct_offsets():
    raw = dm_abi.pack_header(dm_abi.DmCommand.TARGET_MSG, data_size=0x11223344, name="sw0",
                         uuid="SWAGENT-x", flags=0x55, event_nr=0x66, target_count=7)
    assert len(raw) == 312 == dm_abi.DM_IOCTL_SIZE
    assert struct.unpack_from("=3I", raw, OFF_VERSION) == (4, 2, 0)
    assert u32(raw, OFF_DATA_SIZE) == 0x11223344
    assert u32(raw, OFF_DATA_START) == 312
    assert u32(raw, OFF_TARGET_COUNT) == 7
    assert u32(raw, OFF_FLAGS) == 0x55
    assert u32(raw, OFF_EVENT_NR) == 0x66
    assert struct.unpack_from("=Q", raw, OFF_DEV)[0] == 0
    assert raw[OFF_NAME:OFF_NAME + 4] == b"sw0\0"
    assert raw[OFF_UUID:OFF_UUID + 10] == b"SWAGENT-x\0"
    h = dm_abi.unpack_header(raw)
    assert (h.name, h.uuid, h.flags, h.event_nr, h.target_count) == ("sw0", "SWAGENT-x", 0x55, 0x66, 7)


def test_ioctl_numbers_match_dm_ioctl_h():
    for cmd in dm_abi.DmCommand:
        assert cmd.request == 0xC138FD00 + int(cmd)
    assert dm_abi.DmCommand.TABLE_LOAD.request == 0xC138FD09
    assert str(dm_abi.DmCommand.TABLE_LOAD) == "DM_TABLE_LOAD"


def test_flag_values_match_dm_ioctl_h():
    assert (dm_abi.DM_READONLY_FLAG, dm_abi.DM_SUSPEND_FLAG, dm_abi.DM_STATUS_TABLE_FLAG) == (1, 2, 16)
    assert (dm_abi.DM_BUFFER_FULL_FLAG, dm_abi.DM_UEVENT_GENERATED_FLAG, dm_abi.DM_UUID_FLAG) == (256, 8192, 16384)
    assert dm_abi.DM_DATA_OUT_FLAG == 1 << 16 and dm_abi.DM_QUERY_INACTIVE_TABLE_FLAG == 1 << 12
    assert DmUdevFlags.PRIMARY_SOURCE == 0x40 and DmUdevFlags.DISABLE_OTHER_RULES == 0x8


def test_interface_version_per_command(dmc, kernel):
    kernel.add("sw0", PREFIX + "a", live=[(0, 8, "zero", "")], suspended=False)
    dmc.version()
    dmc.list_versions()
    dmc.target_message("sw0", 0, "hello")
    versions = {c.nr: c.version for c in kernel.calls}
    assert versions[0x00] == (4, 0, 0)
    assert versions[0x07] == (4, 0, 0)
    assert versions[0x0D] == (4, 1, 0)
    assert versions[0x0E] == (4, 2, 0)
    assert dmc.version() == (4, 47, 0)


# --- table specs ------------------------------------------------------------


@pytest.mark.parametrize("plen", range(0, 10))
def test_spec_packing_is_8_aligned_with_relative_next(plen):
    params = "x" * plen
    payload, count = dm_abi.pack_targets([(0, 8, "linear", params), (8, 16, "zero", "")])
    assert count == 2
    first = align8(40 + plen + 1)
    start, length, status, nxt, ttype = struct.unpack_from("=QQiI16s", payload, 0)
    assert (start, length, status, nxt, ttype.rstrip(b"\0")) == (0, 8, 0, first, b"linear")
    assert payload[40:40 + plen + 1] == params.encode() + b"\0"
    assert nxt % 8 == 0
    start2, length2, _, nxt2, ttype2 = struct.unpack_from("=QQiI16s", payload, first)
    assert (start2, length2, ttype2.rstrip(b"\0")) == (8, 16, b"zero")
    assert len(payload) == first + nxt2 == first + 48


def test_table_load_round_trips_through_kernel_parser(dmc, kernel):
    kernel.add("sw0", PREFIX + "a")
    table = [Target(0, 100, "linear", "7:0 0"), Target(100, 28, "zero", ""),
             Target(128, 2048, "switch", "2 1024 0 7:0 0 7:1 0")]
    info = dmc.table_load("sw0", table)
    assert info.inactive_present and not info.active_present
    assert kernel.devices["sw0"].inactive == [tuple(t) for t in table]
    assert dmc.table_status("sw0", table=True, inactive=True) == table
    assert dmc.table_status("sw0", table=True) == []
    dmc.device_resume("sw0")
    assert dmc.table_status("sw0", table=True) == table
    assert dmc.table_status("sw0") == [Target(0, 100, "linear", "linear-status"),
                                       Target(100, 28, "zero", "zero-status"),
                                       Target(128, 2048, "switch", "switch-status")]
    assert dmc.table_deps("sw0") == [(7, 0), (7, 1)]


def test_big_table_gets_a_buffer_big_enough(dmc, kernel):
    kernel.add("sw0", PREFIX + "a")
    paths = " ".join(f"253:{i} 0" for i in range(3000))
    dmc.table_load("sw0", [(0, 1 << 20, "switch", f"3000 512 0 {paths}")])
    load = [c for c in kernel.calls if c.nr == 0x09][0]
    assert load.size == 312 + align8(40 + len(paths) + 13)  # header + payload, above 16 KiB
    assert load.target_count == 1


def test_table_status_next_counts_from_first_spec():
    data = bytearray(200)
    # three specs; next = offset of the following spec from the start of the data
    struct.pack_into("=QQiI16s", data, 0, 0, 10, 0, 48, b"zero")
    data[40] = 0
    struct.pack_into("=QQiI16s", data, 48, 10, 10, 0, 104, b"linear")
    data[88:96] = b"7:0 10\0\0"
    struct.pack_into("=QQiI16s", data, 104, 20, 5, 0, 152, b"error")
    assert dm_abi.parse_target_specs(data, 3) == [
        Target(0, 10, "zero", ""), Target(10, 10, "linear", "7:0 10"),
        Target(20, 5, "error", "")]


def test_bad_targets_are_refused_before_any_ioctl(dmc, kernel):
    kernel.add("sw0", PREFIX + "a")
    for bad in ([(0, 8, "x" * 16, "")], [(0, 8, "zero", "a\0b")], [(0, 0, "zero", "")], []):
        with pytest.raises(dm_errors.DmArgumentError):
            dmc.table_load("sw0", bad)
    assert not kernel.calls


# --- list parsing and buffer growth ----------------------------------------


def test_parse_name_list_hand_built():
    # record 1: "a" with uuid "U-1"; record 2: "bcdefghi" without uuid
    r1 = bytearray(40)
    struct.pack_into("=QI", r1, 0, encode_dev(253, 3), 40)
    r1[12:14] = b"a\0"
    struct.pack_into("=II", r1, 16, 9, dm_abi.DM_NAME_LIST_FLAG_HAS_UUID)
    r1[24:28] = b"U-1\0"
    r2 = bytearray(32)
    struct.pack_into("=QI", r2, 0, encode_dev(253, 300), 0)
    r2[12:21] = b"bcdefghi\0"
    struct.pack_into("=II", r2, 24, 2, dm_abi.DM_NAME_LIST_FLAG_DOESNT_HAVE_UUID)
    assert dm_abi.parse_name_list(bytes(r1 + r2)) == [
        dm_abi.DeviceEntry("a", "U-1", 253, 3, 9), dm_abi.DeviceEntry("bcdefghi", "", 253, 300, 2)]
    assert all(e.uuid_listed for e in dm_abi.parse_name_list(bytes(r1 + r2)))
    # Linux 5.10: the word after event_nr is padding, neither flag set: the uuid is unknown.
    struct.pack_into("=I", r2, 28, 0)
    assert not dm_abi.parse_name_list(bytes(r2))[0].uuid_listed
    assert dm_abi.parse_name_list(b"") == []
    assert dm_abi.parse_name_list(bytes(16)) == []  # dev == 0: "flags no data"
    # A kernel before 4.14: the name, padded to 8, and nothing after it.
    old = bytearray(16)
    struct.pack_into("=QI", old, 0, encode_dev(253, 4), 0)
    old[12:14] = b"z\0"
    assert dm_abi.parse_name_list(bytes(old)) == [dm_abi.DeviceEntry("z", "", 253, 4, None)]
    assert not dm_abi.parse_name_list(bytes(old))[0].uuid_listed


def test_a_kernel_whose_list_has_no_uuids_gets_each_uuid_asked(dmc, kernel):
    """Linux 5.10 ignores DM_UUID_FLAG in LIST_DEVICES: the agent found no multipath map there."""
    kernel.lists_uuids = False
    kernel.add("mpatha", "mpath-3600a", event_nr=2)
    kernel.add("other", "")
    devices = dmc.list_devices()
    assert [(d.name, d.uuid, d.event_nr) for d in devices] == [("mpatha", "mpath-3600a", 2), ("other", "", 0)]
    assert all(d.uuid_listed for d in devices)
    assert [c.nr for c in kernel.calls] == [0x02, 0x07, 0x07]
    assert [c.name for c in kernel.calls[1:]] == ["mpatha", "other"]
    # Asked again every time, not from the cached parse: a device may be made anew with the same bytes.
    kernel.calls.clear()
    kernel.devices["other"].uuid = "CRYPT-x"
    assert [d.uuid for d in dmc.list_devices()] == ["mpath-3600a", "CRYPT-x"]
    assert [c.nr for c in kernel.calls] == [0x02, 0x07, 0x07]


def test_a_device_gone_between_the_list_and_its_uuid_is_left_out(dmc, kernel):
    kernel.lists_uuids = False
    kernel.add("gone", "mpath-1")
    kernel.fail[0x07] = errno.ENXIO
    assert dmc.list_devices() == []
    kernel.fail[0x07] = errno.EPERM
    with pytest.raises(dm.DmIoctlError):
        dmc.list_devices()


def test_a_kernel_that_lists_uuids_is_not_asked_per_device(dmc, kernel):
    kernel.add("mpatha", "mpath-3600a")
    kernel.add("other", "")
    assert [(d.name, d.uuid) for d in dmc.list_devices()] == [("mpatha", "mpath-3600a"), ("other", "")]
    assert [c.nr for c in kernel.calls] == [0x02]


def test_list_devices_doubles_the_buffer_on_buffer_full(dmc, kernel):
    for i in range(400):
        kernel.add(f"dev{i:03d}-" + "n" * 90, f"{PREFIX}{i:03d}-" + "u" * 90 if i % 2 else "")
    devices = dmc.list_devices()
    sizes = [c.size for c in kernel.calls]
    assert sizes == [16384, 32768, 65536, 131072]
    assert all(c.flags & dm_abi.DM_UUID_FLAG for c in kernel.calls)
    assert len(devices) == 400
    assert devices[1] == dm_abi.DeviceEntry("dev001-" + "n" * 90, PREFIX + "001-" + "u" * 90, 253, 1, 0)
    assert devices[0].uuid == ""
    assert devices[399].minor == 399


def test_an_unchanged_list_is_not_parsed_again_and_a_change_is_seen(dmc, kernel, monkeypatch):
    kernel.add("a", PREFIX + "a")
    kernel.add("b", "")
    parses = []
    parse = dm_abi.parse_name_list
    monkeypatch.setattr(dm, "parse_name_list", lambda data: parses.append(1) or parse(data))
    first = dmc.list_devices()
    assert dmc.list_devices() == first and len(parses) == 1
    kernel.devices["b"].event_nr = 3  # a path failed in b: its event number moved
    assert [d.event_nr for d in dmc.list_devices()] == [0, 3] and len(parses) == 2
    kernel.add("c", "")
    assert [d.name for d in dmc.list_devices()] == ["a", "b", "c"] and len(parses) == 3


def test_list_devices_empty(dmc):
    assert dmc.list_devices() == []


def test_list_versions_and_deps_hand_built(dmc):
    assert dmc.list_versions() == {"linear": (1, 4, 0), "zero": (1, 2, 0), "switch": (1, 1, 0)}
    data = struct.pack("=II3Q", 3, 0, encode_dev(8, 0), encode_dev(253, 257), encode_dev(7, 1))
    assert dm_abi.parse_deps(data) == [(8, 0), (253, 257), (7, 1)]


def test_device_info_fields(dmc, kernel):
    kernel.add("sw0", PREFIX + "a", live=[(0, 8, "zero", "")], suspended=False, open_count=2,
               event_nr=5)
    kernel.next_minor = 4096
    info = dmc.device_info("sw0")
    assert info == dm_abi.DeviceInfo(name="sw0", uuid=PREFIX + "a", major=253, minor=0, open_count=2,
                                 target_count=1, event_nr=5, suspended=False, read_only=False,
                                 active_present=True, inactive_present=False,
                                 deferred_remove=False, flags=dm_abi.DM_ACTIVE_PRESENT_FLAG)
    assert dmc.device_info(uuid=PREFIX + "a").name == "sw0"
    looked_up = kernel.calls[-1]
    assert (looked_up.name, looked_up.uuid) == ("", PREFIX + "a")
    assert dm_abi.decode_dev(encode_dev(253, 0x12345)) == (253, 0x12345)


# --- errors -----------------------------------------------------------------


def test_errno_becomes_dm_ioctl_error_with_context(dmc, kernel):
    with pytest.raises(dm_errors.DmIoctlError) as ei:
        dmc.device_info("nosuch")
    e = ei.value
    assert (e.command, e.name, e.errno) == (dm_abi.DmCommand.DEV_STATUS, "nosuch", errno.ENXIO)
    assert isinstance(e.__cause__, OSError)
    assert isinstance(e, SwitchAgentError)
    assert "DM_DEV_STATUS nosuch" in str(e)

    kernel.add("sw0", PREFIX + "a")
    kernel.fail[0x09] = errno.EINVAL
    with pytest.raises(dm_errors.DmIoctlError) as ei:
        dmc.table_load("sw0", [(0, 8, "zero", "")])
    assert (ei.value.command, ei.value.name, ei.value.errno) == (
        dm_abi.DmCommand.TABLE_LOAD, "sw0", errno.EINVAL)


def test_name_and_uuid_arguments_are_checked(dmc):
    with pytest.raises(dm_errors.DmArgumentError):
        dmc.device_info()
    with pytest.raises(dm_errors.DmArgumentError):
        dmc.device_info("a", uuid="b")
    with pytest.raises(ValueError):
        dmc.device_info("n" * 128)
    with pytest.raises(dm_errors.DmArgumentError):
        dmc.device_create("a/b", PREFIX + "x")
    with pytest.raises(dm_errors.DmArgumentError):
        dm.DeviceMapper("", fd=-1, ioctl=FakeDmKernel())


# --- ownership guard ----------------------------------------------------------


@pytest.mark.parametrize("foreign_uuid", ["", "mpath-3600a0b80", "LVM-abc", "swagent-lowercase"])
def test_every_mutating_call_refuses_a_foreign_device(dmc, kernel, udev, foreign_uuid):
    kernel.add("theirs", foreign_uuid, live=[(0, 8, "zero", "")], suspended=False)
    calls = [
        lambda: dmc.table_load("theirs", [(0, 8, "zero", "")]),
        lambda: dmc.table_clear("theirs"),
        lambda: dmc.device_suspend("theirs"),
        lambda: dmc.device_resume("theirs"),
        lambda: dmc.device_remove("theirs"),
        lambda: dmc.target_message("theirs", 0, "set_region_mappings 0:1"),
    ]
    for call in calls:
        with pytest.raises(dm_errors.NotOwnedError) as ei:
            call()
        assert ei.value.uuid == foreign_uuid and ei.value.name == "theirs"
    if foreign_uuid:
        with pytest.raises(dm_errors.NotOwnedError):
            dmc.table_clear(uuid=foreign_uuid)
    assert kernel.mutating() == []
    assert udev.log == []
    assert kernel.devices["theirs"].live == [(0, 8, "zero", "")]
    # reads are fine
    assert dmc.device_info("theirs").uuid == foreign_uuid
    assert dmc.table_status("theirs", table=True) == [Target(0, 8, "zero", "")]


def test_device_create_refuses_a_foreign_uuid_without_an_ioctl(dmc, kernel):
    with pytest.raises(dm_errors.NotOwnedError):
        dmc.device_create("x", "mpath-1")
    assert kernel.calls == []
    info = dmc.device_create("x", PREFIX + "1")
    assert (info.name, info.uuid, info.suspended, info.active_present) == ("x", PREFIX + "1", True, False)
    assert kernel.calls[-1].name == "x" and kernel.calls[-1].uuid == PREFIX + "1"


def test_mutating_calls_are_addressed_by_the_checked_uuid(dmc, kernel):
    kernel.add("sw0", PREFIX + "a", live=[(0, 8, "zero", "")], suspended=False)
    dmc.device_suspend("sw0", noflush=True, skip_lockfs=True)
    status, suspend = kernel.calls[-2:]
    assert (status.nr, status.name, status.uuid) == (0x07, "sw0", "")
    assert (suspend.nr, suspend.name, suspend.uuid) == (0x06, "", PREFIX + "a")
    assert suspend.flags == dm_abi.DM_SUSPEND_FLAG | dm_abi.DM_NOFLUSH_FLAG | dm_abi.DM_SKIP_LOCKFS_FLAG
    assert suspend.event_nr == 0  # suspend sends no uevent, so no cookie


# --- udev cookies on resume/remove ------------------------------------------


def test_resume_and_remove_carry_the_cookie_and_wait(dmc, kernel, udev):
    kernel.add("leg0", PREFIX + "leg0", inactive=[(0, 8, "zero", "")])
    hidden = DmUdevFlags.DISABLE_DISK_RULES | DmUdevFlags.DISABLE_OTHER_RULES
    info = dmc.device_resume("leg0", udev_flags=hidden)
    assert not info.suspended and info.active_present
    resume = kernel.calls[-1]
    want = ((DmUdevFlags.PRIMARY_SOURCE | hidden) << 16) | 0x1234
    assert resume.event_nr == want and not resume.flags & dm_abi.DM_SUSPEND_FLAG
    assert udev.log[0] == ("begin", DmUdevFlags.PRIMARY_SOURCE | hidden)
    assert udev.log[1][:2] == ("complete", want)
    assert udev.log[1][2] & dm_abi.DM_UEVENT_GENERATED_FLAG
    assert dmc.device_remove("leg0") is True
    assert kernel.calls[-1].nr == 0x04
    assert kernel.calls[-1].event_nr == (DmUdevFlags.PRIMARY_SOURCE << 16) | 0x1234
    assert udev.log[-1][0] == "complete" and "leg0" not in kernel.devices


def test_failed_remove_cancels_the_cookie(dmc, kernel, udev):
    kernel.add("sw0", PREFIX + "a", open_count=1)
    with pytest.raises(dm_errors.DmIoctlError) as ei:
        dmc.device_remove("sw0")
    assert ei.value.errno == errno.EBUSY and ei.value.name == "sw0"
    assert [x[0] for x in udev.log] == ["begin", "cancel"]
    assert dmc.device_remove("sw0", deferred=True) is False
    assert kernel.calls[-1].flags & dm_abi.DM_DEFERRED_REMOVE and "sw0" in kernel.devices


def test_no_udev_sync_sends_a_flags_only_cookie(kernel):
    dmc = dm.DeviceMapper(PREFIX, fd=-1, ioctl=kernel, udev=dm_udev_sync.NoUdevSync())
    kernel.add("sw0", PREFIX + "a", inactive=[(0, 8, "zero", "")])
    dmc.device_resume("sw0", udev_flags=DmUdevFlags.DISABLE_OTHER_RULES)
    assert kernel.calls[-1].event_nr == 0x48 << 16


def test_resume_without_waiting_sends_the_flags_and_never_touches_the_semaphores(dmc, kernel, udev):
    kernel.add("leg0", PREFIX + "leg0", inactive=[(0, 8, "zero", "")])
    hidden = DmUdevFlags.DISABLE_DISK_RULES | DmUdevFlags.DISABLE_OTHER_RULES
    dmc.device_resume("leg0", udev_flags=hidden, wait_for_udev=False)
    assert kernel.calls[-1].event_nr == (DmUdevFlags.PRIMARY_SOURCE | hidden) << 16  # base 0
    assert udev.log == []


# --- messages -----------------------------------------------------------------


def test_target_message_payload_and_no_reply(dmc, kernel):
    kernel.add("sw0", PREFIX + "a", live=[(0, 8, "switch", "")], suspended=False)
    assert dmc.target_message("sw0", 4096, "set_region_mappings 0:1 :0 R2,10") is None
    msg = kernel.calls[-1]
    assert struct.unpack_from("=Q", msg.payload, 0)[0] == 4096
    text = b"set_region_mappings 0:1 :0 R2,10"
    assert msg.payload[8:8 + len(text) + 1] == text + b"\0"
    assert kernel.messages == [("sw0", 4096, "set_region_mappings 0:1 :0 R2,10")]


def test_target_message_reply_and_overflow_retry(dmc, kernel):
    d = kernel.add("sw0", PREFIX + "a", live=[(0, 8, "switch", "")], suspended=False)
    d.reply = "ok"
    assert dmc.target_message("sw0", 0, "@stats_list") == "ok"
    d.reply = "r" * 40000
    assert dmc.target_message("sw0", 0, "@stats_list") == d.reply
    assert [c.size for c in kernel.calls if c.nr == 0x0E][-3:] == [16384, 32768, 65536]


def test_message_errors_are_typed(dmc, kernel):
    kernel.add("sw0", PREFIX + "a", live=[(0, 8, "switch", "")], suspended=False)
    kernel.fail[0x0E] = errno.ENOMEM
    with pytest.raises(dm_errors.DmIoctlError) as ei:
        dmc.target_message("sw0", 0, "set_region_mappings " + " ".join(["0:1"] * 10))
    assert (ei.value.command, ei.value.errno) == (dm_abi.DmCommand.TARGET_MSG, errno.ENOMEM)
    with pytest.raises(dm_errors.DmArgumentError):
        dmc.target_message("sw0", 0, "   ")


def test_buffer_doubling_stops_at_the_kernel_limit(kernel, monkeypatch):
    monkeypatch.setattr(dm, "MAX_BUFFER_SIZE", 65536)

    def always_full(fd, request, buf):
        struct.pack_into("=I", buf, OFF_FLAGS, dm_abi.DM_BUFFER_FULL_FLAG)

    dmc = dm.DeviceMapper(PREFIX, fd=-1, ioctl=always_full, udev=dm_udev_sync.NoUdevSync())
    with pytest.raises(dm_errors.DmIoctlError) as ei:
        dmc.list_devices()
    assert ei.value.errno == errno.ENOBUFS


# --- UdevSync over real SysV semaphores -------------------------------------

libc = ctypes.CDLL(None, use_errno=True)


def sem_of(cookie):
    return libc.semget((dm_udev_sync.DM_COOKIE_MAGIC << 16) | (cookie & 0xFFFF), 1, 0)


def udevcomplete(cookie):
    """What `dmsetup udevcomplete` does: decrement the cookie's semaphore."""
    sb = dm_udev_sync._Sembuf(0, -1, 0o4000)
    assert libc.semop(sem_of(cookie), ctypes.byref(sb), 1) == 0


@pytest.fixture
def running_udev(tmp_path):
    control = tmp_path / "control"
    control.touch()
    return dm_udev_sync.UdevSync(timeout=5, udev_control=str(control))


def test_udev_sync_waits_for_udevcomplete(running_udev):
    flags = DmUdevFlags.PRIMARY_SOURCE | DmUdevFlags.DISABLE_OTHER_RULES
    cookie = running_udev.begin(flags)
    assert cookie.value >> 16 == flags and 0 < cookie.base <= 0xFFFF
    assert sem_of(cookie.value) == cookie.semid
    assert libc.semctl(cookie.semid, 0, 12) == 2  # created at 1, +1 for the task
    t = threading.Timer(0.3, udevcomplete, (cookie.value,))
    t.start()
    t0 = time.monotonic()
    assert running_udev.complete(cookie, dm_abi.DM_UEVENT_GENERATED_FLAG) is True
    assert time.monotonic() - t0 >= 0.25
    t.join()
    assert sem_of(cookie.value) == -1 and ctypes.get_errno() == errno.ENOENT


def test_udev_sync_no_uevent_means_no_wait(running_udev):
    cookie = running_udev.begin(DmUdevFlags.PRIMARY_SOURCE)
    t0 = time.monotonic()
    assert running_udev.complete(cookie, 0) is True
    assert time.monotonic() - t0 < 1
    assert sem_of(cookie.value) == -1


def test_udev_sync_times_out_and_cleans_up(running_udev, caplog):
    running_udev.timeout = 0.2
    cookie = running_udev.begin(DmUdevFlags.PRIMARY_SOURCE)
    assert running_udev.complete(cookie, dm_abi.DM_UEVENT_GENERATED_FLAG) is False
    assert "did not complete" in caplog.text
    assert sem_of(cookie.value) == -1


def test_udev_sync_without_udev_is_flags_only(tmp_path):
    sync = dm_udev_sync.UdevSync(udev_control=str(tmp_path / "absent"))
    cookie = sync.begin(DmUdevFlags.PRIMARY_SOURCE)
    assert cookie == dm_udev_sync.UdevCookie(0x40 << 16, None)
    assert sync.complete(cookie, dm_abi.DM_UEVENT_GENERATED_FLAG) is True


def test_udev_sync_cancel_destroys(running_udev):
    cookie = running_udev.begin(0)
    running_udev.cancel(cookie)
    assert sem_of(cookie.value) == -1


def test_missing_control_node_is_a_typed_error(tmp_path):
    with pytest.raises(dm_errors.DmUnavailableError) as ei:
        dm.DeviceMapper(PREFIX, control_path=str(tmp_path / "control"))
    assert ei.value.errno == errno.ENOENT and isinstance(ei.value, dm_errors.DmError)
