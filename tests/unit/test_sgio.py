"""agent.kernel.sgio with a fake kernel: the ioctl callable fills sg_io_hdr as the kernel does."""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import errno
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.kernel import sgio
from agent.kernel.sgio import (
    SG_DXFER_FROM_DEV,
    SG_DXFER_NONE,
    SG_DXFER_TO_DEV,
    SG_IO,
    ScsiCommandError,
    ScsiDevice,
    ScsiDeviceError,
    ScsiError,
    ScsiResult,
    ScsiTimeoutError,
    ScsiTransportError,
    SgIoHdr,
    command_name,
    sg_io,
)
from agent.kernel.sysfs import Sysfs
from protocol.errors import SwitchAgentError
from protocol.pagemap import build_get_page_map_cdb
from protocol.scsi.cdb import build_inquiry_cdb, build_read_capacity_16_cdb, build_test_unit_ready_cdb
from protocol.scsi.constants import AdditionalSense, ScsiStatus, SenseKey
from protocol.scsi.sense import Sense, encode_sense

# --- the fake kernel --------------------------------------------------------------


@dataclass
class Reply:
    """What the fake 'device' answers; fields land in the header like the kernel puts them."""

    data: bytes = b""
    status: int = 0
    sense: bytes = b""
    host_status: int = 0
    driver_status: int | None = None  # None: DRIVER_SENSE iff sense, as scsi_ioctl.c
    duration: int = 3
    resid: int | None = None  # None: dxfer_len - len(data)
    errno: int | None = None
    delay_s: float = 0.0


@dataclass
class Seen:
    """What the fake kernel saw in one call."""

    fd: int
    request: int
    cdb: bytes
    interface_id: int
    direction: int
    dxfer_len: int
    data_out: bytes
    timeout: int
    mx_sb_len: int
    thread: str


@dataclass
class FakeKernel:
    """An injectable ``ioctl`` that answers SG_IO from a script of Replies."""

    replies: list[Reply] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)

    def __call__(self, fd: int, request: int, hdr: SgIoHdr) -> int:
        assert isinstance(hdr, SgIoHdr)
        cdb = ctypes.string_at(hdr.cmdp, hdr.cmd_len)
        data_out = ctypes.string_at(hdr.dxferp, hdr.dxfer_len) if hdr.dxfer_direction == SG_DXFER_TO_DEV else b""
        self.seen.append(Seen(fd, request, cdb, hdr.interface_id, hdr.dxfer_direction, hdr.dxfer_len,
                              data_out, hdr.timeout, hdr.mx_sb_len, threading.current_thread().name))
        reply = self.replies.pop(0) if self.replies else Reply()
        if reply.delay_s:
            time.sleep(reply.delay_s)
        if reply.errno is not None:
            raise OSError(reply.errno, os.strerror(reply.errno))
        if hdr.dxfer_direction == SG_DXFER_FROM_DEV:
            n = min(len(reply.data), hdr.dxfer_len)
            ctypes.memmove(hdr.dxferp, reply.data, n)
            # bytes past n stay whatever they were: fill with junk the trim must drop
            ctypes.memset(hdr.dxferp + n, 0xEE, hdr.dxfer_len - n)
            hdr.resid = hdr.dxfer_len - n if reply.resid is None else reply.resid
        sense = reply.sense[: hdr.mx_sb_len]
        ctypes.memmove(hdr.sbp, sense, len(sense))
        hdr.sb_len_wr = len(sense)
        hdr.status = reply.status
        hdr.masked_status = reply.status >> 1
        hdr.host_status = reply.host_status
        hdr.driver_status = (0x08 if sense else 0) if reply.driver_status is None else reply.driver_status
        hdr.duration = reply.duration
        hdr.info = 1 if (hdr.masked_status or hdr.host_status or hdr.driver_status) else 0
        return 0


def sense_of(key: SenseKey, code: AdditionalSense, **kw) -> bytes:
    return encode_sense(Sense.of(key, code, **kw))


# --- struct layout ----------------------------------------------------------------

