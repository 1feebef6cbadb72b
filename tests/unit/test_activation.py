"""Socket activation: LISTEN_FDS parsing, the daemon serving on a socket systemd passed, `trigger` starting it."""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent import activation, cli, control
from tests.unit.fakes_kernel import FakeSystem
from tests.unit.test_daemon import ask, config, routed, running, until

REPO = Path(__file__).resolve().parents[2]


def listening_socket(path: Path) -> socket.socket:
    """A bound, listening unix socket as a socket unit makes it: directory 0700, socket 0600."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, 0o600)
    sock.listen(16)
    return sock


# -- LISTEN_FDS -------------------------------------------------------------------

def test_not_activated_without_the_variables():
    env: dict[str, str] = {"PATH": "/bin"}
    assert activation.listen_fds(env) == []
    assert env == {"PATH": "/bin"}


def test_fds_meant_for_another_pid_are_not_taken_and_the_variables_go_either_way():
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "switch-agent.socket"}
    assert activation.listen_fds(env) == []
    assert env == {}  # a child we start must not take them either


@pytest.mark.parametrize("count", ["0", "", "x", "-1"])
def test_no_fds_when_the_count_is_zero_or_garbled(count):
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": count}
    assert activation.listen_fds(env) == []
    assert env == {}


def test_names_and_numbers_from_fd_3_on_made_close_on_exec():
    a, b = socket.socketpair()
    try:
        os.set_inheritable(a.fileno(), True)
        os.set_inheritable(b.fileno(), True)
        start = a.fileno()
        # Two consecutive fds, as systemd lays them out (from 3; here from wherever the test has them).
        second = os.dup2(b.fileno(), start + 1) if b.fileno() != start + 1 else b.fileno()
        env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "control:other"}
        fds = activation.listen_fds(env, start=start)
        assert fds == [activation.ListenFd(start, "control"), activation.ListenFd(start + 1, "other")]
        assert all(fcntl.fcntl(fd.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC for fd in fds)
        if second != b.fileno():
            os.close(second)
    finally:
        a.close()
        b.close()


def test_names_that_do_not_match_the_count_are_unknown():
    env = {"LISTEN_PID": "42", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "a:b"}
    r, w = os.pipe()
    try:
        assert activation.listen_fds(env, pid=42, start=r) == [activation.ListenFd(r, "unknown")]
    finally:
        os.close(r)
        os.close(w)


def test_the_socket_bound_to_the_configured_path_is_chosen_and_others_closed(tmp_path, caplog):
    ours = listening_socket(tmp_path / "run" / "control.sock")
    other = listening_socket(tmp_path / "other" / "x.sock")
    r, w = os.pipe()
    fds = [activation.ListenFd(os.dup(other.fileno()), "x"), activation.ListenFd(os.dup(ours.fileno()), "c"),
           activation.ListenFd(r, "pipe")]
    with caplog.at_level(logging.WARNING):
        chosen = activation.control_socket(tmp_path / "run" / "control.sock", fds)
    try:
        assert chosen is not None and chosen.getsockname() == str(tmp_path / "run" / "control.sock")
        for fd in (fds[0].fd, r):  # closed
            with pytest.raises(OSError):
                os.fstat(fd)
        assert "not a socket" in caplog.text and "not used" in caplog.text
    finally:
        for s in (chosen, ours, other):
            if s is not None:
                s.close()
        os.close(w)


def test_a_lone_socket_at_another_path_is_served_with_a_warning(tmp_path, caplog):
    sock = listening_socket(tmp_path / "elsewhere" / "c.sock")
    with caplog.at_level(logging.WARNING):
        chosen = activation.control_socket(tmp_path / "run" / "control.sock",
                                           [activation.ListenFd(os.dup(sock.fileno()), "c")])
    assert chosen is not None
    assert "ListenStream= and socket_path" in caplog.text
    chosen.close()
    sock.close()


# -- the daemon on an inherited socket ----------------------------------------------

def test_the_daemon_serves_on_the_socket_systemd_passed_and_leaves_it_in_place(tmp_path, monkeypatch):
    system = FakeSystem(tmp_path=tmp_path / "store", layout="random")
    cfg = config(tmp_path)
    unit = listening_socket(cfg.socket_path)  # systemd's own copy, kept open while the service comes and goes
    passed = os.dup(unit.fileno())
    # What systemd does before exec: the fd at SD_LISTEN_FDS_START (here: wherever dup put it) and the variables.
    monkeypatch.setattr(activation, "SD_LISTEN_FDS_START", passed)
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "switch-agent.socket")
    inode = cfg.socket_path.stat().st_ino

    async def main():
        async with running(cfg, system) as (daemon, _):
            await until(lambda: routed(system, daemon))
            assert [s["state"] for s in await ask(cfg, {"command": "status"})] == ["routed"]
            assert "LISTEN_FDS" not in os.environ
        # Stopped: the socket unit's socket is the same file, still listening (the next request starts
        # the daemon again), and the daemon closed its copy.
        assert cfg.socket_path.stat().st_ino == inode
        with pytest.raises(OSError):
            os.fstat(passed)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(str(cfg.socket_path))
        probe.close()

    try:
        asyncio.run(main())
    finally:
        unit.close()


CHILD = """
import asyncio, os, sys
from pathlib import Path
from agent import activation, control

