"""The journal handler: its datagrams, decoded as journald does, from a fake journal socket fed by the daemon."""

from __future__ import annotations

import array
import asyncio
import io
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from agent import journal, logfields
from tests.unit.fakes_kernel import FakeSystem
from tests.unit.fakes_udev import dm_disk_event
from tests.unit.test_daemon import config, routed, running, until


def decode(entry: bytes) -> list[tuple[str, bytes]]:
    """A native-protocol entry back into fields, as journald parses it (systemd.io/JOURNAL_NATIVE_PROTOCOL)."""
    fields, at = [], 0
    while at < len(entry):
        end = entry.index(b"\n", at)
        line = entry[at:end]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            at = end + 1
        else:
            name = line
            (size,) = struct.unpack("<Q", entry[end + 1:end + 9])
            value = entry[end + 9:end + 9 + size]
            assert entry[end + 9 + size:end + 10 + size] == b"\n", "length-form value not closed by a newline"
            at = end + 10 + size
        fields.append((name.decode(), value))
    return fields


class FakeJournal:
    """A unix datagram socket in a temporary directory, standing in for /run/systemd/journal/socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)

    def entries(self) -> list[dict[str, str]]:
        out = []
        while True:
            try:
                data, ancillary, _flags, _addr = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(4 * 4))
            except BlockingIOError:
                return out
            for level, kind, payload in ancillary:  # an entry passed in a memfd
                assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS) and not data
                fds = array.array("i", payload[:4])
                with os.fdopen(fds[0], "rb") as memfd:
                    memfd.seek(0)  # journald maps it: the sender's write offset is shared, not meant
                    data = memfd.read()
            out.append({name: value.decode() for name, value in decode(data)})

    def close(self) -> None:
        self.sock.close()


def test_plain_fields_and_a_value_with_newlines():
    entry = journal.encode([("MESSAGE", "Traceback:\n  line 1\n"), ("PRIORITY", "3"), ("WWID", "3600a")])
    assert entry == (b"MESSAGE\n" + struct.pack("<Q", 20) + b"Traceback:\n  line 1\n\n"
                     + b"PRIORITY=3\nWWID=3600a\n")
    assert decode(entry) == [("MESSAGE", b"Traceback:\n  line 1\n"), ("PRIORITY", b"3"), ("WWID", b"3600a")]


def test_binary_safe_values_round_trip():
    values = ["", "=", "a=b", "\n", "ünïcode", "x" * 10000 + "\n" + "y"]
    fields = [(f"F{n}", v) for n, v in enumerate(values)]
    assert decode(journal.encode(fields)) == [(name, v.encode()) for name, v in fields]


def test_priorities():
    assert [journal.priority(level) for level in (50, 40, 30, 20, 10, 25, 5)] == [2, 3, 4, 6, 7, 6, 7]


def test_stderr_is_the_journal_only_when_journal_stream_names_it(tmp_path):
    with open(tmp_path / "f", "w") as f:
        st = os.fstat(f.fileno())
        assert journal.stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, f.fileno())
        # Inherited by a process whose stderr was redirected: not the journal any more.
        assert not journal.stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, f.fileno())
        assert not journal.stderr_is_journal({"JOURNAL_STREAM": "junk"}, f.fileno())
        assert not journal.stderr_is_journal({}, f.fileno())


def test_the_daemon_handler_is_the_journal_only_under_it(tmp_path, monkeypatch):
    fake = FakeJournal(tmp_path / "socket")
    st = os.fstat(2)
    under_systemd = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    handler = journal.daemon_handler("%(message)s", environ=under_systemd, journal_socket=fake.path)
    assert isinstance(handler, journal.JournalHandler)
    handler.close()
    assert type(journal.daemon_handler("%(message)s", environ={}, journal_socket=fake.path)) is logging.StreamHandler
    no_socket = journal.daemon_handler("%(message)s", environ=under_systemd, journal_socket=tmp_path / "none")
    assert type(no_socket) is logging.StreamHandler
    fake.close()


def record(message: str, level: int = logging.INFO, **extra: str) -> logging.LogRecord:
    rec = logging.LogRecord("agent.test", level, "/x/agent/test.py", 7, message, (), None, func="f")
    rec.__dict__.update(extra)
    return rec


def test_an_entry_carries_the_context_and_extra_fields(tmp_path):
    fake = FakeJournal(tmp_path / "socket")
    handler = journal.JournalHandler(fake.path)
    with logfields.about(WWID="3600a", MPATH="mpatha"):
        logfields.add(MPATH="mpathb")
        handler.handle(record("fetch failed", logging.WARNING, **logfields.member("m1")))
    handler.handle(record("outside"))
    first, second = fake.entries()
    assert first == {"MESSAGE": "fetch failed", "PRIORITY": "4", "SYSLOG_IDENTIFIER": "switch-agent",
                     "LOGGER": "agent.test", "CODE_FILE": "/x/agent/test.py", "CODE_LINE": "7", "CODE_FUNC": "f",
                     "MEMBER": "m1", "MPATH": "mpathb", "WWID": "3600a"}
    assert "WWID" not in second
    handler.close()
    fake.close()


def test_a_traceback_is_one_entry_with_newlines_and_a_huge_one_goes_in_a_memfd(tmp_path):
    fake = FakeJournal(tmp_path / "socket")
    handler = journal.JournalHandler(fake.path)
    log = logging.getLogger("agent.test.journal")
    log.propagate = False
    log.addHandler(handler)
    try:
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("it failed")
        # Bigger than the socket's send buffer: EMSGSIZE, then the memfd way.
        handler._socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        log.error("big: %s", "z" * 200_000)
    finally:
        log.removeHandler(handler)
        handler.close()
    failed, big = fake.entries()
    assert failed["MESSAGE"].startswith("it failed\nTraceback") and "ValueError: boom" in failed["MESSAGE"]
    assert failed["EXCEPTION"] == "ValueError" and failed["PRIORITY"] == "3"
    assert big["MESSAGE"] == "big: " + "z" * 200_000
    fake.close()


def test_a_journal_that_is_gone_gets_the_line_on_the_fallback(tmp_path):
    lines = io.StringIO()
    fallback = logging.StreamHandler(lines)
    handler = journal.JournalHandler(tmp_path / "no-journal", fallback=fallback)
    handler.handle(record("still here"))
    assert lines.getvalue() == "still here\n"
    handler.close()


@pytest.mark.parametrize("name", ["wwid", "_PID", "1ST", "A-B", "X" * 65])
def test_field_names_are_checked(name):
    with pytest.raises(ValueError, match="journal field"):
        with logfields.about(**{name: "x"}):
            pass
    assert logfields.current() == {}


def test_the_daemons_own_messages_carry_the_luns_and_the_members_fields(tmp_path):
    """A real daemon code path (route, fail a leg path, heal it) into a fake journal socket."""
    fake = FakeJournal(tmp_path / "journal.socket")
    handler = journal.JournalHandler(fake.path)
    agent_log = logging.getLogger("agent")
    old_level = agent_log.level
    agent_log.setLevel(logging.INFO)
    agent_log.addHandler(handler)
    system = FakeSystem(tmp_path=tmp_path / "store")
    cfg = config(tmp_path)

    async def main():
        async with running(cfg, system, udev=True) as (daemon, source):
            await until(lambda: routed(system, daemon))
            lun = daemon.orchestrator.luns[system.wwid]
            plan = lun.stack.plan
            leg, dev = plan.legs[1], plan.leg_paths[1][0][0]
            system.dm.target_message(leg.name, 0, f"fail_path {dev}")
            source.emit(dm_disk_event("change", "dm-2", dm_name=leg.name, dm_uuid=leg.uuid,
                                      extra={"DM_ACTION": "PATH_FAILED", "DM_PATH": dev}))
            await until(lambda: not system.dm.devices[leg.name].failed)
            member = next(p.member_name for p in lun.topology.paths if p.dev == dev)
            return lun.topology.mpath_name, member

    try:
        mpath, member = asyncio.run(main())
    finally:
        agent_log.removeHandler(handler)
        agent_log.setLevel(old_level)
        handler.close()
    entries = fake.entries()
    fake.close()
    about_lun = [e for e in entries if e.get("WWID") == system.wwid]
    for e in about_lun:
        print(e.get("MEMBER", "-"), e.get("MPATH", "-"), e["MESSAGE"])
    messages = [e["MESSAGE"] for e in about_lun]
    assert any("routed as /dev/mapper/" in m for m in messages)
    assert any("reconciled in" in m for m in messages)
    # Every message naming the LUN carries its field, and the multipath name once it is known.
    assert all(e["WWID"] == system.wwid for e in entries if system.wwid in e["MESSAGE"])
    assert all(e.get("MPATH") == mpath for e in about_lun if "reconciled in" in e["MESSAGE"])
    reinstated = [e for e in about_lun if "reinstated" in e["MESSAGE"]]
    assert reinstated and reinstated[0]["MEMBER"] == member and reinstated[0]["PRIORITY"] == "6"


def test_messages_from_the_worker_threads_keep_the_luns_fields(tmp_path):
    """dm calls that wait for udev run on a pool of their own (not to_thread): they keep the caller's context."""
    from agent.dm_async import AsyncDeviceMapper

    fake = FakeJournal(tmp_path / "socket")
    handler = journal.JournalHandler(fake.path)
    log = logging.getLogger("agent.test.threads")
    log.propagate = False
    log.addHandler(handler)

    class WaitingDm:
        def device_remove(self, name=None, *, uuid=None, wait_for_udev=True):
            log.warning("udev cookie: udev did not complete in time")  # what dm_udev_sync says from that thread

    async def main():
        dm = AsyncDeviceMapper(WaitingDm())  # type: ignore[arg-type]
        with logfields.about(WWID="3600a"):
            await dm._waiting_for_udev(dm.dm.device_remove, uuid="SWAGENT-top-3600a")
            await asyncio.to_thread(log.warning, "from to_thread")

    try:
        asyncio.run(main())
    finally:
        log.removeHandler(handler)
        handler.close()
    assert [(e["MESSAGE"][:10], e.get("WWID")) for e in fake.entries()] == [
        ("udev cooki", "3600a"), ("from to_th", "3600a")]
    fake.close()