REFERENCE_OFFSETS = {  # docs: dm-switch-dm-ioctl-udev-sgio.md section 5, x86_64
    "interface_id": 0, "dxfer_direction": 4, "cmd_len": 8, "mx_sb_len": 9, "iovec_count": 10,
    "dxfer_len": 12, "dxferp": 16, "cmdp": 24, "sbp": 32, "timeout": 40, "flags": 44,
    "pack_id": 48, "usr_ptr": 56, "status": 64, "masked_status": 65, "msg_status": 66,
    "sb_len_wr": 67, "host_status": 68, "driver_status": 70, "resid": 72, "duration": 76, "info": 80,
}


@pytest.mark.skipif(ctypes.sizeof(ctypes.c_void_p) != 8, reason="offsets are for 64-bit")
def test_sg_io_hdr_layout_matches_the_reference() -> None:
    assert ctypes.sizeof(SgIoHdr) == 88
    assert {name: getattr(SgIoHdr, name).offset for name in REFERENCE_OFFSETS} == REFERENCE_OFFSETS
    assert SG_IO == 0x2285
    assert (SG_DXFER_NONE, SG_DXFER_TO_DEV, SG_DXFER_FROM_DEV) == (-1, -2, -3)


# --- sg_io ------------------------------------------------------------------------


def test_data_in_is_trimmed_by_resid_and_the_header_is_filled() -> None:
    kernel = FakeKernel([Reply(data=b"I" * 36, duration=7)])
    cdb = build_inquiry_cdb(allocation_length_bytes=96)
    result = sg_io(5, cdb, data_in_length=96, timeout_ms=1234, device="sdb", ioctl=kernel)
    assert result == ScsiResult(data_in=b"I" * 36, status=0, sense=None, resid=60, duration_ms=7)
    seen = kernel.seen[0]
    assert (seen.fd, seen.request, seen.cdb) == (5, SG_IO, cdb)
    assert seen.interface_id == ord("S")
    assert (seen.direction, seen.dxfer_len, seen.timeout) == (SG_DXFER_FROM_DEV, 96, 1234)
    assert seen.mx_sb_len == sgio.SENSE_BUFFER_BYTES


def test_resid_out_of_range_never_over_reads() -> None:
    kernel = FakeKernel([Reply(data=b"x" * 8, resid=-4), Reply(data=b"", resid=1000)])
    assert sg_io(3, build_inquiry_cdb(), data_in_length=8, ioctl=kernel).data_in == b"x" * 8
    assert sg_io(3, build_inquiry_cdb(), data_in_length=8, ioctl=kernel).data_in == b""


def test_data_out_and_no_data_directions() -> None:
    kernel = FakeKernel()
    sg_io(3, bytes([0x2A]) + bytes(9), data_out=b"payload", ioctl=kernel)
    sg_io(3, build_test_unit_ready_cdb(), ioctl=kernel)
    out, none = kernel.seen
    assert (out.direction, out.dxfer_len, out.data_out) == (SG_DXFER_TO_DEV, 7, b"payload")
    assert (none.direction, none.dxfer_len) == (SG_DXFER_NONE, 0)


def test_bad_arguments_are_refused_before_the_kernel() -> None:
    kernel = FakeKernel()
    with pytest.raises(ValueError):
        sg_io(3, b"", ioctl=kernel)
    with pytest.raises(ValueError):
        sg_io(3, bytes(33), ioctl=kernel)
    with pytest.raises(ValueError):
        sg_io(3, bytes(10), data_in_length=4, data_out=b"x", ioctl=kernel)
    assert kernel.seen == []


def test_check_condition_decodes_sense_into_the_error() -> None:
    kernel = FakeKernel([Reply(status=ScsiStatus.CHECK_CONDITION,
                               sense=sense_of(SenseKey.ILLEGAL_REQUEST, AdditionalSense.INVALID_FIELD_IN_CDB))])
    with pytest.raises(ScsiCommandError) as err:
        sg_io(3, build_get_page_map_cdb(0, 4096), data_in_length=4096, device="sdb", ioctl=kernel)
    e = err.value
    assert str(e) == "sdb: GET PAGE MAP (0xc8): CHECK CONDITION, ILLEGAL REQUEST: INVALID FIELD IN CDB (24/00)"
    assert (e.device, e.opcode, e.status, e.host_status, e.driver_status) == ("sdb", 0xC8, 2, 0, 0x08)
    assert e.sense is not None and e.sense.key == SenseKey.ILLEGAL_REQUEST
    assert (e.sense.asc, e.sense.ascq) == (0x24, 0x00)
    assert type(e) is ScsiCommandError and isinstance(e, ScsiError) and isinstance(e, SwitchAgentError)


