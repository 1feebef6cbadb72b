"""Async reads of the sysfs attributes the agent needs, with the sysfs root injectable.

What is read, and from where (paths relative to the root, normally ``/sys``):

- a dm device ``dm-N``: ``block/dm-N/{dev,size}``, ``block/dm-N/dm/{name,uuid,suspended}``
  (``drivers/md/dm-sysfs.c``), ``block/dm-N/slaves/*`` (dm opens every leg and
  calls ``bd_link_disk_holder``);
- an sd device ``sdX``: ``block/sdX/{dev,size}``, ``block/sdX/queue/{max_hw_sectors_kb,
  max_sectors_kb,logical_block_size}``, ``block/sdX/device`` -> the scsi_device
  directory named ``H:C:T:L`` with ``state``, ``vendor``, ``model``, ``rev``;
- the iSCSI session an sd device hangs under: an ancestor directory of the
  scsi_device named ``sessionN`` holding ``iscsi_session/sessionN/{targetname,tpgt}``
  and ``connectionN:M/iscsi_connection/connectionN:M/{persistent_address,
  persistent_port}`` (``drivers/scsi/scsi_transport_iscsi.c``);
- every iSCSI session: ``class/iscsi_session/sessionN`` links to
  ``devices/.../hostH/sessionN/iscsi_session/sessionN``, which also holds ``state``
  (``LOGGED_IN``, ``FAILED``, ``FREE``: ``iscsi_session_state_name()``),
  ``recovery_tmo`` and ``ifacename`` (the open-iscsi iface iscsid logged in over);
  the session's disks are ``sessionN/targetH:C:T/H:C:T:L/block/sdX``;
- ``dev/block/M:m`` -> the block device with that number.

Sizes in ``size`` files are always 512-byte sectors, whatever the logical block
size (``block/genhd.c``). Every read goes through aiofiles, so a sysfs read that
blocks (it can, on a device being torn down) never stalls the event loop; the iSCSI
sessions, dozens of small reads, are read whole in one worker-thread call.

Errors::

    SwitchAgentError
     └── SysfsError            a sysfs read failed: names the path and what was wrong
          ├── SysfsMissingError   the attribute or device is not there (device gone?)
          └── SysfsGarbledError   the attribute is there but does not parse
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import re
from dataclasses import dataclass, replace
from typing import NamedTuple

import aiofiles
import aiofiles.os

from protocol.errors import SwitchAgentError

LOG = logging.getLogger(__name__)

SYSFS_ROOT = "/sys"
SECTOR_BYTES = 512

_realpath = aiofiles.os.wrap(os.path.realpath)
_lexists = aiofiles.os.wrap(os.path.lexists)
_HCTL = re.compile(r"^(\d+):(\d+):(\d+):(\d+)$")
_SESSION = re.compile(r"^session\d+$")
_CONNECTION = re.compile(r"^connection\d+:\d+$")
_TARGET = re.compile(r"^target\d+:\d+:\d+$")
_HOST = re.compile(r"^host\d+$")


class SysfsError(SwitchAgentError):
    """A sysfs read failed: ``path`` is the file or directory, ``problem`` what was wrong."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class SysfsMissingError(SysfsError):
    """The attribute (or the whole device) is not there: the device may have gone."""


class SysfsGarbledError(SysfsError):
    """The attribute exists but its content is not what the kernel writes there."""


class DevNum(NamedTuple):
    """A block device number; ``str()`` gives the ``major:minor`` form dm tables and sysfs use."""

    major: int
    minor: int

    @classmethod
    def parse(cls, text: str) -> DevNum:
        """Parse ``"M:m"``; raises ValueError if it is not two decimal numbers."""
        major, sep, minor = text.strip().partition(":")
        if not sep or not major.isdigit() or not minor.isdigit():
            raise ValueError(f"not a major:minor device number: {text!r}")
        return cls(int(major), int(minor))

    def __str__(self) -> str:
        return f"{self.major}:{self.minor}"


class Hctl(NamedTuple):
    """A SCSI address: host, channel, target, lun (the scsi_device's sysfs name)."""

    host: int
    channel: int
    target: int
    lun: int

    def __str__(self) -> str:
        return f"{self.host}:{self.channel}:{self.target}:{self.lun}"


