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

udev synchronisation: resume and remove carry a udev cookie and return
once udev has finished with the event (agent.kernel.dm_udev_sync). The
ABI itself (struct layouts, flags, list parsing) is agent.kernel.dm_abi,
and the errors are agent.kernel.dm_errors.

Threads: waiting for udev blocks (and so do suspend with flush, and big table
loads), so the agent calls these methods from a worker thread. One instance
keeps one control fd; every call builds its own buffer and its own cookie, so
concurrent calls on one instance from several threads are safe (the kernel
serialises what needs serialising). Nothing here touches asyncio.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
from dataclasses import replace
from collections.abc import Callable, Sequence

from agent.kernel.dm_abi import (
    DM_BUFFER_FULL_FLAG,
    DM_CONTROL_PATH,
    DM_DATA_OUT_FLAG,
    DM_DEFERRED_REMOVE,
    DM_INACTIVE_PRESENT_FLAG,
    DM_IOCTL_SIZE,
    DM_NAME_LEN,
    DM_NOFLUSH_FLAG,
    DM_QUERY_INACTIVE_TABLE_FLAG,
    DM_READONLY_FLAG,
    DM_SKIP_LOCKFS_FLAG,
    DM_STATUS_TABLE_FLAG,
    DM_SUSPEND_FLAG,
    DM_TARGET_MSG,
    DM_UUID_FLAG,
    DM_UUID_LEN,
    DeviceEntry,
    DeviceInfo,
    DmCommand,
    Header,
    cstr,
    header_info,
    pack_header,
    pack_targets,
    parse_deps,
    parse_name_list,
    parse_target_specs,
    parse_target_versions,
    unpack_header,
)
from agent.kernel.dm_errors import DmArgumentError, DmIoctlError, DmUnavailableError, NotOwnedError
from agent.kernel.dm_udev_sync import NoUdevSync, UdevSync
from protocol.dmtable import DmUdevFlags, Target

LOG = logging.getLogger(__name__)

#: libdm and devicemapper-rs start every buffer at 16 KiB to make BUFFER_FULL rare.
MIN_BUFFER_SIZE = 16 * 1024
#: copy_params() (drivers/md/dm-ioctl.c) rejects data_size above
#: DM_MAX_TARGETS * DM_MAX_TARGET_PARAMS = 1 GiB; stop doubling there.
MAX_BUFFER_SIZE = 1 << 30

IoctlFn = Callable[[int, int, bytearray], object]


def _fcntl_ioctl(fd: int, request: int, buf: bytearray) -> object:
    return fcntl.ioctl(fd, request, buf, True)


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
    ) -> tuple[Header, bytes]:
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
                     flags: int, wait_for_udev: bool = True) -> Header:
        # A flags-only cookie (base 0) still carries the flags to the rules; 95-dm-notify's
        # udevcomplete accepts it, and there is no semaphore to wait on.
        sync = self.udev if wait_for_udev else NoUdevSync()
        cookie = sync.begin(DmUdevFlags.PRIMARY_SOURCE | udev_flags)
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
        # poll round, and parsing hundreds of devices is not free (docs/benchmarks.md).
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
        return header_info(hdr)

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
        return header_info(hdr)

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
        return header_info(hdr)

    def table_clear(self, name: str | None = None, *, uuid: str | None = None) -> DeviceInfo:
        """``DM_TABLE_CLEAR``: drop the inactive table, if any."""
        owned = self._owned(DmCommand.TABLE_CLEAR, name, uuid)
        hdr, _ = self._ioctl(DmCommand.TABLE_CLEAR, uuid=owned[0], label=owned[1])
        return header_info(hdr)

    def device_suspend(self, name: str | None = None, *, uuid: str | None = None,
                       noflush: bool = False, skip_lockfs: bool = False) -> DeviceInfo:
        """``DM_DEV_SUSPEND`` with DM_SUSPEND_FLAG: waits for in-flight I/O unless ``noflush``.

        Sends no uevent, hence no cookie.
        """
        owned = self._owned(DmCommand.DEV_SUSPEND, name, uuid)
        flags = DM_SUSPEND_FLAG | (DM_NOFLUSH_FLAG if noflush else 0) | (
            DM_SKIP_LOCKFS_FLAG if skip_lockfs else 0)
        hdr, _ = self._ioctl(DmCommand.DEV_SUSPEND, uuid=owned[0], flags=flags, label=owned[1])
        return header_info(hdr)

    def device_resume(self, name: str | None = None, *, uuid: str | None = None,
                      udev_flags: int = 0, noflush: bool = False,
                      skip_lockfs: bool = False, wait_for_udev: bool = True) -> DeviceInfo:
        """``DM_DEV_SUSPEND`` without DM_SUSPEND_FLAG: swap in the inactive table and resume.

        Sends a udev cookie with DmUdevFlags.PRIMARY_SOURCE plus ``udev_flags``
        (e.g. DmUdevFlags.HIDDEN for legs) and returns after udev has handled the change event.
        With an inactive table the device is suspended first (``noflush`` and
        ``skip_lockfs`` apply). A dm-switch region table starts over here.
        ``wait_for_udev=False`` returns at once (for devices nobody opens by path).
        """
        owned = self._owned(DmCommand.DEV_SUSPEND, name, uuid)
        flags = (DM_NOFLUSH_FLAG if noflush else 0) | (DM_SKIP_LOCKFS_FLAG if skip_lockfs else 0)
        return header_info(self._with_cookie(DmCommand.DEV_SUSPEND, owned, udev_flags, flags, wait_for_udev))

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
        payload = DM_TARGET_MSG.pack(sector) + body + b"\0"
        hdr, data = self._ioctl(DmCommand.TARGET_MSG, uuid=owned[0], payload=payload,
                                label=owned[1])
        if hdr.flags & DM_DATA_OUT_FLAG:
            return cstr(data)
        return None
