"""Sockets handed over by systemd (socket activation), read as sd_listen_fds(3) does, without libsystemd.

systemd starts the service with the listening sockets open from fd 3 on and
says so in the environment: LISTEN_PID (the pid they are meant for: a child
that inherited the environment must not take them), LISTEN_FDS (how many)
and LISTEN_FDNAMES (their names, ':'-separated; FileDescriptorName= or the
socket unit's name). The variables are removed once read, so that nothing
the daemon starts takes the fds for its own.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import MutableMapping

LOG = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3
"""The first inherited fd (<systemd/sd-daemon.h>)."""
ENVIRONMENT = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


@dataclass(frozen=True)
class ListenFd:
    fd: int
    name: str


def listen_fds(environ: MutableMapping[str, str] | None = None, *, pid: int | None = None,
               start: int | None = None) -> list[ListenFd]:
    """The fds systemd passed to this process (none when not activated, or meant for another pid).

    Each is made close-on-exec, as sd_listen_fds() does. The LISTEN_*
    variables are removed from `environ` (default os.environ) either way.
    """
    env = os.environ if environ is None else environ
    values = {key: env.pop(key, None) for key in ENVIRONMENT}
    pid_text, count_text = values["LISTEN_PID"], values["LISTEN_FDS"]
    if not pid_text or not count_text:
        return []
    if not pid_text.isdigit() or int(pid_text) != (os.getpid() if pid is None else pid):
        return []  # meant for the process that exec'd us, not for us
    if not count_text.isdigit() or int(count_text) == 0:
        return []
    count = int(count_text)
    names = (values["LISTEN_FDNAMES"] or "").split(":")
    if len(names) != count:
        names = ["unknown"] * count  # as sd_listen_fds_with_names() does
    first = SD_LISTEN_FDS_START if start is None else start
    fds = [ListenFd(first + n, name) for n, name in enumerate(names)]
    for item in fds:
        flags = fcntl.fcntl(item.fd, fcntl.F_GETFD)
        fcntl.fcntl(item.fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
    return fds


def control_socket(path: Path, fds: list[ListenFd]) -> socket.socket | None:
    """The inherited listening socket to serve the control protocol on, or None (then bind `path`).

    The one bound to `path` is taken; failing that, the only listening unix
    stream socket, with a warning (the socket unit's ListenStream= and the
    configuration's socket_path differ: the CLI looks at the latter). Any
    other inherited fd is closed: nothing else here knows what it is for.
    """
    sockets: list[socket.socket] = []
    for item in fds:
        try:
            sock = socket.socket(fileno=item.fd)
        except OSError as exc:
            LOG.warning("inherited fd %d (%s) is not a socket (%s): closed", item.fd, item.name, exc)
            os.close(item.fd)
            continue
        if (sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM
                or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
            LOG.warning("inherited fd %d (%s) is not a listening unix stream socket: closed", item.fd, item.name)
            sock.close()
            continue
        sockets.append(sock)
    chosen = next((s for s in sockets if _bound_path(s) == str(path)), None)
    if chosen is None and len(sockets) == 1:
        chosen = sockets[0]
        LOG.warning("the activated socket is %s, the configuration's socket_path %s: the CLI looks at the "
                    "latter (make ListenStream= and socket_path the same)", _bound_path(chosen), path)
    for sock in sockets:
        if sock is not chosen:
            LOG.warning("inherited socket %s (fd %d) not used: closed", _bound_path(sock), sock.fileno())
            sock.close()
    return chosen


def _bound_path(sock: socket.socket) -> str:
    name = sock.getsockname()
    return name if isinstance(name, str) else repr(name)