@dataclass(frozen=True)
class DmDevice:
    """What sysfs says about one device-mapper device ``dm-N``."""

    kernel_name: str
    """``dm-N``."""
    name: str
    """The dm name (``/dev/mapper/<name>``)."""
    uuid: str
    """The dm uuid, ``""`` if it has none (multipathd's maps: ``mpath-<wwid>``)."""
    suspended: bool
    size_sectors: int
    dev: DevNum
    slaves: tuple[str, ...]
    """Kernel names of the devices its live table holds (``sdb``, ``dm-3``), sorted."""


@dataclass(frozen=True)
class BlockStack:
    """A block device's size and what it stacks on, each with its number and size (``Sysfs.stacks``)."""

    size_sectors: int
    slaves: tuple[tuple[str, DevNum, int], ...]
    """(kernel name, major:minor, size in sectors) of each device under it that is still there."""


@dataclass(frozen=True)
class QueueLimits:
    """Request-queue limits of a block device."""

    max_hw_sectors_kb: int
    max_sectors_kb: int
    logical_block_size: int

    @property
    def max_transfer_bytes(self) -> int:
        """The largest single transfer: the smaller of the two limits, in bytes.

        SG_IO on a block device fails with EIO past ``max_hw_sectors_kb``
        (``block/scsi_ioctl.c``); ``max_sectors_kb`` is the (lower) soft limit.
        """
        return min(self.max_hw_sectors_kb, self.max_sectors_kb) * 1024


@dataclass(frozen=True)
class Portal:
    """One iSCSI connection's target address."""

    address: str
    port: int

    def __str__(self) -> str:
        return f"[{self.address}]:{self.port}" if ":" in self.address else f"{self.address}:{self.port}"

    def same_as(self, other: Portal) -> bool:
        """Equal portals, addresses compared as IP addresses (sysfs, VPD 0xC1 and open-iscsi's record
        names may spell an IPv6 address apart, or in brackets)."""
        return self.port == other.port and same_address(self.address, other.address)


def same_address(a: str, b: str) -> bool:
    """Equal IP addresses however spelled; other names compared case-insensitively."""
    try:
        return ipaddress.ip_address(a.strip("[]")) == ipaddress.ip_address(b.strip("[]"))
    except ValueError:
        return a.lower() == b.lower()


SESSION_LOGGED_IN = "LOGGED_IN"
"""``state`` of a session that carries I/O; ``FAILED`` (iscsid is reconnecting) and ``FREE``
(being set up or torn down) are the kernel's other two (``iscsi_session_state_name()``)."""


@dataclass(frozen=True)
class IscsiSession:
    """One iSCSI session: the one a SCSI device belongs to, or one of ``Sysfs.iscsi_sessions()``.

    ``state``, ``recovery_tmo_s``, ``iface_name``, ``host`` and ``disks`` are read only by
    ``Sysfs.iscsi_sessions()`` / ``Sysfs.iscsi_session_by_id()``; the per-disk lookup
    (``ScsiDisk.iscsi``) leaves them at None / () to keep a path's discovery cheap.
    """

    session: str
    """``sessionN``."""
    target_name: str
    tpgt: int | None
    portals: tuple[Portal, ...]
    """One per connection, in connection-name order (nearly always exactly one)."""
    state: str | None = None
    """``LOGGED_IN``, ``FAILED`` or ``FREE`` (SESSION_LOGGED_IN); None if not read."""
    recovery_tmo_s: int | None = None
    """The replacement timeout: seconds a FAILED session queues I/O before failing it."""
    iface_name: str | None = None
    """The open-iscsi iface the session was made over (``default``, ``iface0`` ...)."""
    host: int | None = None
    """The SCSI host number of the session (``hostH`` above it)."""
    disks: tuple[str, ...] = ()
    """Kernel names of the sd disks on the session, sorted."""

    @property
    def portal(self) -> Portal | None:
        """The first connection's portal, or None when no connection is up."""
        return self.portals[0] if self.portals else None

    @property
    def sid(self) -> int:
        """The session id iscsiadm's ``-r`` takes: N of ``sessionN``."""
        return int(self.session[len("session"):])


@dataclass(frozen=True)
class ScsiDisk:
    """What sysfs says about one SCSI disk ``sdX``."""

    kernel_name: str
    dev: DevNum
    size_sectors: int
    queue: QueueLimits
    hctl: Hctl
    state: str
    """The scsi_device state: ``running``, ``offline``, ``blocked``, ``transport-offline`` ..."""
    vendor: str
    model: str
    iscsi: IscsiSession | None
    """None when the disk is not under an iSCSI session."""


