"""The control socket under misuse: idle and surplus clients, hostile JSON, a second daemon, unsafe paths."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path

import pytest

from agent import control
from tests.unit.fakes_kernel import FakeSystem
from agent.daemon import Daemon
from tests.unit.test_daemon import ask, config, routed, running, until


async def echo(request):
    return {"echo": request["command"]}


def connect(path: Path) -> socket.socket:
    """A raw client with a deadline: a server that never answers fails the test instead of hanging it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(path))
    return sock


def read_answer(sock: socket.socket) -> dict | None:
    """The one answer line, or None when the server closed without one."""
    line = sock.makefile("rb").readline()
    return json.loads(line) if line else None


def send_raw(path: Path, data: bytes) -> dict | None:
    with connect(path) as sock:
        sock.sendall(data)
        return read_answer(sock)


def test_idle_clients_time_out_and_surplus_ones_are_answered_busy_at_once(tmp_path):
    path = tmp_path / "run" / "control.sock"

    def clients():
        idle = [connect(path) for _ in range(3)]
        try:
            # The cap is full of silent clients: a fourth is told so at once, not queued behind them.
            with connect(path) as surplus:
                assert read_answer(surplus)["kind"] == "ControlBusyError"
            timeouts = [read_answer(sock) for sock in idle]
            assert [a["kind"] for a in timeouts] == ["ControlTimeoutError"] * 3
            assert [sock.recv(1) for sock in idle] == [b""] * 3  # and then closed: the descriptor is free
        finally:
            for sock in idle:
                sock.close()
        return control.request(path, {"command": "status"})

    async def main():
        async with await control.serve(path, echo, allowed_uid=os.getuid(), read_timeout_s=2.0, max_clients=3):
            return await asyncio.to_thread(clients)

    assert asyncio.run(main()) == {"echo": "status"}


def test_every_request_is_answered_even_hostile_or_unlucky_ones(tmp_path):
    path = tmp_path / "run" / "control.sock"
    deep = b'{"command": "status", "x": ' + b"[" * 30000 + b"]" * 30000 + b"}\n"  # under the 64 KiB limit

    async def handler(request):
        if request["command"] == "bug":
            return None + 1  # a TypeError: a bug in the daemon, not a bad request
        if request["command"] == "unencodable":
            return {"set": {1, 2}}
        return "ok"

    def clients():
        return [send_raw(path, deep), send_raw(path, b'{"command": "bug"}\n'),
                send_raw(path, b'{"command": "unencodable"}\n'), send_raw(path, b"\xff\xfe\n"),
                send_raw(path, b"x" * (control.MAX_REQUEST_BYTES + 10) + b"\n")]

    async def main():
        async with await control.serve(path, handler, allowed_uid=os.getuid()):
            return await asyncio.to_thread(clients)

    nested, bug, unencodable, binary, too_long = asyncio.run(main())
    assert nested["ok"] is False and "RecursionError" in nested["error"]
    assert bug == {"ok": False, "kind": "InternalError", "error": "internal error (TypeError); see the daemon's log"}
    assert unencodable["ok"] is False and unencodable["kind"] == "InternalError"
    assert binary["ok"] is False and binary["kind"] == "ControlError"
    assert too_long["ok"] is False and "too long" in too_long["error"]


def test_a_second_server_on_the_same_path_fails_and_leaves_the_first_serving(tmp_path):
    path = tmp_path / "run" / "control.sock"

    async def main():
        first = await control.serve(path, echo, allowed_uid=os.getuid())
        async with first:
            with pytest.raises(control.DaemonAlreadyRunningError) as info:
                await control.serve(path, echo, allowed_uid=os.getuid())
            assert info.value.holder_pid == os.getpid()
            assert info.value.lock_path == path.with_name("control.sock.lock")
            assert await asyncio.to_thread(control.request, path, {"command": "status"}) == {"echo": "status"}
        assert not path.exists()  # the first removed its socket on the way out, under its lock
        async with await control.serve(path, echo, allowed_uid=os.getuid()):  # the lock is free again
            assert await asyncio.to_thread(control.request, path, {"command": "show"}) == {"echo": "show"}

    asyncio.run(main())