def test_unit_attention_and_descriptor_sense() -> None:
    ua = encode_sense(Sense.of(SenseKey.UNIT_ATTENTION, AdditionalSense.INQUIRY_DATA_HAS_CHANGED,
                               descriptor_format=True))
    kernel = FakeKernel([Reply(status=ScsiStatus.CHECK_CONDITION, sense=ua)])
    with pytest.raises(ScsiCommandError) as err:
        sg_io(3, build_test_unit_ready_cdb(), device="sdc", ioctl=kernel)
    assert err.value.sense.key == SenseKey.UNIT_ATTENTION
    assert err.value.sense.additional_sense == AdditionalSense.INQUIRY_DATA_HAS_CHANGED
    assert str(err.value) == ("sdc: TEST UNIT READY (0x00): CHECK CONDITION, "
                              "UNIT ATTENTION: INQUIRY DATA HAS CHANGED (3f/03)")


def test_status_without_sense_and_undecodable_sense() -> None:
    kernel = FakeKernel([Reply(status=ScsiStatus.BUSY),
                         Reply(status=ScsiStatus.CHECK_CONDITION, sense=b"\x01\x02\x03")])
    with pytest.raises(ScsiCommandError, match=r"^sdb: INQUIRY \(0x12\): BUSY$") as err:
        sg_io(3, build_inquiry_cdb(), data_in_length=36, device="sdb", ioctl=kernel)
    assert err.value.sense is None and err.value.sense_bytes == b""
    with pytest.raises(ScsiCommandError, match="undecodable sense 010203") as err:
        sg_io(3, build_inquiry_cdb(), data_in_length=36, device="sdb", ioctl=kernel)
    assert err.value.sense is None and err.value.sense_bytes == b"\x01\x02\x03"


def test_host_errors_are_transport_errors() -> None:
    kernel = FakeKernel([Reply(host_status=0x0E)])
    with pytest.raises(ScsiTransportError) as err:
        sg_io(3, build_read_capacity_16_cdb(), data_in_length=32, device="sdd", ioctl=kernel)
    assert str(err.value) == "sdd: READ CAPACITY(16) (0x9e): host DID_TRANSPORT_DISRUPTED (0x0e)"
    assert isinstance(err.value, ScsiCommandError) and not isinstance(err.value, ScsiTimeoutError)


def test_driver_errors_are_transport_errors_but_driver_sense_is_not() -> None:
    kernel = FakeKernel([Reply(driver_status=0x04), Reply(data=b"ok", driver_status=0x08)])
    with pytest.raises(ScsiTransportError, match=r"driver DRIVER_ERROR \(0x04\)"):
        sg_io(3, build_inquiry_cdb(), data_in_length=36, ioctl=kernel)
    assert sg_io(3, build_inquiry_cdb(), data_in_length=36, ioctl=kernel).data_in == b"ok"


@pytest.mark.parametrize("reply", [Reply(host_status=0x03), Reply(driver_status=0x06), Reply(errno=errno.ETIMEDOUT)])
def test_timeouts(reply: Reply) -> None:
    with pytest.raises(ScsiTimeoutError, match=r"^sdb: GET PAGE MAP \(0xc8\): timed out"):
        sg_io(3, build_get_page_map_cdb(0, 64), data_in_length=64, device="sdb", ioctl=FakeKernel([reply]))


@pytest.mark.parametrize("err", [errno.EIO, errno.EPERM, errno.ENODEV])
def test_ioctl_failures_are_device_errors(err: int) -> None:
    with pytest.raises(ScsiDeviceError) as exc:
        sg_io(3, build_inquiry_cdb(), data_in_length=36, device="sdb", ioctl=FakeKernel([Reply(errno=err)]))
    assert exc.value.errno == err
    assert str(exc.value).startswith(f"sdb: INQUIRY (0x12): SG_IO failed: {errno.errorcode[err]}")
    assert not isinstance(exc.value, ScsiCommandError)


def test_command_names() -> None:
    assert command_name(build_read_capacity_16_cdb()) == "READ CAPACITY(16)"
    assert command_name(bytes([0xC9]) + bytes(9)) == "VENDOR COMMAND"
    assert command_name(bytes([0x12, 1, 0x83, 0, 0xFF, 0])) == "INQUIRY"


