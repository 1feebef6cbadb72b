"""SG_IO on a path's sd node: the one place the agent sends a SCSI command.

``sg_io()`` fills a ``sg_io_hdr`` (``<scsi/sg.h>``, 88 bytes on x86_64), calls
``ioctl(fd, SG_IO, hdr)`` and turns the completed header into a ``ScsiResult``
or a typed error. ``ScsiDevice`` owns the fd of one sd node, knows its largest
transfer from sysfs, and runs each blocking ioctl in a thread, so one slow path
never stalls the event loop. The ioctl callable is injectable: host tests hand
in a fake that fills the header's status, sense and resid like the kernel.

Kernel facts this relies on (``block/scsi_ioctl.c``, ``drivers/scsi/scsi_ioctl.c``
in newer trees):

- on a block device, a transfer larger than ``queue/max_hw_sectors_kb`` fails
  the ioctl with EIO before anything is sent;
- commands outside the read-safe list need CAP_SYS_RAWIO (the agent runs as
  root); with it, a read-only open suffices. Open read-only on purpose: closing
  a block device opened for writing makes udev's inotify watch synthesise a
  ``change`` event (and a blkid probe) on the path;
- ``status`` is the SAM status; ``host_status`` the ``DID_*`` byte
  (``include/scsi/scsi_status.h``); ``driver_status`` has DRIVER_SENSE (0x08)
  whenever sense was written, which alone is not an error.

Errors::

    SwitchAgentError
     └── ScsiError                  device, opcode (and the CDB) of the failed command
          ├── ScsiCommandError       completed unsuccessfully: non-GOOD status (sense
          │    │                     decoded when the target sent it), or host/driver failure
          │    └── ScsiTransportError  host adapter or driver failure (host_status != DID_OK
          │         │                  or a driver error): the LU may never have seen it
          │         └── ScsiTimeoutError  the command timed out (DID_TIME_OUT, DRIVER_TIMEOUT)
          └── ScsiDeviceError        no command completed: open() or the SG_IO ioctl itself
                                     failed with an errno (EPERM, EIO for an oversize
                                     transfer, ENODEV/ENXIO for a vanished device)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import errno
import fcntl
import functools
import logging
import os
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Generator, Generic, TypeVar

from protocol.errors import DecodeError, SwitchAgentError
from protocol.pagemap import GET_PAGE_MAP_OPCODE
from protocol.scsi.constants import Opcode, ScsiStatus, ServiceActionIn16
from protocol.scsi.sense import Sense, decode_sense

LOG = logging.getLogger(__name__)
_T = TypeVar("_T")

# <scsi/sg.h>
SG_IO = 0x2285
SG_INTERFACE_ID_ORIG = ord("S")
SG_DXFER_NONE = -1
SG_DXFER_TO_DEV = -2
SG_DXFER_FROM_DEV = -3
SG_INFO_OK_MASK = 0x1

SENSE_BUFFER_BYTES = 96
"""SCSI_SENSE_BUFFERSIZE: the most sense the kernel keeps, so the most SG_IO returns."""
DEFAULT_TIMEOUT_MS = 30_000
MAX_CDB_BYTES = 32

# include/scsi/scsi_status.h, enum scsi_host_status
HOST_STATUS_NAMES = {
    0x00: "DID_OK", 0x01: "DID_NO_CONNECT", 0x02: "DID_BUS_BUSY", 0x03: "DID_TIME_OUT",
    0x04: "DID_BAD_TARGET", 0x05: "DID_ABORT", 0x06: "DID_PARITY", 0x07: "DID_ERROR",
    0x08: "DID_RESET", 0x09: "DID_BAD_INTR", 0x0A: "DID_PASSTHROUGH", 0x0B: "DID_SOFT_ERROR",
    0x0C: "DID_IMM_RETRY", 0x0D: "DID_REQUEUE", 0x0E: "DID_TRANSPORT_DISRUPTED",
    0x0F: "DID_TRANSPORT_FAILFAST", 0x10: "DID_TARGET_FAILURE", 0x11: "DID_NEXUS_FAILURE",
    0x12: "DID_ALLOC_FAILURE", 0x13: "DID_MEDIUM_ERROR", 0x14: "DID_TRANSPORT_MARGINAL",
}
DID_OK = 0x00
DID_TIME_OUT = 0x03
# <scsi/sg.h> / the old driver byte: low nibble
DRIVER_STATUS_NAMES = {
    0x0: "DRIVER_OK", 0x1: "DRIVER_BUSY", 0x2: "DRIVER_SOFT", 0x3: "DRIVER_MEDIA",
    0x4: "DRIVER_ERROR", 0x5: "DRIVER_INVALID", 0x6: "DRIVER_TIMEOUT", 0x7: "DRIVER_HARD",
    0x8: "DRIVER_SENSE",
}
DRIVER_TIMEOUT = 0x6
DRIVER_SENSE = 0x8
_SUCCESS_STATUSES = (ScsiStatus.GOOD, ScsiStatus.CONDITION_MET)


class SgIoHdr(ctypes.Structure):
    """``struct sg_io_hdr`` from ``<scsi/sg.h>`` (include/scsi/sg.h in the kernel tree; x86-64 layout, 88 bytes)."""

    _fields_ = [
        ("interface_id", ctypes.c_int),
        ("dxfer_direction", ctypes.c_int),
        ("cmd_len", ctypes.c_ubyte),
        ("mx_sb_len", ctypes.c_ubyte),
        ("iovec_count", ctypes.c_ushort),
        ("dxfer_len", ctypes.c_uint),
        ("dxferp", ctypes.c_void_p),
        ("cmdp", ctypes.c_void_p),
        ("sbp", ctypes.c_void_p),
        ("timeout", ctypes.c_uint),
        ("flags", ctypes.c_uint),
        ("pack_id", ctypes.c_int),
        ("usr_ptr", ctypes.c_void_p),
        ("status", ctypes.c_ubyte),
        ("masked_status", ctypes.c_ubyte),
        ("msg_status", ctypes.c_ubyte),
        ("sb_len_wr", ctypes.c_ubyte),
        ("host_status", ctypes.c_ushort),
        ("driver_status", ctypes.c_ushort),
        ("resid", ctypes.c_int),
        ("duration", ctypes.c_uint),
        ("info", ctypes.c_uint),
    ]


if ctypes.sizeof(ctypes.c_void_p) == 8:
    assert ctypes.sizeof(SgIoHdr) == 88, ctypes.sizeof(SgIoHdr)

IoctlFn = Callable[[int, int, Any], Any]
"""``fcntl.ioctl``'s shape: (fd, request, mutable buffer) -> result; the header is updated in place."""