JOURNALD = Path("/lib/systemd/systemd-journald")
REAL_JOURNAL_SCRIPT = r"""
set -eu
mount -t tmpfs tmpfs /run   # a private /run in a private mount namespace: the host's is not touched
mkdir -p /run/systemd/journal
SYSTEMD_LOG_LEVEL=warning "$1" >/dev/null 2>&1 &
journald=$!
i=0; until [ -S /run/systemd/journal/socket ]; do i=$((i+1)); [ $i -lt 300 ] || exit 3; sleep 0.1; done
"$2" -c "$3"
journalctl --directory=/run/log/journal --sync >/dev/null 2>&1 || sleep 1
journalctl --directory=/run/log/journal WWID=36001405journalcheck -o json --all
kill $journald
"""
REAL_JOURNAL_CLIENT = """
import logging, socket
from agent import journal, logfields
handler = journal.JournalHandler()
log = logging.getLogger("agent.check")
log.addHandler(handler)
log.setLevel(logging.INFO)
with logfields.about(WWID="36001405journalcheck", MPATH="mpathj"):
    log.info("routed", extra=logfields.member("m2"))
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("with a traceback")
    handler._socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    log.warning("big %s", "z" * 300000)
log.info("about nothing")
"""


def _can_run_journald() -> bool:
    if os.geteuid() != 0 or not JOURNALD.exists() or not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_run_journald(), reason="needs root, unshare and systemd-journald")
