"""A hostile array for the host tests: any fake path, its answers rewritten on the way back.

The array is a network peer, so every byte of every answer is untrusted.
HostilePath wraps the project's fake paths (FakeArrayPath, FakeLioPath)
and hands each command's CDB and answer to the test's `rewrite`; the
helpers forge GET PAGE MAP answers with their CRCs recomputed, so a test
reaches the checks behind them, and READ CAPACITY(16) answers.
"""

from __future__ import annotations

import struct
from types import SimpleNamespace
from typing import Any, Callable

from crc32c import crc32c

from protocol import pagemap, pagemap_changes, scsi

Rewrite = Callable[[bytes, bytes], bytes]
"""(cdb, the array's answer) -> the answer the host gets."""

# Offsets of the GET PAGE MAP header fields (docs/protocol.md section 2), and their struct formats.
PAGE_MAP_FIELDS = {
    "bits_per_entry": (5, ">B"), "member_count": (6, ">B"), "generation": (8, ">Q"),
    "page_size_sectors": (16, ">I"), "header_length": (20, ">H"), "total_pages": (24, ">Q"),
    "first_page": (32, ">Q"), "entry_count": (40, ">I"), "response_length": (44, ">I"),
}

CHANGES_FIELDS = {
    "status": (5, ">B"), "member_count": (6, ">B"), "to_generation": (8, ">Q"),
    "page_size_sectors": (16, ">I"), "header_length": (20, ">H"), "total_pages": (24, ">Q"),
    "from_generation": (32, ">Q"), "run_count": (40, ">I"), "response_length": (44, ">I"),
    "current_generation": (48, ">Q"),
}
"""GET PAGE MAP changes-since answer's header (protocol/pagemap_changes.py), laid out as PAGE_MAP_FIELDS."""


class CommandLimitError(Exception):
    """The test's own brake: an agent that never stops asking (not a SwitchAgentError, on purpose)."""


class HostilePath:
    """A path whose answers pass through `rewrite` (None: the array's own answers)."""

    def __init__(self, path: Any, rewrite: Rewrite | None = None, *, max_commands: int = 10_000) -> None:
        self.path = path
        self.rewrite = rewrite
        self.rewrite_cdb: Callable[[bytes], bytes] | None = None
        """Changes the command on its way to the array (e.g. a smaller allocation length)."""
        self.max_commands = max_commands
        self.commands = 0

    def __getattr__(self, name: str) -> Any:  # name, member_number, port, ...: the wrapped path's
        return getattr(self.path, name)

    def blocking(self) -> HostilePath:
        return self

    async def max_transfer_bytes(self) -> int:
        return await self.path.max_transfer_bytes()

    async def execute(self, cdb: bytes, *, data_in_length: int = 0, data_out: bytes | None = None):
        self.commands += 1
        if self.commands > self.max_commands:
            raise CommandLimitError(f"{self.path.name}: more than {self.max_commands} commands")
        sent = self.rewrite_cdb(cdb) if self.rewrite_cdb else cdb
        answer = (await self.path.execute(sent, data_in_length=data_in_length, data_out=data_out)).data_in
        if self.rewrite is not None:
            answer = self.rewrite(cdb, bytes(answer))
        return SimpleNamespace(data_in=bytes(answer)[:data_in_length])


def hostile_paths(system: Any, **kwargs: Any) -> dict[str, HostilePath]:
    """Wrap every path of a FakeSystem / FakeLioSystem in place; returns the wrappers by name."""
    system.paths = {name: HostilePath(path, **kwargs) for name, path in system.paths.items()}
    return system.paths


def is_get_page_map(cdb: bytes) -> bool:
    return cdb[0] == pagemap.GET_PAGE_MAP_OPCODE


def is_changes_since(cdb: bytes) -> bool:
    return pagemap_changes.is_changes_since_cdb(cdb)


def is_read_capacity_16(cdb: bytes) -> bool:
    return cdb[0] == scsi.Opcode.SERVICE_ACTION_IN_16 and cdb[1] & 0x1F == scsi.ServiceActionIn16.READ_CAPACITY_16


def is_report_referrals(cdb: bytes) -> bool:
    return cdb[0] == scsi.Opcode.SERVICE_ACTION_IN_16 and cdb[1] & 0x1F == scsi.ServiceActionIn16.REPORT_REFERRALS


def is_vpd(cdb: bytes, page: int) -> bool:
    return cdb[0] == scsi.Opcode.INQUIRY and cdb[1] & 0x01 and cdb[2] == page


def resign_page_map(buf: bytearray) -> bytes:
    """Recompute the header CRC and, where the answer holds it, the trailer CRC the header's length places."""
    if len(buf) >= pagemap.HEADER_FIXED_BYTES:
        struct.pack_into(">I", buf, 60, crc32c(bytes(buf[:60])))
        (length,) = struct.unpack_from(">I", buf, 44)
        end = length if 8 <= length <= len(buf) else len(buf)
        if end >= pagemap.HEADER_FIXED_BYTES + 4:
            struct.pack_into(">I", buf, end - 4, crc32c(bytes(buf[: end - 4])))
    return bytes(buf)


def forge_page_map(answer: bytes, **fields: int) -> bytes:
    """A GET PAGE MAP answer with header fields replaced (PAGE_MAP_FIELDS names) and re-signed."""
    return _forge(answer, PAGE_MAP_FIELDS, fields)


def forge_changes(answer: bytes, **fields: int) -> bytes:
    """A changes-since answer with header fields replaced (CHANGES_FIELDS names) and re-signed."""
    return _forge(answer, CHANGES_FIELDS, fields)


def _forge(answer: bytes, layout: dict[str, tuple[int, str]], fields: dict[str, int]) -> bytes:
    buf = bytearray(answer)
    for name, value in fields.items():
        offset, fmt = layout[name]
        struct.pack_into(fmt, buf, offset, value)
    return resign_page_map(buf)


def read_capacity_16(block_count: int, block_bytes: int) -> bytes:
    """READ CAPACITY(16) data saying `block_count` blocks (returned LBA = count - 1) of `block_bytes`."""
    return scsi.encode_read_capacity_16(scsi.ReadCapacity16Data(returned_lba=block_count - 1,
                                                                block_length_bytes=block_bytes))