async def main():
    path = Path(sys.argv[1])
    sock = activation.control_socket(path, activation.listen_fds())
    answered = asyncio.Event()
    async def handler(request):
        answered.set()
        return {"pid": os.getpid(), "listen_env": sorted(k for k in os.environ if k.startswith("LISTEN_")),
                "fd": sock.fileno() if sock else None, "request": request}
    server = await control.serve(path, handler, allowed_uid=os.getuid(), listening=sock)
    async with server:
        await answered.wait()
        await asyncio.sleep(0.2)  # the answer is written after the handler returns

asyncio.run(main())
"""


def test_a_process_started_with_the_socket_at_fd_3_answers_a_request_sent_before_it_ran(tmp_path):
    """As systemd does it: fd 3, LISTEN_PID of the child itself; the request was queued before the child started."""
    path = tmp_path / "run" / "control.sock"
    unit = listening_socket(path)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(path))  # queued in the backlog: nobody accepts yet
    client.sendall(json.dumps({"command": "trigger", "lun": "36001405aa"}).encode() + b"\n")
    fd = unit.fileno()
    child = subprocess.Popen(
        ["sh", "-c", 'LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=switch-agent.socket exec "$@"', "sh",
         sys.executable, "-c", CHILD, str(path)],
        cwd=REPO, pass_fds=(3,), preexec_fn=lambda: os.dup2(fd, 3), stderr=subprocess.PIPE)
    try:
        client.settimeout(30)
        data = b""
        while not data.endswith(b"\n"):
            chunk = client.recv(65536)
            if not chunk:
                break
            data += chunk
        answer = json.loads(data)
        _, err = child.communicate(timeout=30)
        assert child.returncode == 0, err
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
        client.close()
    assert answer["ok"], answer
    assert answer["result"] == {"pid": child.pid, "listen_env": [], "fd": 3,
                                "request": {"command": "trigger", "lun": "36001405aa"}}
    assert path.exists()  # the socket unit's: the child did not remove it
    unit.close()


@pytest.mark.skipif(not shutil.which("systemd-socket-activate"), reason="no systemd-socket-activate (package systemd)")
def test_systemds_own_socket_activation_hands_over_a_socket_the_daemons_code_serves(tmp_path):
    """systemd-socket-activate (systemd's own LISTEN_* code, as in a socket unit) in front of the same code."""
    path = tmp_path / "run" / "control.sock"
    path.parent.mkdir(mode=0o700)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(["systemd-socket-activate", "--listen", str(path), "--fdname=switch-agent.socket",
                              "-E", "PYTHONPATH", sys.executable, "-c", CHILD, str(path)],
                             cwd=REPO, env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not path.exists():  # it binds before it waits for the first connection
            assert child.poll() is None and time.monotonic() < deadline, "systemd-socket-activate did not listen"
            time.sleep(0.02)
        answer = control.request(path, {"command": "trigger", "lun": "36001405aa"}, timeout_s=30)
        _, err = child.communicate(timeout=30)
        assert child.returncode == 0, err
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert answer == {"pid": child.pid, "listen_env": [], "fd": 3,
                      "request": {"command": "trigger", "lun": "36001405aa"}}


# -- `switch-agent trigger` starts the daemon through the socket ------------------------

def test_trigger_sends_to_a_socket_nobody_serves_yet_and_returns_at_once(tmp_path, monkeypatch, capsys):
    path = tmp_path / "run" / "control.sock"
    unit = listening_socket(path)
    monkeypatch.setattr(cli, "TRIGGER_TIMEOUT_S", 0.3)
    started = time.monotonic()
    assert cli.main(["--socket", str(path), "trigger", "mpath-36001405aa"]) == cli.EXIT_OK
    took = time.monotonic() - started
    print(f"trigger with no daemon behind the socket returned after {took:.2f} s")
    assert "trigger sent" in capsys.readouterr().err
    # The request waits in the socket for the daemon that activation starts.
    unit.settimeout(5)
    conn, _ = unit.accept()
    conn.settimeout(5)
    assert json.loads(conn.makefile("rb").readline()) == {"command": "trigger", "lun": "mpath-36001405aa"}
    conn.close()
    unit.close()


def test_trigger_without_daemon_or_socket_is_silent(tmp_path, capsys):
    assert cli.main(["--socket", str(tmp_path / "run" / "control.sock"), "trigger", "36001405aa"]) == cli.EXIT_OK
    assert capsys.readouterr().err == ""


def test_a_request_that_was_sent_but_not_answered_is_told_apart(tmp_path):
    unit = listening_socket(tmp_path / "run" / "control.sock")
    with pytest.raises(control.NoAnswerError):
        control.request(tmp_path / "run" / "control.sock", {"command": "status"}, timeout_s=0.2)
    unit.close()


def test_a_daemon_started_by_hand_leaves_the_socket_units_socket_alone(tmp_path):
    """Not activated, with switch-agent.socket listening on the path: refuse, do not bind over it."""
    path = tmp_path / "run" / "control.sock"
    unit = listening_socket(path)
    inode = path.stat().st_ino

    async def handler(request):
        return {}

    async def main():
        with pytest.raises(control.ControlSocketError, match="another process listens on it"):
            await control.serve(path, handler, allowed_uid=os.getuid())

    asyncio.run(main())
    assert path.stat().st_ino == inode
    unit.close()
    # The socket of a daemon that died (nobody listens): replaced as before.
    async def dead():
        async with await control.serve(path, handler, allowed_uid=os.getuid()):
            assert await asyncio.to_thread(control.request, path, {"command": "status"}) == {}

    asyncio.run(dead())