def test_a_real_journald_takes_the_entries_and_finds_them_by_field():
    """systemd-journald itself, in a private mount namespace, behind the handler: plain, traceback, memfd."""
    done = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", REAL_JOURNAL_SCRIPT, "sh",
                           str(JOURNALD), sys.executable, REAL_JOURNAL_CLIENT],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    import json

    entries = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(e["MESSAGE"][:16], e["PRIORITY"], e.get("MEMBER"), e["MPATH"]) for e in entries] == [
        ("routed", "6", "m2", "mpathj"), ("with a traceback", "3", None, "mpathj"),
        ("big " + "z" * 12, "4", None, "mpathj")]
    assert "ValueError: boom" in entries[1]["MESSAGE"] and entries[1]["EXCEPTION"] == "ValueError"
    assert len(entries[2]["MESSAGE"]) == 300004  # sent in a sealed memfd
    assert all(e["SYSLOG_IDENTIFIER"] == "switch-agent" for e in entries)


def test_a_trigger_from_the_udev_rule_is_in_the_journal_with_its_lun(tmp_path):
    """The sign that the rule really ran `switch-agent trigger`: the daemon's info line, with WWID."""
    from agent import cli

    fake = FakeJournal(tmp_path / "journal.socket")
    handler = journal.JournalHandler(fake.path)
    agent_log = logging.getLogger("agent")
    old_level = agent_log.level
    agent_log.setLevel(logging.INFO)
    agent_log.addHandler(handler)
    system = FakeSystem(tmp_path=tmp_path / "store")
    cfg = config(tmp_path)

    async def main():
        async with running(cfg, system) as (daemon, _):
            await until(lambda: routed(system, daemon))
            argv = ["--socket", str(cfg.socket_path), "trigger", f"mpath-{system.wwid}"]
            return await asyncio.to_thread(cli.main, argv)

    try:
        assert asyncio.run(main()) == cli.EXIT_OK
    finally:
        agent_log.removeHandler(handler)
        agent_log.setLevel(old_level)
        handler.close()
    entries = [e for e in fake.entries() if "udev rule: trigger" in e["MESSAGE"]]
    fake.close()
    assert [(e["WWID"], e["PRIORITY"]) for e in entries] == [(system.wwid, "6")]


def test_a_task_replaces_the_fields_it_inherited_and_its_creator_keeps_its_own():
    async def other_lun() -> dict[str, str]:
        logfields.replace(WWID="B", MPATH=None)  # B's multipath name not known yet: no stale MPATH of A's
        await asyncio.sleep(0)
        return logfields.current()

    async def main() -> tuple[dict[str, str], dict[str, str]]:
        with logfields.about(WWID="A", MPATH="mpatha"):
            inner = await asyncio.create_task(other_lun())
            return inner, logfields.current()

    assert asyncio.run(main()) == ({"WWID": "B"}, {"WWID": "A", "MPATH": "mpatha"})
    assert logfields.current() == {}
