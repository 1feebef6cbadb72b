"""The TCMU ring walker on a fake mapping laid out per include/uapi/linux/target_core_user.h."""

from __future__ import annotations

import struct

import pytest

from tests.array import ring as r
from tests.array.errors import RingError

CMDR_OFF = 128
CMDR_SIZE = 4096
DATA_OFF = CMDR_OFF + CMDR_SIZE
DATA_SIZE = 64 * 1024


class FakeKernel:
    """Plays the kernel's side: appends entries at cmd_head as tcmu_queue_cmd does."""

    def __init__(self, flags: int = 0xF) -> None:
        self.buf = bytearray(DATA_OFF + DATA_SIZE)
        struct.pack_into("<HHIII", self.buf, 0, 2, flags, CMDR_OFF, CMDR_SIZE, 0)
        self.data_next = DATA_OFF

    @property
    def head(self) -> int:
        return struct.unpack_from("<I", self.buf, 12)[0]

    @property
    def tail(self) -> int:
        return struct.unpack_from("<I", self.buf, 64)[0]

    def _advance(self, length: int) -> None:
        struct.pack_into("<I", self.buf, 12, (self.head + length) % CMDR_SIZE)

    def pad_to_end(self) -> None:
        """What the kernel does when an entry would not fit before the ring's end."""
        length = CMDR_SIZE - self.head
        struct.pack_into("<IHBB", self.buf, CMDR_OFF + self.head, length | r.OP_PAD, 0, 0, 0)
        self._advance(length)

    def queue(self, cmd_id: int, cdb: bytes, iov_lengths: list[int], data: bytes = b"",
              op: int = r.OP_CMD) -> int:
        """Append an entry; data-out bytes are spread over the iovecs. Returns the entry offset."""
        iovs = []
        for length in iov_lengths:
            iovs.append((self.data_next, length))
            self.data_next += length
        pos = 0
        for base, length in iovs:
            self.buf[base : base + length] = data[pos : pos + length].ljust(length, b"\0")
            pos += length
        cdb_rel = r.IOV_OFFSET + 16 * len(iovs)
        length = (cdb_rel + len(cdb) + 7) & ~7
        length = max(length, r.ENTRY_BYTES)
        if self.head + length > CMDR_SIZE:
            self.pad_to_end()
        entry = CMDR_OFF + self.head
        self.buf[entry : entry + length] = bytes(length)
        struct.pack_into("<IHBB", self.buf, entry, length | op, cmd_id, 0, 0)
        struct.pack_into("<IIIxxxxQ", self.buf, entry + 8, len(iovs), 0, 0, entry + cdb_rel)
        for i, (base, iov_len) in enumerate(iovs):
            struct.pack_into("<QQ", self.buf, entry + 48 + 16 * i, base, iov_len)
        self.buf[entry + cdb_rel : entry + cdb_rel + len(cdb)] = cdb
        self._advance(length)
        return entry

    def response(self, entry: int) -> tuple[int, int, int, bytes]:
        """(uflags, scsi_status, read_len, sense) of a completed entry."""
        uflags = self.buf[entry + 7]
        status, read_len = struct.unpack_from("<BxxxI", self.buf, entry + 8)
        return uflags, status, read_len, bytes(self.buf[entry + 16 : entry + 16 + 96])


def test_mailbox_is_checked() -> None:
    kernel = FakeKernel()
    struct.pack_into("<H", kernel.buf, 0, 1)
    with pytest.raises(RingError, match="version"):
        r.CommandRing(kernel.buf)
    kernel = FakeKernel()
    struct.pack_into("<I", kernel.buf, 8, 10**9)
    with pytest.raises(RingError, match="does not fit"):
        r.CommandRing(kernel.buf)


def test_empty_ring_does_nothing() -> None:
    kernel = FakeKernel()
    ring = r.CommandRing(kernel.buf)
    assert ring.process(lambda cmd: pytest.fail("no command expected")) == 0


def test_data_out_gathered_across_iovecs_and_tail_advanced() -> None:
    kernel = FakeKernel()
    ring = r.CommandRing(kernel.buf)
    payload = bytes(range(256)) * 12
    cdb = bytes([0x2A, 0, 0, 0, 0, 8, 0, 0, 6, 0])
    entry = kernel.queue(7, cdb, [1024, 2048], payload[:3072])
    seen = []

    def handler(cmd: r.RingCommand) -> r.Completion:
        seen.append((cmd.cmd_id, cmd.cdb, bytes(cmd.gather()), cmd.data_length))
        return r.Completion(0)

    assert ring.process(handler) == 1
    assert seen == [(7, cdb, payload[:3072], 3072)]
    assert kernel.tail == kernel.head
    assert kernel.response(entry)[1] == 0


