"""Shared helpers for the SCSI codecs: length checks, range checks, ASCII fields.

Private to ``protocol.scsi``. Conventions every codec follows:

- Decoders take ``bytes``, ``bytearray`` or ``memoryview`` and raise only
  ``DecodeError`` subclasses. A ``TruncatedError`` always carries, as
  ``expected``, the total number of bytes the structure needs (an ``int``),
  so a caller can re-issue the command with that allocation length.
- Encoders raise ``EncodeError`` for anything the format cannot express.
"""

from __future__ import annotations

from enum import IntEnum
from typing import TypeVar

from protocol.errors import EncodeError, TruncatedError

Buffer = bytes | bytearray | memoryview

_E = TypeVar("_E", bound=IntEnum)


def need(codec: str, field: str, data: bytes, length: int) -> None:
    """Raise TruncatedError unless ``data`` holds at least ``length`` bytes."""
    if len(data) < length:
        raise TruncatedError(codec, field, length, len(data))


def check_uint(codec: str, field: str, value: object, bits: int) -> int:
    """Return ``value`` if it is an int that fits in ``bits`` unsigned bits, else EncodeError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value >> bits:
        raise EncodeError(
            f"{codec}: {field}: expected an integer in 0..{(1 << bits) - 1}, got {value!r}"
        )
    return value


def check_bytes(codec: str, field: str, value: object, max_length: int) -> bytes:
    """Return ``value`` as bytes if it is bytes-like and at most ``max_length`` long."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise EncodeError(f"{codec}: {field}: expected bytes, got {type(value).__name__}")
    raw = bytes(value)
    if len(raw) > max_length:
        raise EncodeError(f"{codec}: {field}: at most {max_length} bytes, got {len(raw)}")
    return raw


def encode_ascii(codec: str, field: str, text: object, width: int | None = None) -> bytes:
    """Printable ASCII (0x20-0x7e), left-aligned and space-padded to ``width`` if given."""
    if not isinstance(text, str):
        raise EncodeError(f"{codec}: {field}: expected str, got {type(text).__name__}")
    if not text.isascii() or not text.isprintable():
        raise EncodeError(f"{codec}: {field}: only printable ASCII allowed, got {text!r}")
    raw = text.encode("ascii")
    if width is not None:
        if len(raw) > width:
            raise EncodeError(f"{codec}: {field}: at most {width} characters, got {len(raw)}")
        raw = raw.ljust(width, b" ")
    return raw


def decode_ascii(raw: bytes) -> str:
    """Decode an ASCII field the way the kernel sanitizes INQUIRY strings.

    Like ``scsi_sanitize_inquiry_string`` (drivers/scsi/scsi_scan.c): stop at the
    first NUL, replace non-printable bytes with spaces; then drop trailing spaces.
    Never fails, so odd bytes from a device cannot make a decoder raise.
    """
    out = bytearray()
    for b in raw:
        if b == 0:
            break
        out.append(b if 0x20 <= b <= 0x7E else 0x20)
    return out.decode("ascii").rstrip(" ")


def enum_or_int(enum_cls: type[_E], value: int) -> _E | int:
    """``enum_cls(value)`` if it names a member, else the plain int."""
    try:
        return enum_cls(value)
    except ValueError:
        return value