def command_name(cdb: bytes) -> str:
    """Human name of a CDB's command, e.g. ``GET PAGE MAP``, ``READ CAPACITY(16)``, ``INQUIRY``."""
    if not cdb:
        return "empty CDB"
    op = cdb[0]
    if op == GET_PAGE_MAP_OPCODE:
        return "GET PAGE MAP"
    if op == Opcode.SERVICE_ACTION_IN_16 and len(cdb) > 1:
        sa = cdb[1] & 0x1F
        if sa == ServiceActionIn16.READ_CAPACITY_16:
            return "READ CAPACITY(16)"
        if sa == ServiceActionIn16.REPORT_REFERRALS:
            return "REPORT REFERRALS"
    try:
        return Opcode(op).name.replace("_", " ")
    except ValueError:
        return "VENDOR COMMAND" if op >= 0xC0 else "COMMAND"


def _status_text(status: int) -> str:
    try:
        return ScsiStatus(status).name.replace("_", " ")
    except ValueError:
        return f"status 0x{status:02x}"


@dataclass(frozen=True)
class ScsiResult:
    """A command that completed with GOOD status."""

    data_in: bytes
    """What the device sent, trimmed by ``resid`` (empty for no data-in)."""
    status: int
    sense: Sense | None
    """Sense the device sent along with success, if any (rare)."""
    resid: int
    """Bytes requested but not transferred (``dxfer_len`` - actual)."""
    duration_ms: int


