"""The control socket between the CLI and the emulator server: one JSON line each way.

Request  {"op": "move", "args": {"fraction": 0.1}}
Response {"ok": true, "result": ...} or {"ok": false, "error": "...", "type": "ArrayStateError"}
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from tests.array.errors import ControlError

DEFAULT_RUN_DIR = Path("/run/switch-agent-emu")
SOCKET_NAME = "control.sock"
LOG_NAME = "emulator.log"
MAX_MESSAGE_BYTES = 16 << 20


def run_dir() -> Path:
    """$SWEMU_RUN_DIR, else /run/switch-agent-emu."""
    return Path(os.environ.get("SWEMU_RUN_DIR", DEFAULT_RUN_DIR))


def socket_path(directory: Path) -> Path:
    """Where the server listens."""
    return directory / SOCKET_NAME


def encode(message: dict[str, Any]) -> bytes:
    """One message as a JSON line."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def read_line(sock: socket.socket) -> bytes:
    """Read up to the first newline (the whole message); raise ControlError on EOF first."""
    chunks = []
    size = 0
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise ControlError("control connection closed before a full message")
        chunks.append(chunk)
        size += len(chunk)
        if chunk.endswith(b"\n"):
            return b"".join(chunks)
        if size > MAX_MESSAGE_BYTES:
            raise ControlError("control message too long")


def request(directory: Path, op: str, timeout: float = 120.0, **args: Any) -> Any:
    """Send one request to the server in `directory` and return its result (or raise ControlError)."""
    path = socket_path(directory)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise ControlError(f"no emulator server at {path} (python -m tests.array up)") from exc
        sock.sendall(encode({"op": op, "args": args}))
        reply = json.loads(read_line(sock))
    except TimeoutError as exc:
        raise ControlError(f"emulator server did not answer {op!r} within {timeout} s") from exc
    finally:
        sock.close()
    if not reply.get("ok"):
        raise ControlError(f"{op}: {reply.get('type', 'error')}: {reply.get('error')}")
    return reply.get("result")


def server_running(directory: Path) -> bool:
    """True when a server answers on the socket."""
    try:
        request(directory, "status", timeout=5.0)
    except ControlError:
        return False
    return True
