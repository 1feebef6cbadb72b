"""A fake iscsiadm that behaves like open-iscsi's: node records, sessions, exit codes, messages.

``FakeIscsiadm`` is a runner for ``agent.kernel.iscsi.Iscsiadm``: it parses the
argv the way iscsiadm does (``-m node -T -p -I -o/-n/-v``, ``--login``,
``--logout``, ``-m session -r SID -o new``, ``-m discovery -t sendtargets``),
keeps node records and sessions, answers with iscsiadm's exit codes
(``ISCSI_ERR_*``) and messages as open-iscsi 2.1.8 gave them against LIO in the VM rig, and -- given a ``sysfs_root`` -- lays every
session out where the kernel does (``write_session_tree``), so the sysfs reader
sees what the fake did. Every argv is recorded in ``calls``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.kernel.iscsi import IscsiErr, RunResult
from agent.kernel.sysfs import Portal

NODE_SETTINGS = {
    "node.startup", "node.session.nr_sessions", "node.session.timeo.replacement_timeout",
    "node.session.auth.authmethod", "node.session.auth.username", "node.session.auth.password",
    "node.session.auth.username_in", "node.session.auth.password_in", "node.conn[0].timeo.login_timeout",
    "node.session.initial_login_retry_max",
}
"""Node-record settings the fake accepts (open-iscsi has many more; others answer 7 as it does to a
name it does not know)."""


LOGIN_ERRORS = {
    IscsiErr.TRANS_TIMEOUT: "connection timed out",
    IscsiErr.FATAL_LOGIN: "encountered non-retryable iSCSI login failure",
    IscsiErr.LOGIN_AUTH_FAILED: "iSCSI login failed due to authorization failure",
}
"""iscsi_err_to_str() of the login failures the fake reports."""


@dataclass
class FakeTarget:
    """A target the fake array offers: its portals with their portal group tags, and CHAP."""

    name: str
    portals: dict[Portal, int]
    chap: tuple[str, str] | None = None
    """(username, password) the target requires; None: no authentication."""
    luns: int = 1


@dataclass
class FakeSession:
    sid: int
    host: int
    target: str
    portal: Portal
    tpgt: int
    iface: str
    state: str = "LOGGED_IN"
    disks: list[str] = field(default_factory=list)


def _parse_portal(text: str) -> Portal | None:
    if text.startswith("["):
        address, sep, port = text[1:].partition("]:")
    else:
        address, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return Portal(address, int(port))


def _disk_name(index: int) -> str:
    """The kernel's sd naming: 0 -> sda, 25 -> sdz, 26 -> sdaa."""
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(ord("a") + rest) + letters
    return "sd" + letters


def write_session_tree(root: Path, session: FakeSession, *, recovery_tmo: int = 120) -> None:
    """Lay out one session as scsi_transport_iscsi does: the device under its SCSI host, the
    class links, the connection, and a LUN with an sd disk per entry of ``session.disks``."""
    sess_dir = root / "devices" / "platform" / f"host{session.host}" / f"session{session.sid}"
    attrs = sess_dir / "iscsi_session" / f"session{session.sid}"
    attrs.mkdir(parents=True, exist_ok=True)
    for name, value in (("targetname", session.target), ("tpgt", str(session.tpgt)), ("state", session.state),
                        ("recovery_tmo", str(recovery_tmo)), ("ifacename", session.iface)):
        (attrs / name).write_text(value + "\n")
    conn = f"connection{session.sid}:0"
    conn_dir = sess_dir / conn / "iscsi_connection" / conn
    conn_dir.mkdir(parents=True, exist_ok=True)
    (conn_dir / "persistent_address").write_text(session.portal.address + "\n")
    (conn_dir / "persistent_port").write_text(f"{session.portal.port}\n")
    for lun, disk in enumerate(session.disks):
        (sess_dir / f"target{session.host}:0:0" / f"{session.host}:0:0:{lun}" / "block" / disk).mkdir(
            parents=True, exist_ok=True)
    for cls, name, real in (("iscsi_session", f"session{session.sid}", attrs), ("iscsi_connection", conn, conn_dir)):
        link = root / "class" / cls / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(os.path.relpath(real, link.parent))