class ScsiError(SwitchAgentError):
    """Base of SG_IO errors: ``device`` (e.g. ``sdb``), ``opcode`` and ``cdb`` of the command."""

    def __init__(self, device: str, opcode: int | None, message: str, *, cdb: bytes = b"") -> None:
        self.device = device
        self.opcode = opcode
        self.cdb = bytes(cdb)
        if opcode is None:
            where = device
        else:
            where = f"{device}: {command_name(self.cdb or bytes([opcode]))} (0x{opcode:02x})"
        super().__init__(f"{where}: {message}")


class ScsiCommandError(ScsiError):
    """The command completed unsuccessfully: a non-GOOD status, or a host/driver failure.

    ``str`` reads like ``sdb: GET PAGE MAP (0xc8): CHECK CONDITION, ILLEGAL REQUEST:
    INVALID FIELD IN CDB (24/00)``. ``sense`` is decoded sense or None; ``sense_bytes``
    the raw sense as the kernel returned it (kept even when it did not decode).
    """

    def __init__(
        self, device: str, opcode: int, status: int, host_status: int, driver_status: int,
        sense: Sense | None, *, cdb: bytes = b"", sense_bytes: bytes = b"",
    ) -> None:
        self.status = status
        self.host_status = host_status
        self.driver_status = driver_status
        self.sense = sense
        self.sense_bytes = bytes(sense_bytes)
        super().__init__(device, opcode, self._describe(), cdb=cdb)

    def _describe(self) -> str:
        text = _status_text(self.status)
        if self.sense is not None:
            text += f", {self.sense}"
        elif self.sense_bytes:
            text += f", undecodable sense {self.sense_bytes.hex()}"
        return text


class ScsiTransportError(ScsiCommandError):
    """The host adapter or driver failed the command (``host_status``/``driver_status``)."""

    def _describe(self) -> str:
        parts = []
        if self.host_status != DID_OK:
            name = HOST_STATUS_NAMES.get(self.host_status, "DID_?")
            parts.append(f"host {name} (0x{self.host_status:02x})")
        driver = self.driver_status & 0x0F
        if driver not in (0, DRIVER_SENSE):
            parts.append(f"driver {DRIVER_STATUS_NAMES.get(driver, 'DRIVER_?')} (0x{self.driver_status:02x})")
        if self.status not in _SUCCESS_STATUSES:
            parts.append(_status_text(self.status))
        return ", ".join(parts) or "transport failure"


class ScsiTimeoutError(ScsiTransportError):
    """The command timed out (host DID_TIME_OUT or driver DRIVER_TIMEOUT)."""

    def _describe(self) -> str:
        return f"timed out ({super()._describe()})"


class ScsiDeviceError(ScsiError):
    """No command completed: opening the node or the SG_IO ioctl failed with ``errno``."""

    def __init__(self, device: str, opcode: int | None, errno_: int, what: str = "SG_IO", *,
                 cdb: bytes = b"") -> None:
        self.errno = errno_
        super().__init__(device, opcode, f"{what} failed: {errno.errorcode.get(errno_, errno_)} "
                                         f"({os.strerror(errno_)})", cdb=cdb)