def _check_name(name: str) -> str:
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"not a kernel device name: {name!r}")
    return name


class Sysfs:
    """Reads sysfs under ``root`` (``/sys``; tests pass a tmp tree built to look like it)."""

    def __init__(self, root: str | os.PathLike[str] = SYSFS_ROOT) -> None:
        self.root = os.fspath(root)

    def path(self, *parts: str) -> str:
        """The absolute path of ``parts`` under the root (a first part that is absolute, e.g. a
        resolved link, is taken as it is)."""
        return os.path.join(self.root, *parts)

    # -- primitives ------------------------------------------------------------

    async def read_attr(self, *parts: str) -> str:
        """One attribute's text, without the trailing newline."""
        path = self.path(*parts)
        LOG.debug("sysfs read %s", path)
        try:
            async with aiofiles.open(path, "r", encoding="utf-8", errors="strict") as f:
                text = await f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise _read_error(path, exc) from exc
        stripped: str = text.rstrip("\n")
        return stripped

    async def write_attr(self, value: str, *parts: str) -> None:
        """Write one attribute (e.g. ``"1"`` to a scsi_device's ``rescan``)."""
        path = self.path(*parts)
        LOG.debug("sysfs write %s <- %r", path, value)
        try:
            async with aiofiles.open(path, "w", encoding="ascii") as f:
                await f.write(value)
        except FileNotFoundError as exc:
            raise SysfsMissingError(path, "no such attribute") from exc
        except OSError as exc:
            raise SysfsError(path, f"write failed: {os.strerror(exc.errno or 0)}") from exc

    async def read_int(self, *parts: str) -> int:
        """One attribute holding a decimal integer."""
        return _parse_int(self.path(*parts), await self.read_attr(*parts))

    async def read_devnum(self, *parts: str) -> DevNum:
        """One ``dev`` attribute (``major:minor``)."""
        return _parse_devnum(self.path(*parts), await self.read_attr(*parts))

    async def list_dir(self, *parts: str) -> list[str]:
        """A sysfs directory's entries, sorted."""
        path = self.path(*parts)
        LOG.debug("sysfs list %s", path)
        try:
            return sorted(await aiofiles.os.listdir(path))
        except OSError as exc:
            raise _list_error(path, exc) from exc

    async def resolve(self, *parts: str) -> str:
        """The real path behind a sysfs symlink (e.g. ``block/sdb/device``)."""
        path = self.path(*parts)
        LOG.debug("sysfs resolve %s", path)
        if not await _lexists(path):
            raise SysfsMissingError(path, "no such link")
        resolved: str = await _realpath(path)
        return resolved

    # -- block devices ---------------------------------------------------------

    async def block_name(self, dev: DevNum | tuple[int, int] | str) -> str:
        """The kernel name (``sdb``, ``dm-3``, ``sdb1``) of the block device numbered ``dev``."""
        num = DevNum.parse(dev) if isinstance(dev, str) else DevNum(*dev)
        real = await self.resolve("dev", "block", str(num))
        return os.path.basename(real)

    async def block_devnum(self, name: str) -> DevNum:
        """The ``major:minor`` of block device ``name``."""
        return await self.read_devnum("block", _check_name(name), "dev")

    async def size_sectors(self, name: str) -> int:
        """Size of block device ``name`` in 512-byte sectors."""
        return await self.read_int("block", _check_name(name), "size")

    async def scsi_wwid(self, name: str) -> str:
        """The LU identifier the kernel read from VPD 0x83 for disk ``name`` (``naa.6001405...``)."""
        return await self.read_attr("block", _check_name(name), "device", "wwid")

    async def slaves(self, name: str) -> tuple[str, ...]:
        """Kernel names of the devices block device ``name`` stacks on (empty for a plain disk)."""
        return tuple(await self.list_dir("block", _check_name(name), "slaves"))

    async def stacks(self, names: list[str]) -> dict[str, BlockStack]:
        """Each block device of ``names`` with its size and its slaves' numbers and sizes, in one
        worker-thread call (a reconcile reads its multipath map each time: one small read per
        thread hop was most of a page move's discovery under TCG). Left out: a device gone
        meanwhile; a slave gone meanwhile is left out of its device's."""
        return await asyncio.to_thread(self._stacks, [_check_name(n) for n in names])

    def _stacks(self, names: list[str]) -> dict[str, BlockStack]:
        found = {}
        for name in names:
            try:
                slaves = _list_sync(self.path("block", name, "slaves"))
                size = _int_sync(self.path("block", name, "size"))
            except SysfsError as exc:  # removed between the caller's listing and now
                LOG.debug("%s: went away while read: %s", name, exc)
                continue
            under = []
            for slave in slaves:
                try:
                    under.append((slave, _devnum_sync(self.path("block", slave, "dev")),
                                  _int_sync(self.path("block", slave, "size"))))
                except SysfsError as exc:  # a path going away while we look
                    LOG.debug("%s: slave %s left out: %s", name, slave, exc)
            found[name] = BlockStack(size, tuple(under))
        return found

    async def holders(self, name: str) -> tuple[str, ...]:
        """Kernel names of the devices stacked on block device ``name`` (e.g. the multipath map)."""
        return tuple(await self.list_dir("block", _check_name(name), "holders"))

    async def queue_limits(self, name: str) -> QueueLimits:
        """The request-queue limits of block device ``name``."""
        name = _check_name(name)
        return QueueLimits(
            max_hw_sectors_kb=await self.read_int("block", name, "queue", "max_hw_sectors_kb"),
            max_sectors_kb=await self.read_int("block", name, "queue", "max_sectors_kb"),
            logical_block_size=await self.read_int("block", name, "queue", "logical_block_size"),
        )

    # -- device-mapper ---------------------------------------------------------

    async def dm_kernel_names(self) -> list[str]:
        """Every ``dm-N`` under ``block/``, in numeric order."""
        names = [n for n in await self.list_dir("block") if re.fullmatch(r"dm-\d+", n)]
        return sorted(names, key=lambda n: int(n[3:]))

    async def dm_device(self, kernel_name: str) -> DmDevice:
        """What sysfs says about ``dm-N``."""
        name = _check_name(kernel_name)
        suspended_path = self.path("block", name, "dm", "suspended")
        suspended = await self.read_attr("block", name, "dm", "suspended")
        if suspended not in ("0", "1"):
            raise SysfsGarbledError(suspended_path, f"expected 0 or 1, got {suspended!r}")
        return DmDevice(
            kernel_name=name,
            name=await self.read_attr("block", name, "dm", "name"),
            uuid=await self.read_attr("block", name, "dm", "uuid"),
            suspended=suspended == "1",
            size_sectors=await self.size_sectors(name),
            dev=await self.block_devnum(name),
            slaves=await self.slaves(name),
        )

    async def dm_devices(self) -> list[DmDevice]:
        """Every dm device; one that vanishes between listing and reading is left out."""
        found = []
        for name in await self.dm_kernel_names():
            try:
                found.append(await self.dm_device(name))
            except SysfsMissingError as exc:
                LOG.debug("dm device %s went away while listing: %s", name, exc)
        return found

    # -- SCSI disks ------------------------------------------------------------

    async def scsi_device_dir(self, name: str) -> str:
        """The real path of sd device ``name``'s scsi_device directory (named ``H:C:T:L``)."""
        return await self.resolve("block", _check_name(name), "device")

    async def hctl(self, name: str) -> Hctl:
        """The SCSI address of sd device ``name``."""
        device_dir = await self.scsi_device_dir(name)
        m = _HCTL.match(os.path.basename(device_dir))
        if not m:
            raise SysfsGarbledError(device_dir, "scsi device directory is not named H:C:T:L")
        return Hctl(*(int(g) for g in m.groups()))

    async def iscsi_session(self, name: str) -> IscsiSession | None:
        """The iSCSI session sd device ``name`` belongs to, or None if it is not iSCSI."""
        device_dir = await self.scsi_device_dir(name)
        root = await _realpath(self.root)
        session_dir = None
        probe = device_dir
        while probe not in ("/", "") and probe != root:
            if _SESSION.match(os.path.basename(probe)):
                session_dir = probe
                break
            probe = os.path.dirname(probe)
        if session_dir is None:
            return None
        return await asyncio.to_thread(self._session_at, session_dir, detail=False)

    async def iscsi_path_identities(self, names: list[str]) -> dict[str, str]:
        """For each sd disk of ``names`` that is a running iSCSI path: what names that path while it
        lives, its scsi_device's real path (``.../sessionN/targetH:C:T/H:C:T:L``). Session numbers
        are never reused while the kernel runs (``iscsi_session_nr``), so the same text means the
        same session. Left out: disks that are gone, not iSCSI, or not ``running`` (blocked in
        recovery, offline). All of it in one worker-thread call."""
        return await asyncio.to_thread(self._path_identities, [_check_name(n) for n in names])

    def _path_identities(self, names: list[str]) -> dict[str, str]:
        found = {}
        root = os.path.realpath(self.root)
        for name in names:
            device = self.path("block", name, "device")
            real = os.path.realpath(device)
            if not any(_SESSION.match(part) for part in os.path.relpath(real, root).split(os.sep)):
                continue
            if _optional_sync(os.path.join(device, "state")) == "running":
                found[name] = real
        return found

    async def iscsi_session_names(self) -> list[str]:
        """Every ``sessionN`` under ``class/iscsi_session``, in numeric order (none: no sessions,
        or iscsi_transport not loaded)."""
        return await asyncio.to_thread(self._session_names)

    async def iscsi_session_by_id(self, sid: int | str) -> IscsiSession:
        """Session ``sid`` (``3`` or ``"session3"``) with its state, iface, host and disks."""
        name = sid if isinstance(sid, str) else f"session{sid}"
        if not _SESSION.match(name):
            raise ValueError(f"not an iSCSI session name: {sid!r}")
        return await asyncio.to_thread(self._session_by_name, name)

    async def iscsi_sessions(self) -> list[IscsiSession]:
        """Every iSCSI session with its state, iface, host and disks; one that goes away while
        being read (logged out meanwhile) is left out.

        All of it in one worker-thread call: a dozen small reads per session, each its own
        thread hop, cost the session keeper seconds per plan in a TCG guest (docs/sessions.md)."""
        return await asyncio.to_thread(self._sessions)

    # -- iSCSI sessions, read on a worker thread (plain blocking calls) ------------

    def _sessions(self) -> list[IscsiSession]:
        found = []
        for name in self._session_names():
            try:
                found.append(self._session_by_name(name))
            except SysfsMissingError as exc:
                LOG.debug("iSCSI %s went away while listing: %s", name, exc)
        return found

    def _session_names(self) -> list[str]:
        try:
            names = _list_sync(self.path("class", "iscsi_session"))
        except SysfsMissingError:
            return []
        return sorted((n for n in names if _SESSION.match(n)), key=lambda n: int(n[len("session"):]))

    def _session_by_name(self, name: str) -> IscsiSession:
        link = self.path("class", "iscsi_session", name)
        if not os.path.lexists(link):
            raise SysfsMissingError(link, "no such link")
        # class/iscsi_session/sessionN -> .../hostH/sessionN/iscsi_session/sessionN
        return self._session_at(os.path.dirname(os.path.dirname(os.path.realpath(link))), detail=True)

    def _session_at(self, session_dir: str, *, detail: bool) -> IscsiSession:
        """Read the session whose device directory (``.../hostH/sessionN``) is ``session_dir``."""
        session = os.path.basename(session_dir)
        attrs = os.path.join(session_dir, "iscsi_session", session)
        target_name = _read_sync(os.path.join(attrs, "targetname"))
        tpgt = _optional_int_sync(os.path.join(attrs, "tpgt"))
        portals = []
        entries = _list_sync(session_dir)
        for entry in entries:
            if not _CONNECTION.match(entry):
                continue
            conn = os.path.join(session_dir, entry, "iscsi_connection", entry)
            address = _read_sync(os.path.join(conn, "persistent_address"))
            port = _int_sync(os.path.join(conn, "persistent_port"))
            portals.append(Portal(address, port))
        found = IscsiSession(session=session, target_name=target_name, tpgt=tpgt, portals=tuple(portals))
        if not detail:
            return found
        host_dir = os.path.basename(os.path.dirname(session_dir))
        return replace(
            found,
            state=_read_sync(os.path.join(attrs, "state")),
            recovery_tmo_s=_optional_int_sync(os.path.join(attrs, "recovery_tmo")),
            iface_name=_optional_sync(os.path.join(attrs, "ifacename")),
            host=int(host_dir[4:]) if _HOST.match(host_dir) else None,
            disks=_session_disks_sync(session_dir, entries),
        )

    async def _optional_attr(self, *parts: str) -> str | None:
        """An attribute a transport may leave out (or fail to read: ``ENOTCONN`` while the
        connection is down): None instead of an error."""
        try:
            text = await self.read_attr(*parts)
        except SysfsError:
            return None
        return text or None

    async def scsi_disk(self, name: str) -> ScsiDisk:
        """What sysfs says about sd device ``name``."""
        name = _check_name(name)
        return ScsiDisk(
            kernel_name=name,
            dev=await self.block_devnum(name),
            size_sectors=await self.size_sectors(name),
            queue=await self.queue_limits(name),
            hctl=await self.hctl(name),
            state=await self.read_attr("block", name, "device", "state"),
            vendor=(await self.read_attr("block", name, "device", "vendor")).strip(),
            model=(await self.read_attr("block", name, "device", "model")).strip(),
            iscsi=await self.iscsi_session(name),
        )