# --- ScsiDevice -------------------------------------------------------------------


def _node(tmp_path: Path, name: str = "sdb") -> str:
    """A stand-in device node (a plain file) and a sysfs tree with its queue limits."""
    node = tmp_path / "dev" / name
    node.parent.mkdir(parents=True, exist_ok=True)
    node.write_bytes(b"")
    queue = tmp_path / "sys" / "block" / name / "queue"
    queue.mkdir(parents=True)
    (queue / "max_hw_sectors_kb").write_text("32767\n")
    (queue / "max_sectors_kb").write_text("1280\n")
    (queue / "logical_block_size").write_text("512\n")
    return str(node)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_device_runs_the_ioctl_in_its_own_thread_and_reads_limits(tmp_path: Path) -> None:
    node = _node(tmp_path)
    kernel = FakeKernel([Reply(data=b"\x00" * 36)])
    before = _open_fds()

    async def main() -> ScsiResult:
        async with ScsiDevice(node, ioctl=kernel, sysfs=Sysfs(tmp_path / "sys")) as dev:
            assert dev.name == "sdb"
            assert await dev.max_transfer_bytes() == 1280 * 1024
            with pytest.raises(ValueError, match="exceeds"):
                await dev.execute(build_get_page_map_cdb(0, 2 << 20), data_in_length=2 << 20)
            return await dev.execute(build_inquiry_cdb(), data_in_length=36)

    result = asyncio.run(main())
    assert result.data_in == b"\x00" * 36
    assert len(kernel.seen) == 1
    assert kernel.seen[0].thread.startswith("sgio-sdb")
    assert _open_fds() == before


def test_a_slow_path_does_not_stall_the_loop(tmp_path: Path) -> None:
    node = _node(tmp_path)
    kernel = FakeKernel([Reply(delay_s=0.4)])

    async def main() -> int:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        t = asyncio.ensure_future(ticker())
        with ScsiDevice(node, ioctl=kernel) as dev:
            await dev.execute(build_test_unit_ready_cdb())
        t.cancel()
        return ticks

    assert asyncio.run(main()) >= 10


class GatedKernel:
    """An ioctl that holds each command of a gated device until released; counts commands inside per device."""

    def __init__(self, gated: str) -> None:
        self.gated, self.release = gated, threading.Event()
        self.entered = threading.Semaphore(0)
        self.inside: dict[str, int] = {}
        self.most_inside: dict[str, int] = {}
        self.done: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, fd: int, request: int, hdr: SgIoHdr) -> int:
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        with self._lock:
            self.inside[name] = self.inside.get(name, 0) + 1
            self.most_inside[name] = max(self.most_inside.get(name, 0), self.inside[name])
        self.entered.release()
        if name == self.gated:
            assert self.release.wait(10), "never released"
        with self._lock:
            self.inside[name] -= 1
            self.done.append(name)
        return 0


def test_a_shared_pool_keeps_one_command_per_device_and_a_stuck_path_to_itself(tmp_path: Path) -> None:
    stuck, healthy = _node(tmp_path, "sdb"), _node(tmp_path, "sdc")
    kernel = GatedKernel("sdb")
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=4)

    async def main() -> None:
        with ScsiDevice(stuck, ioctl=kernel, executor=pool) as a, ScsiDevice(healthy, ioctl=kernel, executor=pool) as b:
            first = asyncio.ensure_future(a.execute(build_test_unit_ready_cdb()))
            assert await asyncio.to_thread(kernel.entered.acquire, True, 10)
            # The first caller gives up; its command is still inside the kernel.
            first.cancel()
            second = asyncio.ensure_future(a.execute(build_test_unit_ready_cdb()))
            await b.execute(build_test_unit_ready_cdb())  # another path is not held up
            assert kernel.done == ["sdc"] and not second.done()
            kernel.release.set()
            await second
        assert first.cancelled()

    asyncio.run(main())
    pool.shutdown()
    assert kernel.most_inside == {"sdb": 1, "sdc": 1}
    assert sorted(kernel.done) == ["sdb", "sdb", "sdc"]


