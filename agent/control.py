"""The daemon's control socket: one JSON request per connection, one JSON answer.

The socket lives in a root-only directory, is itself mode 0600, and the
server also checks the peer's uid (SO_PEERCRED): only root may ask the
agent to do anything. A lock file beside it (<socket>.lock, flock) makes
the daemon the only one: a second one stops with DaemonAlreadyRunningError
and leaves the first one's socket alone.

    request:  {"command": "refresh", "lun": "36001405..."}
    answer:   {"ok": true, "result": {...}}  or  {"ok": false, "error": "...", "kind": "LunNotFoundError"}

Every request that arrives gets an answer, errors included; a client that
sends nothing within READ_TIMEOUT_S gets a timeout answer, and one beyond
MAX_CLIENTS connections at once a busy answer, so no client holds a slot.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import logging
import os
import re
import socket
import stat
import struct
from pathlib import Path
from typing import Any, Awaitable, Callable

from protocol.errors import SwitchAgentError

LOG = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 * 1024
READ_TIMEOUT_S = 10.0
"""A client has this long to send its request line, and again to take its answer."""
MAX_CLIENTS = 128
"""Connections served at once (udev runs `trigger` from many workers); more are answered busy."""
Handler = Callable[[dict[str, Any]], Awaitable[Any]]
OnConnect = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class ControlError(SwitchAgentError):
    """The daemon could not be asked, or said no; `kind` names its error type."""

    def __init__(self, message: str, kind: str = "ControlError") -> None:
        self.kind = kind
        super().__init__(message)


class DaemonNotRunningError(ControlError):
    """Nothing listens on the control socket."""


class DaemonAlreadyRunningError(ControlError):
    """Another daemon holds the control socket's lock file; `holder_pid` is the pid it wrote there."""

    def __init__(self, lock_path: Path, holder_pid: int | None) -> None:
        self.lock_path = lock_path
        self.holder_pid = holder_pid
        who = f"pid {holder_pid}" if holder_pid else "another process"
        super().__init__(f"another switch-agent daemon ({who}) holds {lock_path}; "
                         "stop it first (`systemctl stop switch-agent`)", type(self).__name__)


class NoAnswerError(ControlError):
    """The request was sent but no answer came in time: a daemon being started through its socket
    unit reads it once it runs (or a daemon that hangs)."""


class ControlSocketError(ControlError):
    """The socket's directory or path is not safe to serve from: names the path and the problem."""

    def __init__(self, path: Path, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"control socket {path}: {problem}", type(self).__name__)


class SuspiciousArgumentError(ControlError):
    """A `trigger` argument (device data, via udev) that is not a plain wwid or sysfs path."""

    def __init__(self, what: str, value: object) -> None:
        self.what = what
        self.value = value
        super().__init__(f"refusing suspicious {what} {repr(value)[:80]}", type(self).__name__)


_UDEV_ARGUMENT = re.compile(r"[A-Za-z0-9_.:/+-]{1,512}")


def check_trigger(request: dict[str, Any]) -> tuple[str, str]:
    """A `trigger` request's ("lun", wwid) or ("scsi_device", /sys/devices/... path), or SuspiciousArgumentError.

    Its argument comes from udev, i.e. from device data: the CLI checks it
    before sending and the daemon again on receipt, both here.
    """
    what = "scsi_device" if "scsi_device" in request else "lun"
    value = request.get(what)
    if not (isinstance(value, str) and _UDEV_ARGUMENT.fullmatch(value) and ".." not in value
            and (what == "lun" or value.startswith("/sys/devices/"))):
        raise SuspiciousArgumentError(what, value)
    return what, value


class ControlServer:
    """The listening socket and the lock that makes it ours: closing removes the socket, then frees the lock.

    A socket handed over by systemd (`activated`) is the socket unit's: it stays where it is.
    """

    def __init__(self, server: asyncio.AbstractServer, path: Path, directory_fd: int, lock_fd: int, *,
                 activated: bool = False) -> None:
        self.server = server
        self.path = path
        self.activated = activated
        self._directory_fd: int | None = directory_fd
        self._lock_fd = lock_fd

    def close(self) -> None:
        self.server.close()

    async def wait_closed(self) -> None:
        """Wait for the listener to close, then remove the socket while still holding the lock."""
        await self.server.wait_closed()
        if self._directory_fd is None:
            return
        try:
            if not self.activated:
                os.unlink(self.path.name, dir_fd=self._directory_fd)
        except FileNotFoundError:
            pass
        os.close(self._lock_fd)
        os.close(self._directory_fd)
        self._directory_fd = None

    async def __aenter__(self) -> ControlServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()