def sg_io(
    fd: int,
    cdb: bytes,
    *,
    data_in_length: int = 0,
    data_out: bytes | None = None,
    timeout_ms: int = DEFAULT_TIMEOUT_MS,
    device: str = "?",
    ioctl: IoctlFn = fcntl.ioctl,
) -> ScsiResult:
    """Send one CDB through SG_IO on ``fd`` (blocking) and return the result or raise a ScsiError.

    At most one of ``data_in_length`` and ``data_out``; ``device`` only names
    the device in log lines and errors.
    """
    cdb = bytes(cdb)
    if not 1 <= len(cdb) <= MAX_CDB_BYTES:
        raise ValueError(f"CDB length {len(cdb)} outside 1..{MAX_CDB_BYTES}")
    if data_in_length and data_out is not None:
        raise ValueError("SG_IO moves data one way: give data_in_length or data_out, not both")
    if not 0 <= data_in_length < 1 << 32:
        raise ValueError(f"data_in_length {data_in_length} outside 0..2^32-1")
    opcode = cdb[0]
    cdb_buf = ctypes.create_string_buffer(cdb, len(cdb))
    sense_buf = ctypes.create_string_buffer(SENSE_BUFFER_BYTES)
    hdr = SgIoHdr()
    hdr.interface_id = SG_INTERFACE_ID_ORIG
    hdr.cmd_len = len(cdb)
    hdr.cmdp = ctypes.addressof(cdb_buf)
    hdr.mx_sb_len = SENSE_BUFFER_BYTES
    hdr.sbp = ctypes.addressof(sense_buf)
    hdr.timeout = timeout_ms
    data_buf = None
    if data_out is not None:
        data_buf = ctypes.create_string_buffer(bytes(data_out), len(data_out))
        hdr.dxfer_direction = SG_DXFER_TO_DEV
        hdr.dxfer_len = len(data_out)
        hdr.dxferp = ctypes.addressof(data_buf) if len(data_out) else None
    elif data_in_length:
        data_buf = ctypes.create_string_buffer(data_in_length)
        hdr.dxfer_direction = SG_DXFER_FROM_DEV
        hdr.dxfer_len = data_in_length
        hdr.dxferp = ctypes.addressof(data_buf)
    else:
        hdr.dxfer_direction = SG_DXFER_NONE

    debug = LOG.isEnabledFor(logging.DEBUG)  # the names and hex are work: the idle daemon polls 64 LUNs
    if debug:
        LOG.debug("%s: SG_IO %s cdb=%s dxfer=%d dir=%d timeout=%dms", device, command_name(cdb),
                  cdb.hex(), hdr.dxfer_len, hdr.dxfer_direction, timeout_ms)
    try:
        ioctl(fd, SG_IO, hdr)
    except OSError as exc:
        err = exc.errno or errno.EIO
        if err == errno.ETIMEDOUT:
            raise ScsiTimeoutError(device, opcode, 0, DID_TIME_OUT, 0, None, cdb=cdb) from exc
        raise ScsiDeviceError(device, opcode, err, cdb=cdb) from exc

    # Each field read once: a ctypes field access is a call, and the idle daemon sends 64 polls a round.
    status = hdr.status or (hdr.masked_status << 1)
    host_status, driver_status, resid, duration = hdr.host_status, hdr.driver_status, hdr.resid, hdr.duration
    sense_len = min(hdr.sb_len_wr, SENSE_BUFFER_BYTES)
    sense_bytes = ctypes.string_at(sense_buf, sense_len) if sense_len else b""
    sense = _decode_sense(device, sense_bytes)
    driver = driver_status & 0x0F
    common = (device, opcode, status, host_status, driver_status, sense)
    if host_status == DID_TIME_OUT or driver == DRIVER_TIMEOUT:
        raise ScsiTimeoutError(*common, cdb=cdb, sense_bytes=sense_bytes)
    if host_status != DID_OK or driver not in (0, DRIVER_SENSE):
        raise ScsiTransportError(*common, cdb=cdb, sense_bytes=sense_bytes)
    if status not in _SUCCESS_STATUSES:
        raise ScsiCommandError(*common, cdb=cdb, sense_bytes=sense_bytes)

    data = b""
    if data_in_length and data_buf is not None:
        got = min(max(data_in_length - max(resid, 0), 0), data_in_length)
        data = ctypes.string_at(data_buf, got)  # not .raw: that copies the whole buffer first
    if debug:
        LOG.debug("%s: %s done: %d bytes in, resid %d, %d ms", device, command_name(cdb), len(data),
                  resid, duration)
    return ScsiResult(data_in=data, status=status, sense=sense, resid=resid, duration_ms=duration)