def remove_session_tree(root: Path, session: FakeSession) -> None:
    """What the kernel removes when a session ends."""
    for link in (root / "class" / "iscsi_session" / f"session{session.sid}",
                 root / "class" / "iscsi_connection" / f"connection{session.sid}:0"):
        if link.is_symlink():
            link.unlink()
    shutil.rmtree(root / "devices" / "platform" / f"host{session.host}", ignore_errors=True)


class FakeIscsiadm:
    """open-iscsi's iscsiadm + iscsid as far as the agent uses them (see the module docstring)."""

    def __init__(self, targets: Sequence[FakeTarget], *, sysfs_root: Path | None = None,
                 unreachable: Sequence[Portal] = ()) -> None:
        self.targets = {t.name: t for t in targets}
        self.sysfs_root = sysfs_root
        self.unreachable = set(unreachable)
        self.records: dict[tuple[str, Portal, str], dict[str, str]] = {}
        self.sessions: dict[int, FakeSession] = {}
        self.calls: list[list[str]] = []
        self.hang: Callable[[list[str]], bool] = lambda argv: False
        """Make a call never finish (until cancelled), as iscsiadm stuck on a dead portal."""
        self.cancelled: list[list[str]] = []
        self._next_sid = 1
        self._next_host = 2
        self._next_disk = 1

    # -- the runner --------------------------------------------------------------

    async def __call__(self, argv: Sequence[str]) -> RunResult:
        argv = list(argv)
        self.calls.append(argv)
        if self.hang(argv):
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.append(argv)
                raise
        return self.handle(argv)

    def handle(self, argv: list[str]) -> RunResult:
        if not argv or argv[0] != "iscsiadm":
            raise FileNotFoundError(argv[0] if argv else "")
        opts, flags = self._parse(argv[1:])
        if opts is None:
            return self._fail(IscsiErr.INVAL, "iscsiadm: unrecognized option or missing value")
        mode = opts.get("m")
        if mode == "discovery":
            return self._discovery(opts)
        if mode == "node":
            return self._node(opts, flags)
        if mode == "session":
            return self._session(opts, flags)
        return self._fail(IscsiErr.INVAL, f"iscsiadm: Invalid mode {mode!r}")

    @staticmethod
    def _parse(args: list[str]) -> tuple[dict[str, str] | None, set[str]]:
        """Options and flags; the -n/-v pairs, as iscsiadm takes several, also as ``pairs`` (name NUL
        value, one per line) in the options."""
        takes = {"-m": "m", "-t": "t", "-p": "p", "-T": "T", "-I": "I", "-o": "o", "-n": "n", "-v": "v",
                 "-r": "r", "--op": "o"}
        flags_ = {"--login": "login", "-l": "login", "--logout": "logout", "-u": "logout"}
        opts: dict[str, str] = {}
        flags: set[str] = set()
        pairs: list[str] = []
        name: str | None = None
        i = 0
        while i < len(args):
            a = args[i]
            if a in takes and i + 1 < len(args):
                opts[takes[a]] = args[i + 1]
                if a == "-n":
                    name = args[i + 1]
                elif a == "-v" and name is not None:
                    pairs.append(f"{name}\0{args[i + 1]}")
                    name = None
                i += 2
            elif a in flags_:
                flags.add(flags_[a])
                i += 1
            else:
                return None, flags
        if pairs:
            opts["pairs"] = "\n".join(pairs)
        return opts, flags

    @staticmethod
    def _ok(stdout: str = "") -> RunResult:
        return RunResult(0, stdout, "")

    @staticmethod
    def _fail(code: IscsiErr, stderr: str) -> RunResult:
        return RunResult(int(code), "", stderr + "\n")

    # -- modes -------------------------------------------------------------------

    def _discovery(self, opts: dict[str, str]) -> RunResult:
        portal = _parse_portal(opts.get("p", ""))
        if opts.get("t") not in ("sendtargets", "st") or portal is None:
            return self._fail(IscsiErr.INVAL, "iscsiadm: discovery mode: option '-t' and '-p' are required")
        offered = [t for t in self.targets.values() if portal in t.portals]
        if portal in self.unreachable or not offered:
            # 2.1.8 retries the connect reopen_max times, then reports ISCSI_ERR_PDU_TIMEOUT
            refused = f"iscsiadm: cannot make connection to {portal.address}: Connection refused\n"
            return self._fail(IscsiErr.PDU_TIMEOUT, refused * 6 + "iscsiadm: connection login retries "
                              "(reopen_max) 5 exceeded\niscsiadm: Could not perform SendTargets discovery: "
                              "iSCSI PDU timed out")
        lines = [f"{p},{tpgt} {t.name}" for t in self.targets.values() for p, tpgt in t.portals.items()]
        if opts.get("o") != "nonpersistent":
            for t in self.targets.values():
                for p in t.portals:
                    self.records.setdefault((t.name, p, opts.get("I", "default")), {"node.startup": "automatic"})
        return self._ok("".join(line + "\n" for line in lines))

    def _node(self, opts: dict[str, str], flags: set[str]) -> RunResult:
        target, portal, iface = opts.get("T"), _parse_portal(opts.get("p", "")), opts.get("I", "default")
        if target is None or portal is None:
            return self._fail(IscsiErr.INVAL, "iscsiadm: node mode needs -T and -p here")
        key = (target, portal, iface)
        rec = f"[iface: {iface}, target: {target}, portal: {portal.address},{portal.port}]"
        op = opts.get("o")
        if op == "new":
            self.records[key] = {"node.startup": "automatic", "node.session.nr_sessions": "1"}
            return self._ok(f"New iSCSI node [tcp:[hw=,ip=,net_if=,iscsi_if={iface}] "
                            f"{portal.address},{portal.port},-1 {target}] added\n")
        if key not in self.records:
            return self._fail(IscsiErr.NO_OBJS_FOUND, "iscsiadm: No records found")
        if op == "update":
            pairs = [tuple(p.split("\0", 1)) for p in opts["pairs"].split("\n")] if "pairs" in opts else []
            if not pairs:
                return self._fail(IscsiErr.INVAL, "iscsiadm: update requires name and value")
            for name, _ in pairs:  # all checked before any is written, as iscsiadm writes the record once
                if name not in NODE_SETTINGS:
                    return self._fail(IscsiErr.INVAL, f"iscsiadm: Cannot modify {name}. Invalid param name.")
            for name, value in pairs:
                self.records[key][name] = value
            return self._ok()
        if op == "show":
            return self._ok("".join(f"{k} = {v}\n" for k, v in sorted(self.records[key].items())))
        if op == "delete":
            for s in [s for s in self.sessions.values() if (s.target, s.portal, s.iface) == key]:
                self._end(s)
            del self.records[key]
            return self._ok()
        if "login" in flags:
            present = sum(1 for s in self.sessions.values() if (s.target, s.portal, s.iface) == key)
            wanted = int(self.records[key].get("node.session.nr_sessions", "1"))
            if present >= wanted:
                return self._fail(IscsiErr.SESS_EXISTS, f"iscsiadm: {iface}: {wanted} session requested, but "
                                                        f"{present} already present.\n"
                                                        "iscsiadm: Could not log into all portals")
            code = self._login_check(target, portal, self.records[key])
            if code is not None:
                return RunResult(int(code), f"Logging in to {rec}\n",
                                 f"iscsiadm: Could not login to {rec}.\niscsiadm: initiator reported error "
                                 f"({int(code)} - {LOGIN_ERRORS[code]})\niscsiadm: Could not log into all portals\n")
            many = " (multiple)" if wanted - present > 1 else ""
            for _ in range(wanted - present):
                self._start(target, portal, iface)
            return self._ok(f"Logging in to {rec}{many}\n" * (wanted - present)
                            + f"Login to {rec} successful.\n" * (wanted - present))
        if "logout" in flags:
            ours = [s for s in self.sessions.values() if (s.target, s.portal, s.iface) == key]
            if not ours:
                return self._fail(IscsiErr.NO_OBJS_FOUND, "iscsiadm: No matching sessions found")
            for s in ours:
                self._end(s)
            return self._ok(f"Logging out of session [sid: {ours[0].sid}, target: {target}, portal: "
                            f"{portal.address},{portal.port}]\nLogout of {rec} successful.\n")
        return self._fail(IscsiErr.INVAL, "iscsiadm: no operation given")

    def _session(self, opts: dict[str, str], flags: set[str]) -> RunResult:
        sid_text = opts.get("r", "")
        if not sid_text.isdigit():
            return self._fail(IscsiErr.INVAL, f"iscsiadm: invalid session id {sid_text!r}")
        session = self.sessions.get(int(sid_text))
        if session is None:  # 2.1.8 answers 22 (ISCSI_ERR_SYSFS_LOOKUP) here, not 2
            return self._fail(IscsiErr.SYSFS_LOOKUP, "iscsiadm: could not read session targetname: 5\n"
                                                     f"iscsiadm: Could not get session info for sid {sid_text}")
        if opts.get("o") == "new":
            record = self.records.get((session.target, session.portal, session.iface))
            if record is None:
                return self._fail(IscsiErr.NO_OBJS_FOUND, "iscsiadm: No records found")
            rec = f"[iface: {session.iface}, target: {session.target}, portal: " \
                  f"{session.portal.address},{session.portal.port}]"
            code = self._login_check(session.target, session.portal, record)
            if code is not None:
                return RunResult(int(code), f"Logging in to {rec} (multiple)\n",
                                 f"iscsiadm: Could not login to {rec}.\niscsiadm: initiator reported error "
                                 f"({int(code)} - {LOGIN_ERRORS[code]})\n")
            self._start(session.target, session.portal, session.iface)
            return self._ok(f"Logging in to {rec} (multiple)\nLogin to {rec} successful.\n")
        if "logout" in flags:
            self._end(session)
            rec = f"[sid: {session.sid}, target: {session.target}, portal: " \
                  f"{session.portal.address},{session.portal.port}]"
            return self._ok(f"Logging out of session {rec}\nLogout of {rec} successful.\n")
        return self._fail(IscsiErr.INVAL, "iscsiadm: no operation given")

    # -- the "kernel" ------------------------------------------------------------

    def _login_check(self, target: str, portal: Portal, record: dict[str, str]) -> IscsiErr | None:
        """What open-iscsi 2.1.8 reported against LIO in the VM rig."""
        t = self.targets.get(target)
        if portal in self.unreachable or t is None or portal not in t.portals:
            return IscsiErr.TRANS_TIMEOUT  # LIO drops a login to a target it does not have: 8, not 19
        if t.chap is None and record.get("node.session.auth.authmethod") == "CHAP":
            return IscsiErr.FATAL_LOGIN  # CHAP offered to a target without authentication
        if t.chap is not None:
            given = (record.get("node.session.auth.username"), record.get("node.session.auth.password"))
            if record.get("node.session.auth.authmethod") != "CHAP" or given != t.chap:
                return IscsiErr.LOGIN_AUTH_FAILED
        return None

    def _start(self, target: str, portal: Portal, iface: str) -> FakeSession:
        session = FakeSession(self._next_sid, self._next_host, target, portal,
                              self.targets[target].portals[portal], iface)
        self._next_sid += 1
        self._next_host += 1
        for _ in range(self.targets[target].luns):
            session.disks.append(_disk_name(self._next_disk))
            self._next_disk += 1
        self.sessions[session.sid] = session
        if self.sysfs_root is not None:
            write_session_tree(self.sysfs_root, session)
        return session

    def _end(self, session: FakeSession) -> None:
        del self.sessions[session.sid]
        if self.sysfs_root is not None:
            remove_session_tree(self.sysfs_root, session)

    # -- what tests do to it -----------------------------------------------------

    def kill_session(self, sid: int) -> None:
        """The session ends behind the agent's back (``iscsiadm -m session -r SID -u`` by hand)."""
        self._end(self.sessions[sid])

    def fail_session(self, sid: int) -> None:
        """The connection drops: the kernel marks the session FAILED while iscsid reconnects."""
        session = self.sessions[sid]
        session.state = "FAILED"
        if self.sysfs_root is not None:
            write_session_tree(self.sysfs_root, session)
