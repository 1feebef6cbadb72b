"""Log records into systemd's journal with structured fields, by its native protocol, without libsystemd.

Under systemd the daemon's stderr already reaches the journal, but as lines
of text. Sent natively, each message keeps its priority and its fields (the
LUN's WWID, its MPATH, the MEMBER; agent.logfields), so that ``journalctl -u
switch-agent WWID=...`` finds one volume's story. The protocol
(systemd.io/JOURNAL_NATIVE_PROTOCOL) is one datagram per entry to
/run/systemd/journal/socket, made of ``NAME=value\\n`` fields; a value with
a newline in it is sent as ``NAME\\n``, its length as 64-bit little-endian,
the bytes, ``\\n``. An entry too big for a datagram goes in a sealed memfd
passed over the socket instead. python3-systemd does the same in C; these
few lines spare the daemon a dependency.

Used only when stderr is the journal (JOURNAL_STREAM names it, see
systemd.exec(5)); anywhere else (a terminal, the test rig) the daemon logs
lines to stderr as before. A datagram the journal does not take goes to
stderr too: no message is lost to a journal restart.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import struct
import sys
from pathlib import Path
from typing import Iterable, Mapping

from agent import logfields

JOURNAL_SOCKET = Path("/run/systemd/journal/socket")
IDENTIFIER = "switch-agent"
PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}
"""syslog(3) priorities: crit, err, warning, info, debug."""


def encode(fields: Iterable[tuple[str, str | bytes]]) -> bytes:
    """One journal entry: ``NAME=value\\n`` per field; a value holding a newline in the length form."""
    out = bytearray()
    for name, value in fields:
        data = value.encode("utf-8", "replace") if isinstance(value, str) else value
        if b"\n" in data:
            out += name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out)


def priority(levelno: int) -> int:
    """The syslog priority of a logging level (levels between two take the lower one's)."""
    for level in sorted(PRIORITY, reverse=True):
        if levelno >= level:
            return PRIORITY[level]
    return PRIORITY[logging.DEBUG]


def stderr_is_journal(environ: Mapping[str, str] | None = None, stderr_fd: int = 2) -> bool:
    """True when stderr is connected to the journal: JOURNAL_STREAM is its "device:inode" (systemd.exec(5))."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat(stderr_fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


class JournalHandler(logging.Handler):
    """Each record as one journal entry: MESSAGE, PRIORITY, where it was logged, and its logfields."""

    def __init__(self, address: Path = JOURNAL_SOCKET, *, identifier: str = IDENTIFIER,
                 fallback: logging.Handler | None = None) -> None:
        super().__init__()
        self.address = str(address)
        self.identifier = identifier
        self.fallback = fallback
        """Where a record goes that the journal did not take (stderr in the daemon)."""
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def fields(self, record: logging.LogRecord) -> list[tuple[str, str]]:
        fields = [("MESSAGE", self.format(record)),
                  ("PRIORITY", str(priority(record.levelno))),
                  ("SYSLOG_IDENTIFIER", self.identifier),
                  ("LOGGER", record.name),
                  ("CODE_FILE", record.pathname),
                  ("CODE_LINE", str(record.lineno)),
                  ("CODE_FUNC", record.funcName)]
        if record.exc_info and record.exc_info[0] is not None:
            fields.append(("EXCEPTION", record.exc_info[0].__name__))
        return fields + sorted(logfields.of(record).items())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            entry = encode(self.fields(record))
            try:
                self._send(entry)
            except OSError:
                if self.fallback is None:
                    raise
                self.fallback.handle(record)
        except Exception:  # logging must never take the daemon down
            self.handleError(record)

    def _send(self, entry: bytes) -> None:
        try:
            self._socket.sendto(entry, self.address)
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_in_memfd(entry)

    def _send_in_memfd(self, entry: bytes) -> None:
        """An entry bigger than a datagram (a long traceback): in a sealed memfd, as sd_journal_sendv() does."""
        fd = os.memfd_create("journal-entry", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, entry)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))]
            self._socket.sendmsg([], rights, 0, self.address)
        finally:
            os.close(fd)

    def close(self) -> None:
        self._socket.close()
        super().close()


def daemon_handler(line_format: str, *, environ: Mapping[str, str] | None = None,
                   journal_socket: Path = JOURNAL_SOCKET) -> logging.Handler:
    """The daemon's log handler: the journal natively when stderr is the journal, else lines on stderr."""
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(logging.Formatter(line_format))
    if stderr_is_journal(environ) and journal_socket.exists():
        return JournalHandler(journal_socket, fallback=stream)
    return stream