def _decode_sense(device: str, raw: bytes) -> Sense | None:
    if not raw:
        return None
    try:
        return decode_sense(raw)
    except DecodeError as exc:
        LOG.warning("%s: sense data did not decode (%s): %s", device, exc, raw.hex())
        return None


class ScsiDevice:
    """One path's sd node, opened for SG_IO; commands run in a thread, one at a time per device.

    ``executor`` is where the ioctls run: a pool shared by all paths (the
    daemon's, ``RealSystem``), or by default a private single-thread
    pool. Either way a device has at most one command in a worker: a path
    stuck in the SCSI error handler ties up one thread, never the loop or
    the loop's default pool (which aiofiles uses for sysfs).
    """

    def __init__(
        self,
        path: str,
        *,
        flags: int = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC,
        ioctl: IoctlFn = fcntl.ioctl,
        sysfs: Any = None,
        executor: concurrent.futures.Executor | None = None,
        timeout_ms: int = DEFAULT_TIMEOUT_MS,
    ) -> None:
        self.path = path
        self.name = os.path.basename(os.path.realpath(path))
        self.timeout_ms = timeout_ms
        self._ioctl = ioctl
        self._sysfs = sysfs
        self._max_transfer: int | None = None
        self._own_executor = executor is None
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"sgio-{self.name}")
        # Held from submit until the worker is done (not until the caller stops
        # waiting): a cancelled caller must not let a second command into a stuck path.
        self._one_at_a_time = asyncio.Lock()
        LOG.debug("%s: open %s flags=0x%x", self.name, path, flags)
        try:
            self._fd: int | None = os.open(path, flags)
        except OSError as exc:
            if self._own_executor:
                self._executor.shutdown(wait=False)
            raise ScsiDeviceError(self.name, None, exc.errno or errno.EIO, "open") from exc
        held = os.fstat(self._fd)
        self.opened_node = (held.st_ino, held.st_rdev)
        """The node the fd was opened on: a disk that goes and comes back gets a new one."""

    def fileno(self) -> int:
        """The open fd (raises ValueError once closed)."""
        if self._fd is None:
            raise ValueError(f"{self.name}: closed")
        return self._fd

    async def max_transfer_bytes(self) -> int:
        """The largest data-in/out one command may move: min(max_hw_sectors_kb, max_sectors_kb) KiB.

        Read from sysfs once and cached; SG_IO on a block device fails with EIO past it.
        """
        if self._max_transfer is None:
            if self._sysfs is None:
                from agent.kernel.sysfs import Sysfs

                self._sysfs = Sysfs()
            limits = await self._sysfs.queue_limits(self.name)
            self._max_transfer = limits.max_transfer_bytes
        return self._max_transfer

    async def execute(
        self, cdb: bytes, *, data_in_length: int = 0, data_out: bytes | None = None,
        timeout_ms: int | None = None,
    ) -> ScsiResult:
        """Send one CDB (in the device's thread) and return its result or raise a ScsiError."""
        dup, call = self._command(cdb, data_in_length, data_out, timeout_ms)
        try:
            await self._one_at_a_time.acquire()
        except BaseException:
            os.close(dup)
            raise
        loop = asyncio.get_running_loop()
        try:
            work = self._executor.submit(call)
        except BaseException:
            os.close(dup)
            self._one_at_a_time.release()
            raise
        work.add_done_callback(functools.partial(self._finished, loop, dup))
        return await asyncio.wrap_future(work)

    def _finished(self, loop: asyncio.AbstractEventLoop, dup: int, work: concurrent.futures.Future[Any]) -> None:
        """In the worker (or the canceller): the device is free again; a command never run closes its fd."""
        if work.cancelled():
            os.close(dup)
        try:
            loop.call_soon_threadsafe(self._one_at_a_time.release)
        except RuntimeError:
            pass  # the loop is closed: nobody is left to wait for the device

    def blocking(self) -> BlockingScsiDevice:
        """This device for a worker thread with many commands to run: see BlockingScsiDevice."""
        return BlockingScsiDevice(self)

    def _command(self, cdb: bytes, data_in_length: int, data_out: bytes | None,
                 timeout_ms: int | None) -> tuple[int, Callable[[], ScsiResult]]:
        """One command: the fd duplicate it runs on, and the call that runs it there (and closes it).

        The transfer is checked against the device's limit first. Each command
        gets its own duplicate, made where the command is issued: close() can
        then never leave a worker issuing the ioctl on a recycled fd number.
        """
        length = data_in_length or (len(data_out) if data_out is not None else 0)
        if self._max_transfer is not None and length > self._max_transfer:
            raise ValueError(f"{self.name}: transfer of {length} bytes exceeds the device's "
                             f"{self._max_transfer}-byte limit")
        try:
            dup = os.dup(self.fileno())
        except (OSError, ValueError) as exc:  # closed here or by another thread
            raise ScsiDeviceError(self.name, cdb[0], getattr(exc, "errno", None) or errno.EBADF, "dup",
                                  cdb=bytes(cdb)) from exc
        return dup, functools.partial(self._run, dup, bytes(cdb), data_in_length=data_in_length,
                                      data_out=data_out,
                                      timeout_ms=self.timeout_ms if timeout_ms is None else timeout_ms)

    def _run(self, dup: int, cdb: bytes, **kwargs: Any) -> ScsiResult:
        try:
            return sg_io(dup, cdb, device=self.name, ioctl=self._ioctl, **kwargs)
        finally:
            os.close(dup)

    def close(self) -> None:
        """Close the node; commands already running finish on their own fd."""
        if self._fd is not None:
            LOG.debug("%s: close", self.name)
            os.close(self._fd)
            self._fd = None
            if self._own_executor:
                self._executor.shutdown(wait=False)

    def __enter__(self) -> ScsiDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> ScsiDevice:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ScsiDevice({self.path!r})"