def test_a_second_daemon_stops_with_a_typed_error_and_the_first_keeps_answering(tmp_path):
    first, second = FakeSystem(tmp_path=tmp_path / "one"), FakeSystem(tmp_path=tmp_path / "two")
    cfg = config(tmp_path)

    async def main():
        async with running(cfg, first) as (daemon, _):
            await until(lambda: routed(first, daemon))
            inode = cfg.socket_path.stat().st_ino
            with pytest.raises(control.DaemonAlreadyRunningError):
                await Daemon(cfg, second, None).run()
            assert cfg.socket_path.stat().st_ino == inode
            assert [s["wwid"] for s in await ask(cfg, {"command": "status"})] == [first.wwid]
            assert not any(d.uuid.startswith("SWAGENT-") for d in second.dm.devices.values())  # it did nothing

    asyncio.run(main())


def test_a_symlinked_socket_directory_is_refused_and_not_chmodded(tmp_path):
    real = tmp_path / "shared"
    real.mkdir(mode=0o755)
    real.chmod(0o755)
    (tmp_path / "run").symlink_to(real)

    async def main():
        await control.serve(tmp_path / "run" / "control.sock", echo, allowed_uid=os.getuid())

    with pytest.raises(control.ControlSocketError, match="symlink"):
        asyncio.run(main())
    assert real.stat().st_mode & 0o777 == 0o755 and list(real.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the directory away")
def test_a_socket_directory_owned_by_someone_else_is_refused(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 4242, 4242)

    async def main():
        await control.serve(theirs / "control.sock", echo, allowed_uid=os.getuid())

    with pytest.raises(control.ControlSocketError, match="uid 4242"):
        asyncio.run(main())
    assert list(theirs.iterdir()) == []


def test_a_shared_socket_directory_is_refused_and_not_chmodded(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)  # like /run: socket_path = "/run/switch-agent.sock" once made /run 0700

    async def main():
        await control.serve(shared / "control.sock", echo, allowed_uid=os.getuid())

    with pytest.raises(control.ControlSocketError, match="open to others"):
        asyncio.run(main())
    assert shared.stat().st_mode & 0o777 == 0o755 and list(shared.iterdir()) == []


def test_something_else_at_the_socket_path_is_not_removed(tmp_path):
    path = tmp_path / "run" / "control.sock"
    path.parent.mkdir(mode=0o700)
    path.write_text("not a socket")

    async def main():
        await control.serve(path, echo, allowed_uid=os.getuid())

    with pytest.raises(control.ControlSocketError, match="not a socket"):
        asyncio.run(main())
    assert path.read_text() == "not a socket"


BOGUS = ["mpath-3600\x1b[31mred", "3600\nforged log line", "mpath-$(reboot)", "/../../etc/passwd", "a b",
         "x" * 513, "mpath-\x00", "3600;rm", "mpath-36001405aa\n", "3600\u202e"]


def test_the_daemon_refuses_bogus_trigger_names_and_remembers_none(tmp_path):
    system = FakeSystem(tmp_path=tmp_path / "store")
    system.mpath_present = False  # no LUN at all: anything remembered came from the triggers
    cfg = config(tmp_path)

    async def main():
        async with running(cfg, system) as (daemon, _):
            kinds = set()
            for i in range(500):
                name = f"{i}{BOGUS[i % len(BOGUS)]}"  # 500 different names, as a storm of udev events brings
                with pytest.raises(control.ControlError) as info:
                    await ask(cfg, {"command": "trigger", "lun": name})
                kinds.add(info.value.kind)
            for device in ("/sys/devices/../../etc", "/etc/shadow", "/sys/devices/x\x1b"):
                with pytest.raises(control.ControlError) as info:
                    await ask(cfg, {"command": "trigger", "scsi_device": device})
                kinds.add(info.value.kind)
            assert kinds == {"SuspiciousArgumentError"}
            assert daemon.orchestrator.luns == {} and daemon.scheduler._pending == {}
            # A plain name still goes through.
            assert await ask(cfg, {"command": "trigger", "lun": "mpath-36001405aa"}) == {"scheduled": True}

    asyncio.run(main())


@pytest.mark.parametrize("request_, accepted", [
    ({"lun": "mpath-36001405aa"}, ("lun", "mpath-36001405aa")),
    ({"scsi_device": "/sys/devices/platform/host6/session3/target6:0:0/6:0:0:1"},
     ("scsi_device", "/sys/devices/platform/host6/session3/target6:0:0/6:0:0:1")),
    ({"lun": "36001405aa\n"}, None),
    ({"lun": 7}, None),
    ({"lun": ""}, None),
    ({}, None),
    ({"scsi_device": "/sys/block/sda"}, None),
])
def test_check_trigger(request_, accepted):
    if accepted:
        assert control.check_trigger({"command": "trigger", **request_}) == accepted
    else:
        with pytest.raises(control.SuspiciousArgumentError):
            control.check_trigger({"command": "trigger", **request_})
