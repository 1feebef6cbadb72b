"""An oracle for dm-switch's ``set_region_mappings``: what the kernel does with a message, token by token.

Written from ``switch_message`` and ``process_set_region_mappings``
(``drivers/md/dm-switch.c``, target 1.1.0) and ``dm_split_args``
(``drivers/md/dm-table.c``) alone. It imports nothing from the encoder
(protocol.dmswitch_encoder), so tests and the fake kernel can check what the
encoder sends against it. Pure, no I/O.
"""

from __future__ import annotations

import re

import numpy as np

from protocol.dmtable import MESSAGE_NAME
from protocol.errors import DmSwitchMessageError

__all__ = ["apply_region_mappings", "split_message_args", "region_table_entry_bits"]


_U64 = 2**64 - 1


_KSPACE = b" \t\n\v\f\r\xa0"  # kernel isspace (lib/ctype.c marks 0xa0 as space too)


_HEXVAL = {c: int(chr(c), 16) for c in b"0123456789abcdefABCDEF"}


_FAST_LIT = re.compile(rb"([0-9a-fA-F]*):([0-9a-fA-F]+)")


_FAST_REP = re.compile(rb"[Rr]([0-9a-fA-F]+),([0-9a-fA-F]+)")


def region_table_entry_bits(nr_paths: int) -> int:
    """Bits per region table entry: grows from 1 while (1 << bits) < nr_paths (alloc_region_table)."""
    bits = 1
    while bits < 64 and (1 << bits) < nr_paths:
        bits += 1
    return bits


def split_message_args(message: str | bytes) -> list[bytes]:
    """Split a message into argv the way dm_split_args (dm-table.c) does: whitespace, backslash escapes, NUL ends it."""
    data = message.encode() if isinstance(message, str) else bytes(message)
    data = data.split(b"\0", 1)[0]
    if b"\\" not in data and b"\xa0" not in data:
        return data.split()  # bytes.split splits on exactly the ASCII isspace set
    argv: list[bytes] = []
    i, n = 0, len(data)
    while True:
        while i < n and data[i] in _KSPACE:
            i += 1
        if i >= n:
            return argv
        tok = bytearray()
        while i < n:
            c = data[i]
            if c == 0x5C and i + 1 < n:  # everything but NUL can be quoted
                tok.append(data[i + 1])
                i += 2
                continue
            if c in _KSPACE:
                break
            tok.append(c)
            i += 1
        argv.append(bytes(tok))
        if i < n:
            i += 1


def _parse_hex(s: bytes, i: int) -> tuple[int, int]:
    """parse_hex: consume hex digits from s[i:], no overflow check (wraps at 64 bits); returns (value, next index)."""
    r = 0
    n = len(s)
    while i < n and s[i] in _HEXVAL:
        r = ((r << 4) | _HEXVAL[s[i]]) & _U64
        i += 1
    return r, i


def _reject(argv: list[bytes], i: int, reason: str) -> DmSwitchMessageError:
    return DmSwitchMessageError(argv[i].decode("latin-1"), i, reason, applied=max(0, i - 1))


def apply_region_mappings(table: np.ndarray, message: str | bytes, nr_paths: int) -> None:
    """Apply one message to ``table`` exactly as the kernel would, mutating it.

    ``table[i]`` is region i's path; len(table) is nr_regions. Follows
    switch_message and process_set_region_mappings (dm-switch.c): argv[0]
    must equal ``set_region_mappings`` ignoring case; tokens apply one by
    one, so on a bad token the ones before it stay applied and
    DmSwitchMessageError names the token (``position`` is its argv index,
    ``applied`` how many tokens were applied). R copies read entries
    masked to the table's entry width, as switch_region_table_read does.
    """
    nr_regions = len(table)
    if nr_regions < 1:
        raise ValueError("a dm-switch table has at least one region")
    if nr_paths < 1:
        raise ValueError("nr_paths must be at least 1")
    mask = (1 << region_table_entry_bits(nr_paths)) - 1
    argv = split_message_args(message)
    if not argv:
        raise DmSwitchMessageError("", 0, "empty message")
    if argv[0].lower() != MESSAGE_NAME.encode():
        raise _reject(argv, 0, "Unrecognised message received.")
    region_index = 0
    for i in range(1, len(argv)):
        s = argv[i]
        if s[:1] in (b"R", b"r"):
            m = _FAST_REP.fullmatch(s)
            if m is not None:
                cycle_length = int(m.group(1), 16) & _U64
                num_write = int(m.group(2), 16) & _U64
            else:
                j = 1
                if j < len(s) and s[j] == 0x2C:
                    raise _reject(argv, i, "invalid set_region_mappings argument")
                cycle_length, j = _parse_hex(s, j)
                if j >= len(s) or s[j] != 0x2C:
                    raise _reject(argv, i, "invalid set_region_mappings argument")
                j += 1
                if j >= len(s):
                    raise _reject(argv, i, "invalid set_region_mappings argument")
                num_write, j = _parse_hex(s, j)
                if j < len(s):
                    raise _reject(argv, i, "invalid set_region_mappings argument")
            if cycle_length == 0 or cycle_length - 1 > region_index:
                raise _reject(argv, i, f"invalid set_region_mappings cycle length: {cycle_length - 1} > {region_index}")
            if region_index + num_write > _U64 or region_index + num_write >= nr_regions:
                raise _reject(
                    argv, i, f"invalid set_region_mappings region number: {region_index} + {num_write} >= {nr_regions}"
                )
            if num_write:
                lo = region_index + 1
                src = table[lo - cycle_length : lo - cycle_length + min(num_write, cycle_length)]
                if src.size and (int(src.max()) > mask or int(src.min()) < 0):
                    src = src.astype(np.int64) & mask
                if num_write <= cycle_length:
                    table[lo : lo + num_write] = src
                else:
                    # Each copy reads a region written cycle_length steps
                    # earlier, so the output repeats the first cycle.
                    table[lo : lo + num_write] = np.resize(src, num_write)
                region_index += num_write
            continue

        m = _FAST_LIT.fullmatch(s)
        if m is not None:
            region_index = region_index + 1 if not m.group(1) else int(m.group(1), 16) & _U64
            path_nr = int(m.group(2), 16) & _U64
        else:
            if s[:1] == b":":
                region_index += 1
                j = 0
            else:
                region_index, j = _parse_hex(s, 0)
                if j >= len(s) or s[j] != 0x3A:
                    raise _reject(argv, i, "invalid set_region_mappings argument")
            j += 1
            if j >= len(s):
                raise _reject(argv, i, "invalid set_region_mappings argument")
            path_nr, j = _parse_hex(s, j)
            if j < len(s):
                raise _reject(argv, i, "invalid set_region_mappings argument")
        if region_index >= nr_regions:
            raise _reject(argv, i, f"invalid set_region_mappings region number: {region_index} >= {nr_regions}")
        if path_nr >= nr_paths:
            raise _reject(argv, i, f"invalid set_region_mappings device: {path_nr} >= {nr_paths}")
        table[region_index] = path_nr