def test_data_in_scattered_and_short_read_flagged() -> None:
    kernel = FakeKernel()
    ring = r.CommandRing(kernel.buf)
    entry = kernel.queue(1, bytes([0x12, 0, 0, 0, 255, 0]), [100, 200])
    # The response overlays the request: note the iovecs before completing.
    base0, base1 = (struct.unpack_from("<Q", kernel.buf, entry + off)[0] for off in (48, 64))
    data = bytes(range(150))
    ring.process(lambda cmd: r.Completion(0, data))
    uflags, status, read_len, _ = kernel.response(entry)
    assert (status, read_len) == (0, 150)
    assert uflags & r.UFLAG_READ_LEN
    assert bytes(kernel.buf[base0 : base0 + 100]) == data[:100]
    assert bytes(kernel.buf[base1 : base1 + 50]) == data[100:]


def test_full_read_sets_no_read_len_flag() -> None:
    kernel = FakeKernel()
    ring = r.CommandRing(kernel.buf)
    entry = kernel.queue(1, bytes([0x28] + [0] * 9), [512])
    ring.process(lambda cmd: r.Completion(0, b"x" * 512))
    assert not kernel.response(entry)[0] & r.UFLAG_READ_LEN


def test_no_read_len_without_the_capability() -> None:
    kernel = FakeKernel(flags=0)
    ring = r.CommandRing(kernel.buf)
    entry = kernel.queue(1, bytes(6), [512])
    ring.process(lambda cmd: r.Completion(0, b"x"))
    assert not kernel.response(entry)[0] & r.UFLAG_READ_LEN


def test_check_condition_carries_sense() -> None:
    kernel = FakeKernel()
    ring = r.CommandRing(kernel.buf)
    entry = kernel.queue(3, bytes([0xEE] + [0] * 9), [])
    sense = bytes([0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x20, 0])
    ring.process(lambda cmd: r.Completion(2, b"", sense))
    _uflags, status, _len, got = kernel.response(entry)
    assert status == 2
    assert got == sense.ljust(96, b"\0")


def test_cdb_length_follows_the_group_code() -> None:
    kernel = FakeKernel()
    ring = r.CommandRing(kernel.buf)
    # A vendor opcode arrives as 10 bytes, a READ(16) as 16, a TUR as 6.
    kernel.queue(1, bytes([0xC8]) + bytes(range(1, 16)), [])
    kernel.queue(2, bytes([0x88]) + bytes(15), [])
    kernel.queue(3, bytes(6), [])
    lengths = []
    ring.process(lambda cmd: (lengths.append(len(cmd.cdb)), r.Completion(0))[1])
    assert lengths == [10, 16, 6]


def test_pad_entries_and_wrap_around() -> None:
    kernel = FakeKernel()
    ring = r.CommandRing(kernel.buf)
    ids = []
    handler = lambda cmd: (ids.append(cmd.cmd_id), r.Completion(0))[1]  # noqa: E731
    for round_ in range(3):
        for i in range(30):
            kernel.queue(round_ * 100 + i, bytes(10), [])
            ring.process(handler)
    assert ids == [round_ * 100 + i for round_ in range(3) for i in range(30)]
    assert kernel.tail == kernel.head


def test_unknown_entry_op_is_flagged_and_skipped() -> None:
    kernel = FakeKernel()
    ring = r.CommandRing(kernel.buf)
    tmr = kernel.queue(9, bytes(10), [], op=r.OP_TMR)
    kernel.queue(10, bytes(10), [])
    ids = []
    assert ring.process(lambda cmd: (ids.append(cmd.cmd_id), r.Completion(0))[1]) == 1
    assert ids == [10]
    assert kernel.buf[tmr + 7] & r.UFLAG_UNKNOWN_OP


def test_bad_entry_length_raises() -> None:
    kernel = FakeKernel()
    ring = r.CommandRing(kernel.buf)
    entry = kernel.queue(1, bytes(10), [])
    struct.pack_into("<I", kernel.buf, entry, 12 | r.OP_CMD)  # not 8-aligned
    with pytest.raises(RingError, match="length"):
        ring.process(lambda cmd: r.Completion(0))


def test_iovec_outside_the_mapping_raises() -> None:
    kernel = FakeKernel()
    ring = r.CommandRing(kernel.buf)
    entry = kernel.queue(1, bytes(10), [16])
    struct.pack_into("<Q", kernel.buf, entry + 48, len(kernel.buf))
    with pytest.raises(RingError, match="outside"):
        ring.process(lambda cmd: r.Completion(0))