# -- blocking reads, for the worker thread -------------------------------------------


def _read_sync(path: str) -> str:
    """One attribute's text, without the trailing newline (``Sysfs.read_attr``'s errors)."""
    LOG.debug("sysfs read %s", path)
    try:
        with open(path, "r", encoding="utf-8", errors="strict") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise _read_error(path, exc) from exc
    return text.rstrip("\n")


def _read_error(path: str, exc: OSError | UnicodeDecodeError) -> SysfsError:
    """The typed error of a failed attribute read, the same for the event loop's and the thread's reads."""
    if isinstance(exc, FileNotFoundError):
        return SysfsMissingError(path, "no such attribute")
    if isinstance(exc, UnicodeDecodeError):
        return SysfsGarbledError(path, f"not UTF-8 text: {exc}")
    if exc.errno in (errno.ENODEV, errno.ENXIO):
        return SysfsMissingError(path, f"device gone ({os.strerror(exc.errno)})")
    return SysfsError(path, f"read failed: {os.strerror(exc.errno or 0)}")


def _int_sync(path: str) -> int:
    return _parse_int(path, _read_sync(path))


def _devnum_sync(path: str) -> DevNum:
    return _parse_devnum(path, _read_sync(path))


def _parse_int(path: str, text: str) -> int:
    """A decimal attribute's value (the event loop's and the thread's reads)."""
    try:
        return int(text.strip(), 10)
    except ValueError as exc:
        raise SysfsGarbledError(path, f"expected a decimal integer, got {text!r}") from exc