async def serve(path: Path, handler: Handler, *, allowed_uid: int = 0, read_timeout_s: float = READ_TIMEOUT_S,
                max_clients: int = MAX_CLIENTS, listening: socket.socket | None = None) -> ControlServer:
    """Listen on `path`; each connection's request goes to `handler`, errors become answers.

    `listening`: a socket already bound and listening (systemd's, agent.activation) to serve on
    instead of binding `path`; the lock beside `path` is taken all the same.
    """
    directory_fd = _open_directory(path.parent)
    try:
        lock_fd = _lock(path, directory_fd)
    except BaseException:
        os.close(directory_fd)
        raise
    on_connect = _connection_handler(handler, allowed_uid, read_timeout_s, max_clients)
    server: asyncio.AbstractServer
    try:
        if listening is not None:
            server = await asyncio.start_unix_server(on_connect, sock=listening, limit=MAX_REQUEST_BYTES)
        else:
            server = await _listen(path, directory_fd, on_connect)
    except BaseException:
        os.close(lock_fd)
        os.close(directory_fd)
        raise
    return ControlServer(server, path, directory_fd, lock_fd, activated=listening is not None)


def _open_directory(directory: Path) -> int:
    """The socket's directory, made 0700 if missing, as an fd: a real directory, ours and only ours, not a symlink."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        why = "is a symlink" if exc.errno == errno.ELOOP else exc.strerror or str(exc)
        raise ControlSocketError(directory, f"its directory {why}; it must be a real directory") from None
    st = os.fstat(fd)
    problem: str | None = None
    if st.st_uid != os.geteuid():
        problem = f"its directory belongs to uid {st.st_uid}, not to the daemon's uid {os.geteuid()}"
    elif st.st_mode & 0o077:
        # Made here it is 0700; one open to others is shared (/run itself?), and not ours to chmod.
        problem = (f"its directory is open to others (mode {stat.S_IMODE(st.st_mode):o}); "
                   "give the socket a directory of its own, e.g. /run/switch-agent")
    if problem:
        os.close(fd)
        raise ControlSocketError(directory, problem)
    return fd


def _lock(path: Path, directory_fd: int) -> int:
    """Take <socket>.lock (flock, never waiting) and write our pid in it, or DaemonAlreadyRunningError."""
    name = path.name + ".lock"
    try:
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=directory_fd)
    except OSError as exc:
        raise ControlSocketError(path.with_name(name), exc.strerror or str(exc)) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).strip()
        os.close(fd)
        raise DaemonAlreadyRunningError(path.with_name(name), int(holder) if holder.isdigit() else None) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


async def _listen(path: Path, directory_fd: int, on_connect: OnConnect) -> asyncio.AbstractServer:
    """Bind `path` (a dead daemon's socket removed first: we hold the lock) with mode 0600 from the start."""
    try:
        old = os.stat(path.name, dir_fd=directory_fd, follow_symlinks=False)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(old.st_mode):
            raise ControlSocketError(path, "exists and is not a socket")
        if _listening(path):
            # Not a dead daemon's: switch-agent.socket's. Binding over it would leave the socket
            # unit listening on a removed name, and nothing could start the daemon through it.
            raise ControlSocketError(path, "another process listens on it (switch-agent.socket?); start the "
                                           "daemon through it (`systemctl start switch-agent`) or stop it first "
                                           "(`systemctl stop switch-agent.socket`)")
        os.unlink(path.name, dir_fd=directory_fd)
    old_umask = os.umask(0o177)
    try:
        return await asyncio.start_unix_server(on_connect, path=str(path), limit=MAX_REQUEST_BYTES)
    except OSError as exc:
        raise ControlSocketError(path, exc.strerror or str(exc)) from None
    finally:
        os.umask(old_umask)


def _listening(path: Path, table: Path = Path("/proc/net/unix")) -> bool:
    """Whether a listening unix socket is bound to `path` (the kernel's table; connecting to find out
    would start the daemon through a socket unit)."""
    try:
        lines = table.read_text().splitlines()[1:]
    except OSError:
        return False
    for line in lines:
        # Num RefCount Protocol Flags Type St Inode Path; __SO_ACCEPTCON (0x10000) in Flags: listening
        fields = line.split(None, 7)
        if len(fields) == 8 and fields[7] == str(path) and int(fields[3], 16) & 0x10000:
            return True
    return False


def _connection_handler(handler: Handler, allowed_uid: int, read_timeout_s: float, max_clients: int) -> OnConnect:
    active = 0

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal active
        if active >= max_clients:
            # Answered without reading: the slot is free again at once.
            writer.write(_encode(_error("ControlBusyError", f"{max_clients} requests in progress; try again")))
            writer.close()
            return
        active += 1
        try:
            answer = await _answer(reader, writer, handler, allowed_uid, read_timeout_s)
            writer.write(_encode(answer))
            await asyncio.wait_for(writer.drain(), read_timeout_s)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError) as exc:
            LOG.debug("control connection dropped: %s", exc)
        finally:
            active -= 1
            writer.close()

    return on_connect