def test_a_command_cancelled_before_it_ran_leaves_no_fd_and_frees_the_device(tmp_path: Path) -> None:
    stuck, queued = _node(tmp_path, "sdb"), _node(tmp_path, "sdc")
    kernel = GatedKernel("sdb")
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)  # sdb's command takes the only worker

    async def main() -> None:
        with ScsiDevice(stuck, ioctl=kernel, executor=pool) as a, ScsiDevice(queued, ioctl=kernel, executor=pool) as b:
            before = _open_fds()
            held = asyncio.ensure_future(a.execute(build_test_unit_ready_cdb()))
            assert await asyncio.to_thread(kernel.entered.acquire, True, 10)
            waiting = asyncio.ensure_future(b.execute(build_test_unit_ready_cdb()))
            await asyncio.sleep(0)  # let it submit its work behind sdb's (an ordering step, not a wait)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            kernel.release.set()
            await held
            assert _open_fds() == before
            await b.execute(build_test_unit_ready_cdb())  # the device's turn was given back

    asyncio.run(main())
    pool.shutdown()
    assert kernel.done == ["sdb", "sdc"]


def test_a_blocking_device_runs_the_command_in_the_calling_thread(tmp_path: Path) -> None:
    node = _node(tmp_path)
    kernel = FakeKernel([Reply(data=b"\x01" * 36), Reply(status=ScsiStatus.CHECK_CONDITION,
                                                         sense=sense_of(SenseKey.UNIT_ATTENTION,
                                                                        AdditionalSense.CAPACITY_DATA_HAS_CHANGED))])
    before = _open_fds()

    async def main() -> ScsiResult:
        with ScsiDevice(node, ioctl=kernel, timeout_ms=700) as dev:
            path = dev.blocking()
            result = await path.execute(build_inquiry_cdb(), data_in_length=36)
            with pytest.raises(ScsiCommandError, match="UNIT ATTENTION"):
                await path.execute(build_test_unit_ready_cdb())
            return result

    results: list[ScsiResult] = []
    worker = threading.Thread(target=lambda: results.append(asyncio.run(main())), name="poller")
    worker.start()
    worker.join(10)
    assert results[0].data_in == b"\x01" * 36
    assert [seen.thread for seen in kernel.seen] == ["poller", "poller"]
    assert kernel.seen[0].timeout == 700
    assert _open_fds() == before


def test_errors_from_the_thread_reach_the_caller(tmp_path: Path) -> None:
    node = _node(tmp_path)
    kernel = FakeKernel([Reply(status=ScsiStatus.CHECK_CONDITION,
                               sense=sense_of(SenseKey.NOT_READY,
                                              AdditionalSense.LOGICAL_UNIT_NOT_READY_CAUSE_NOT_REPORTABLE))])

    async def main() -> None:
        with ScsiDevice(node, ioctl=kernel) as dev:
            await dev.execute(build_test_unit_ready_cdb(), timeout_ms=500)

    with pytest.raises(ScsiCommandError, match="NOT READY") as err:
        asyncio.run(main())
    assert err.value.device == "sdb"
    assert kernel.seen[0].timeout == 500


def test_open_failure_is_a_device_error(tmp_path: Path) -> None:
    with pytest.raises(ScsiDeviceError) as err:
        ScsiDevice(str(tmp_path / "sdz"))
    assert err.value.errno == errno.ENOENT
    assert str(err.value).startswith("sdz: open failed: ENOENT")


def test_closed_device_refuses_commands(tmp_path: Path) -> None:
    dev = ScsiDevice(_node(tmp_path), ioctl=FakeKernel())
    dev.close()
    dev.close()  # idempotent
    with pytest.raises(ScsiDeviceError) as err:
        asyncio.run(dev.execute(build_test_unit_ready_cdb()))
    assert err.value.errno == errno.EBADF
    with pytest.raises(ScsiDeviceError):
        asyncio.run(dev.blocking().execute(build_test_unit_ready_cdb()))


def test_the_real_ioctl_accepts_the_header(tmp_path: Path) -> None:
    """fcntl.ioctl takes the ctypes header as a mutable buffer; a plain file answers ENOTTY."""
    node = _node(tmp_path)
    fd = os.open(node, os.O_RDONLY)
    try:
        with pytest.raises(ScsiDeviceError) as err:
            sg_io(fd, build_test_unit_ready_cdb(), device="file")
    finally:
        os.close(fd)
    assert err.value.errno == errno.ENOTTY