def _parse_devnum(path: str, text: str) -> DevNum:
    """A ``dev`` attribute's ``major:minor`` (the event loop's and the thread's reads)."""
    try:
        return DevNum.parse(text)
    except ValueError as exc:
        raise SysfsGarbledError(path, f"expected major:minor, got {text!r}") from exc


def _optional_sync(path: str) -> str | None:
    """An attribute a transport may leave out (or fail to read: ``ENOTCONN`` while the
    connection is down): None instead of an error."""
    try:
        text = _read_sync(path)
    except SysfsError:
        return None
    return text or None


def _optional_int_sync(path: str) -> int | None:
    """A decimal attribute that may be missing; garbled is still an error."""
    text = _optional_sync(path)
    return None if text is None else _parse_int(path, text)


def _list_sync(path: str) -> list[str]:
    LOG.debug("sysfs list %s", path)
    try:
        return sorted(os.listdir(path))
    except OSError as exc:
        raise _list_error(path, exc) from exc


def _list_error(path: str, exc: OSError) -> SysfsError:
    """The typed error of a failed directory listing, the same for the event loop's and the thread's."""
    if isinstance(exc, FileNotFoundError):
        return SysfsMissingError(path, "no such directory")
    if isinstance(exc, NotADirectoryError):
        return SysfsGarbledError(path, "not a directory")
    return SysfsError(path, f"listing failed: {os.strerror(exc.errno or 0)}")


def _session_disks_sync(session_dir: str, entries: list[str]) -> tuple[str, ...]:
    """The sd disks under ``sessionN/targetH:C:T/H:C:T:L/block/``."""
    disks = []
    for target in entries:
        if not _TARGET.match(target):
            continue
        for lun in _list_sync(os.path.join(session_dir, target)):
            if not _HCTL.match(lun):
                continue
            try:
                disks.extend(_list_sync(os.path.join(session_dir, target, lun, "block")))
            except SysfsMissingError:
                pass  # a LUN with no block device (yet), e.g. still being scanned
    return tuple(sorted(disks))