def _error(kind: str, message: str) -> dict[str, Any]:
    return {"ok": False, "kind": kind, "error": message}


def _encode(answer: dict[str, Any]) -> bytes:
    try:
        return json.dumps(answer).encode() + b"\n"
    except (TypeError, ValueError, RecursionError) as exc:
        LOG.error("control answer not encodable: %s", exc)
        return json.dumps(_error("InternalError", f"answer not encodable: {exc}")).encode() + b"\n"


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handler: Handler, allowed_uid: int,
                  read_timeout_s: float) -> dict[str, Any]:
    try:
        line = await asyncio.wait_for(reader.readuntil(b"\n"), read_timeout_s)
    except asyncio.LimitOverrunError:
        return _error("ControlError", "request too long")
    except TimeoutError:
        return _error("ControlTimeoutError", f"no request within {read_timeout_s:g} s")
    # Read first, then refuse: a client that gets its answer sees why.
    sock = writer.get_extra_info("socket")
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    if uid != allowed_uid:
        LOG.warning("control request from uid %d refused", uid)
        return _error("PermissionError", "only root may talk to switch-agent")
    try:
        request = json.loads(line)
        if not isinstance(request, dict) or not isinstance(request.get("command"), str):
            raise ValueError("a request is an object with a string 'command'")
    except (ValueError, RecursionError) as exc:  # RecursionError: "[[[[..." nested past Python's stack
        return _error("ControlError", f"bad request: {type(exc).__name__}: {str(exc)[:200]}")
    try:
        return {"ok": True, "result": await handler(request)}
    except (SwitchAgentError, ValueError, KeyError) as exc:
        return _error(type(exc).__name__, str(exc))
    except Exception as exc:  # a bug: the client still gets an answer, the log gets the traceback
        LOG.exception("control request %r failed", request.get("command"))
        return _error("InternalError", f"internal error ({type(exc).__name__}); see the daemon's log")


def request(path: Path, message: dict[str, Any], *, timeout_s: float = 300.0) -> Any:
    """Client side (the CLI): send one request, return the result or raise ControlError."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    sent = False
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DaemonNotRunningError(
                f"the switch-agent daemon is not running (no answer on {path}); "
                "start it with `systemctl start switch-agent` or `switch-agent daemon`") from exc
        except PermissionError as exc:
            raise ControlError(f"{path}: permission denied; switch-agent needs root") from exc
        try:
            sock.sendall(json.dumps(message).encode() + b"\n")
            sent = True
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered (busy) and closed before we sent: the answer is waiting to be read
        data = b""
        while not data.endswith(b"\n"):
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break  # closed with our request unread; what it wrote before is all there is
            if not chunk:
                break
            data += chunk
    except socket.timeout as exc:
        if sent:
            raise NoAnswerError(f"the daemon did not answer within {timeout_s:g} s") from exc
        raise ControlError(f"could not send to {path} within {timeout_s:g} s") from exc
    finally:
        sock.close()
    if not data:
        raise ControlError(f"the daemon closed {path} without an answer")
    try:
        answer = json.loads(data)
        if not isinstance(answer, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        raise ControlError(f"garbled answer from the daemon: {data[:200]!r}") from exc
    if not answer.get("ok"):
        raise ControlError(answer.get("error", "unknown error"), answer.get("kind", "ControlError"))
    return answer.get("result")