class _Finished(Generic[_T]):
    """An awaitable of a value that is already there."""

    def __init__(self, value: _T) -> None:
        self.value = value

    def __await__(self) -> Generator[Any, None, _T]:
        return self.value
        yield  # a generator, as __await__ must be; never reached


class BlockingScsiDevice:
    """A ScsiDevice whose ``execute`` runs the ioctl in the calling thread, blocking it.

    For a worker thread that runs many commands on an event loop of its own
    (the daemon's poll round): a hop to a worker and back per command cost
    more CPU than the SG_IO itself, and with many LUNs most of the idle
    daemon's (docs/benchmarks.md). Never on the daemon's loop: a stuck path
    blocks the thread that asked.
    """

    def __init__(self, device: ScsiDevice) -> None:
        self.device = device
        self.name = device.name

    async def max_transfer_bytes(self) -> int:
        return await self.device.max_transfer_bytes()

    def execute(
        self, cdb: bytes, *, data_in_length: int = 0, data_out: bytes | None = None,
        timeout_ms: int | None = None,
    ) -> Awaitable[ScsiResult]:
        """Send one CDB now, blocking this thread; raise a ScsiError, or return the result as a finished awaitable.

        Not a coroutine on purpose: the command has run when this returns. The
        awaitable only lets the map sources' async code (``await path.execute``) drive it unchanged.
        """
        _, call = self.device._command(cdb, data_in_length, data_out, timeout_ms)
        return _Finished(call())

    def __repr__(self) -> str:
        return f"BlockingScsiDevice({self.device.path!r})"
