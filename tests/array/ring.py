"""The TCMU shared command ring (include/uapi/linux/target_core_user.h), walked in pure Python.

Works on any writable buffer laid out per the ABI: the mmap of /dev/uioN in
the guest, or a bytearray in host unit tests. Nothing here touches a file
descriptor: the caller kicks the kernel (a 4-byte write) after `process`.

Layout (x86_64, little-endian, all packed):
  mailbox   version u16 @0, flags u16 @2, cmdr_off u32 @4, cmdr_size u32 @8,
            cmd_head u32 @12 (kernel writes), cmd_tail u32 @64 (we write)
  entry     len_op u32 @0 (length | opcode in the low 3 bits), cmd_id u16 @4,
            kflags u8 @6, uflags u8 @7
  request   iov_cnt u32 @8, iov_bidi_cnt u32 @12, iov_dif_cnt u32 @16,
            cdb_off u64 @24, iov[] {base u64, len u64} @48
  response  scsi_status u8 @8, read_len u32 @12, sense_buffer[96] @16
cdb_off and iov base are offsets from the start of the mapping.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

from tests.array.errors import RingError

MAILBOX_VERSION = 2
MAILBOX_FLAG_CAP_OOOC = 1 << 0
MAILBOX_FLAG_CAP_READ_LEN = 1 << 1
MAILBOX_FLAG_CAP_TMR = 1 << 2
MAILBOX_FLAG_CAP_KEEP_BUF = 1 << 3

OP_PAD = 0
OP_CMD = 1
OP_TMR = 2
OP_MASK = 0x7

UFLAG_UNKNOWN_OP = 0x1
UFLAG_READ_LEN = 0x2

SENSE_BUFFER_BYTES = 96
ENTRY_BYTES = 112
"""sizeof(struct tcmu_cmd_entry) without iovecs; entries are 8-byte aligned."""

MAILBOX = struct.Struct("<HHIII")  # version, flags, cmdr_off, cmdr_size, cmd_head
CMD_TAIL_OFFSET = 64
CMD_HEAD_OFFSET = 12
ENTRY_HEADER = struct.Struct("<IHBB")  # len_op, cmd_id, kflags, uflags
REQUEST = struct.Struct("<III4xQ")  # iov_cnt, iov_bidi_cnt, iov_dif_cnt, cdb_off (at +8)
REQUEST_OFFSET = 8
IOV_OFFSET = 48
IOVEC = struct.Struct("<QQ")
RESPONSE = struct.Struct("<BxxxI")  # scsi_status, read_len (at +8)
RESPONSE_OFFSET = 8
SENSE_OFFSET = 16
UFLAGS_OFFSET = 7

# Length of a CDB by its group code, as the kernel's scsi_command_size() uses:
# vendor opcodes 0xC0-0xFF therefore arrive as 10 bytes.
_CDB_LENGTH_BY_GROUP = (6, 10, 10, 12, 16, 12, 10, 10)
_VARIABLE_LENGTH_OPCODE = 0x7F


def cdb_length(opcode: int) -> int:
    """Bytes the kernel copies into the ring for a CDB starting with `opcode`."""
    return _CDB_LENGTH_BY_GROUP[(opcode >> 5) & 7]


@dataclass(frozen=True)
class Completion:
    """What a command handler answers: SCSI status, data-in bytes, sense bytes."""

    status: int
    data_in: bytes | bytearray | memoryview = b""
    sense: bytes = b""


class RingCommand:
    """One CMD entry while it is being handled: its CDB and its data buffers.

    The buffers are views into the shared mapping, valid only until the
    entry is completed.
    """

    def __init__(self, ring: CommandRing, entry_offset: int, cmd_id: int, cdb: bytes,
                 iovecs: list[tuple[int, int]]) -> None:
        self._ring = ring
        self.entry_offset = entry_offset
        self.cmd_id = cmd_id
        self.cdb = cdb
        self.iovecs = iovecs
        self.data_length = sum(length for _base, length in iovecs)

    def buffers(self) -> list[memoryview]:
        """The data-area slices of this command, in order."""
        view = self._ring.view
        return [view[base : base + length] for base, length in self.iovecs]

    def gather(self) -> bytes | memoryview:
        """The data-out bytes (one view when there is a single iovec: no copy)."""
        buffers = self.buffers()
        if len(buffers) == 1:
            return buffers[0]
        return b"".join(buffers)

    def scatter(self, data: bytes | bytearray | memoryview) -> int:
        """Copy data-in into the iovecs; return how many bytes fitted."""
        data = memoryview(data).cast("B")
        done = 0
        for buffer in self.buffers():
            if done >= len(data):
                break
            chunk = min(len(buffer), len(data) - done)
            buffer[:chunk] = data[done : done + chunk]
            done += chunk
        return done


CommandHandler = Callable[[RingCommand], Completion]


class CommandRing:
    """The mailbox and command ring of one TCMU device, over a writable buffer."""

    def __init__(self, buffer: bytearray | memoryview | object) -> None:
        self.view = memoryview(buffer).cast("B")  # type: ignore[arg-type]
        if len(self.view) < CMD_TAIL_OFFSET + 4:
            raise RingError(f"mapping of {len(self.view)} bytes is smaller than the mailbox")
        version, flags, cmdr_off, cmdr_size, _head = MAILBOX.unpack_from(self.view, 0)
        if version != MAILBOX_VERSION:
            raise RingError(f"mailbox version {version}, this handler speaks {MAILBOX_VERSION}")
        if cmdr_size == 0 or cmdr_off + cmdr_size > len(self.view) or cmdr_off < CMD_TAIL_OFFSET + 4:
            raise RingError(f"command ring at {cmdr_off}+{cmdr_size} does not fit a "
                            f"{len(self.view)}-byte mapping")
        self.flags = flags
        self.cmdr_off = cmdr_off
        self.cmdr_size = cmdr_size

    @property
    def head(self) -> int:
        """cmd_head: where the kernel will put its next entry."""
        return struct.unpack_from("<I", self.view, CMD_HEAD_OFFSET)[0]

    @property
    def tail(self) -> int:
        """cmd_tail: the first entry we have not completed."""
        return struct.unpack_from("<I", self.view, CMD_TAIL_OFFSET)[0]

    def _set_tail(self, tail: int) -> None:
        struct.pack_into("<I", self.view, CMD_TAIL_OFFSET, tail)

    def process(self, handler: CommandHandler) -> int:
        """Complete every entry between cmd_tail and cmd_head; return how many were CMDs.

        Entries are completed in ring order (we never claim out-of-order
        completion), so advancing cmd_tail past each one is the completion.
        """
        completed = 0
        tail = self.tail
        while tail != self.head:
            offset = self.cmdr_off + tail
            len_op, cmd_id, _kflags, _uflags = ENTRY_HEADER.unpack_from(self.view, offset)
            length = len_op & ~OP_MASK
            op = len_op & OP_MASK
            if length == 0 or length % 8 or tail + length > self.cmdr_size:
                raise RingError(f"entry at ring offset {tail} has length {length} "
                                f"(ring of {self.cmdr_size} bytes)")
            if op == OP_CMD:
                command = self._read_command(offset, cmd_id, length)
                self._respond(command, handler(command))
                completed += 1
            elif op != OP_PAD:
                # TMR (only sent when tmr_notification is set) and anything
                # newer: tell the kernel we do not know it, then move on.
                self.view[offset + UFLAGS_OFFSET] |= UFLAG_UNKNOWN_OP
            tail = (tail + length) % self.cmdr_size
            self._set_tail(tail)
        return completed

    def _read_command(self, offset: int, cmd_id: int, length: int) -> RingCommand:
        iov_cnt, bidi_cnt, _dif_cnt, cdb_off = REQUEST.unpack_from(self.view, offset + REQUEST_OFFSET)
        count = iov_cnt + bidi_cnt
        if IOV_OFFSET + count * IOVEC.size > length:
            raise RingError(f"entry {cmd_id}: {count} iovecs overflow its {length} bytes")
        iovecs = []
        for i in range(iov_cnt):
            base, iov_len = IOVEC.unpack_from(self.view, offset + IOV_OFFSET + i * IOVEC.size)
            if base + iov_len > len(self.view):
                raise RingError(f"entry {cmd_id}: iovec {i} at {base}+{iov_len} is outside the mapping")
            iovecs.append((base, iov_len))
        if cdb_off >= len(self.view):
            raise RingError(f"entry {cmd_id}: CDB offset {cdb_off} is outside the mapping")
        size = cdb_length(self.view[cdb_off])
        if self.view[cdb_off] == _VARIABLE_LENGTH_OPCODE:
            size = 8 + self.view[cdb_off + 7]  # additional CDB length in byte 7
        cdb = bytes(self.view[cdb_off : cdb_off + size])
        return RingCommand(self, offset, cmd_id, cdb, iovecs)

    def _respond(self, command: RingCommand, completion: Completion) -> None:
        offset = command.entry_offset
        read_len = command.scatter(completion.data_in) if completion.data_in else 0
        uflags = self.view[offset + UFLAGS_OFFSET] & ~(UFLAG_READ_LEN | UFLAG_UNKNOWN_OP)
        # A short data-in: say how much is valid. The kernel reads read_len
        # only for data-in commands, so setting it on a write is harmless.
        if read_len < command.data_length and self.flags & MAILBOX_FLAG_CAP_READ_LEN:
            uflags |= UFLAG_READ_LEN
        # The response overlays the request: write it only after the request
        # (iovecs, CDB) has been consumed.
        RESPONSE.pack_into(self.view, offset + RESPONSE_OFFSET, completion.status, read_len)
        sense = completion.sense[:SENSE_BUFFER_BYTES]
        start = offset + SENSE_OFFSET
        self.view[start : start + SENSE_BUFFER_BYTES] = sense.ljust(SENSE_BUFFER_BYTES, b"\0")
        self.view[offset + UFLAGS_OFFSET] = uflags
