"""The daemon's control socket: one JSON request per connection, one JSON answer.

The socket lives in a root-only directory, is itself mode 0600, and the
server also checks the peer's uid (SO_PEERCRED): only root may ask the
agent to do anything.

    request:  {"command": "refresh", "lun": "36001405..."}
    answer:   {"ok": true, "result": {...}}  or  {"ok": false, "error": "...", "kind": "LunNotFoundError"}
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import struct
from pathlib import Path
from typing import Any, Awaitable, Callable

from protocol.errors import SwitchAgentError

LOG = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 * 1024
Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class ControlError(SwitchAgentError):
    """The daemon could not be asked, or said no; `kind` names its error type."""

    def __init__(self, message: str, kind: str = "ControlError") -> None:
        self.kind = kind
        super().__init__(message)


class DaemonNotRunningError(ControlError):
    """Nothing listens on the control socket."""


async def serve(path: Path, handler: Handler, *, allowed_uid: int = 0) -> asyncio.AbstractServer:
    """Listen on `path`; each connection's request goes to `handler`, errors become answers."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    if path.is_socket():
        path.unlink()  # left by a daemon that died; we hold the only pid that may serve it now

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            answer = await _answer(reader, writer, handler, allowed_uid)
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            LOG.debug("control connection dropped: %s", exc)
        finally:
            writer.close()

    old_umask = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(on_connect, path=str(path), limit=MAX_REQUEST_BYTES)
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    return server


async def _answer(reader, writer, handler: Handler, allowed_uid: int) -> dict[str, Any]:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        return {"ok": False, "kind": "ControlError", "error": "request too long"}
    # Read first, then refuse: a client that gets its answer sees why.
    sock = writer.get_extra_info("socket")
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    if uid != allowed_uid:
        LOG.warning("control request from uid %d refused", uid)
        return {"ok": False, "kind": "PermissionError", "error": "only root may talk to switch-agent"}
    try:
        request = json.loads(line)
        if not isinstance(request, dict) or not isinstance(request.get("command"), str):
            raise ValueError("a request is an object with a string 'command'")
    except ValueError as exc:
        return {"ok": False, "kind": "ControlError", "error": f"bad request: {exc}"}
    try:
        return {"ok": True, "result": await handler(request)}
    except (SwitchAgentError, ValueError, KeyError) as exc:
        return {"ok": False, "kind": type(exc).__name__, "error": str(exc)}


def request(path: Path, message: dict[str, Any], *, timeout_s: float = 300.0) -> Any:
    """Client side (the CLI): send one request, return the result or raise ControlError."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DaemonNotRunningError(
                f"the switch-agent daemon is not running (no answer on {path}); "
                "start it with `systemctl start switch-agent` or `switch-agent daemon`") from exc
        except PermissionError as exc:
            raise ControlError(f"{path}: permission denied; switch-agent needs root") from exc
        sock.sendall(json.dumps(message).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except socket.timeout as exc:
        raise ControlError(f"the daemon did not answer within {timeout_s:.0f} s") from exc
    finally:
        sock.close()
    try:
        answer = json.loads(data)
    except ValueError as exc:
        raise ControlError(f"garbled answer from the daemon: {data[:200]!r}") from exc
    if not answer.get("ok"):
        raise ControlError(answer.get("error", "unknown error"), answer.get("kind", "ControlError"))
    return answer.get("result")
