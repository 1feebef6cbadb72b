"""open-iscsi's ``iscsiadm``, run without a shell, with a timeout, off the event loop; no policy.

Each method is one iscsiadm command (named after it: ``discovery_sendtargets``,
``node_new``, ``node_update`` / ``node_update_many``, ``node_login``, ``node_logout``, ``node_delete``,
``session_new``, ``session_logout``), built as an argv list and handed to an
injectable runner (``run_subprocess``: an asyncio subprocess; tests pass a fake
iscsiadm). Session *state* is read from sysfs (``agent.kernel.sysfs``:
``Sysfs.iscsi_sessions()``), never parsed from iscsiadm's text; the only text
parsed here is SendTargets discovery's, which sysfs does not have.

Exit codes are open-iscsi's ``ISCSI_ERR_*`` (``include/iscsi_err.h``) and map to
the typed errors below. ``-o new`` on a session (``-m session -r SID -o new``:
one more session over the same node record and iface) is in open-iscsi since
2.0-873 and in Debian 12's 2.1.8. What 2.1.8 answered against LIO in the VM rig:
a node record already logged in, 15; a gone session id, 22 (not 2); a portal
that refuses or cannot be routed to, 11 for discovery (after ``reopen_max``
connect retries) and 8 for a login; a target the portal does not have, 8 (LIO
drops the connection); CHAP offered to a target without authentication, 19; a
bad setting name or value, 7; an unknown iface, 3.

Secrets (CHAP): iscsiadm takes node-record values only as ``-v VALUE``, so a
password is an argv element of the (root) iscsiadm process for the few
milliseconds of ``node_update`` -- readable in ``/proc/PID/cmdline`` by local
users unless /proc is mounted ``hidepid=invisible``. It is wrapped in ``Secret``
on the way: every log line and every error carries the argv with ``***`` in its
place, and the value is also scrubbed from iscsiadm's stdout/stderr kept in errors.

Errors::

    SwitchAgentError
     └── IscsiadmError              iscsiadm failed: argv (redacted), returncode, code, stderr
          ├── IscsiadmTimeoutError     it ran past its timeout (killed; returncode None)
          ├── IscsiadmMissingError     no iscsiadm binary
          ├── IscsiadmOutputError      it succeeded but printed what we cannot parse
          ├── IscsiNotFoundError       2, 21, 22: no such session / node record / target
          ├── IscsiSessionExistsError  15: that node record is already logged in
          ├── IscsiConnectError        4, 8, 11: portal unreachable, connect or PDU timed out
          ├── IscsiLoginError          5, 19: the target refused the login
          │    └── IscsiAuthError      24: authentication (CHAP) failed
          ├── IscsidError              9, 18, 20: iscsid not running / not answering
          └── IscsiInvalidError        6, 7: bad record, name or value (node DB)
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from agent.kernel.sysfs import Portal, same_address
from protocol.errors import SwitchAgentError

LOG = logging.getLogger(__name__)

ISCSIADM = "iscsiadm"
DEFAULT_IFACE = "default"
"""open-iscsi's built-in iface: software iSCSI over whatever route the kernel picks."""
DEFAULT_TIMEOUT_S = 60.0
STARTUP_MODES = ("manual", "automatic", "onboot")
"""Values of ``node.startup`` (iscsid logs ``automatic`` records in at its start)."""


class IscsiErr(enum.IntEnum):
    """iscsiadm's exit codes (open-iscsi ``include/iscsi_err.h``)."""

    SUCCESS = 0
    ERR = 1
    SESS_NOT_FOUND = 2
    NOMEM = 3
    TRANS = 4
    LOGIN = 5
    IDBM = 6
    INVAL = 7
    TRANS_TIMEOUT = 8
    INTERNAL = 9
    LOGOUT = 10
    PDU_TIMEOUT = 11
    TRANS_NOT_FOUND = 12
    ACCESS = 13
    TRANS_CAPS = 14
    SESS_EXISTS = 15
    INVALID_MGMT_REQ = 16
    ISNS_UNAVAILABLE = 17
    ISCSID_COMM_ERR = 18
    FATAL_LOGIN = 19
    ISCSID_NOTCONN = 20
    NO_OBJS_FOUND = 21
    SYSFS_LOOKUP = 22
    HOST_NOT_FOUND = 23
    LOGIN_AUTH_FAILED = 24
    ISNS_QUERY = 25
    ISNS_REG_FAILED = 26
    OP_NOT_SUPP = 27
    BUSY = 28
    AGAIN = 29
    UNKNOWN_DISCOVERY_TYPE = 30
    CHILD_TERMINATED = 31


class Secret:
    """A value that goes on iscsiadm's argv but never into a log line, repr or error text."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"


Arg = str | Secret


class IscsiadmError(SwitchAgentError):
    """iscsiadm failed. ``argv`` is the command with secrets as ``***``; ``code`` the
    ISCSI_ERR_* value when the exit code is one; ``detail`` iscsiadm's stderr (or stdout)."""

    def __init__(self, argv: Sequence[str], returncode: int | None, detail: str) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.code = _known_code(returncode)
        self.detail = detail
        name = f" {self.code.name}" if self.code is not None else ""
        rc = f"exit {returncode}{name}" if returncode is not None else "no exit code"
        super().__init__(f"{' '.join(self.argv)}: {rc}: {detail or 'no message'}")


class IscsiadmTimeoutError(IscsiadmError):
    """iscsiadm ran past ``timeout_s`` and was killed."""

    def __init__(self, argv: Sequence[str], timeout_s: float) -> None:
        self.timeout_s = timeout_s
        super().__init__(argv, None, f"did not finish within {timeout_s:g} s (killed)")


class IscsiadmMissingError(IscsiadmError):
    """The iscsiadm binary is not there (open-iscsi not installed)."""


class IscsiadmOutputError(IscsiadmError):
    """iscsiadm succeeded but printed something this module cannot parse."""


class IscsiNotFoundError(IscsiadmError):
    """No such session, node record, target or portal (ISCSI_ERR_SESS_NOT_FOUND, _NO_OBJS_FOUND,
    _SYSFS_LOOKUP: open-iscsi 2.1.8 says "Could not get session info for sid N" with 22)."""


class IscsiSessionExistsError(IscsiadmError):
    """The node record is already logged in (ISCSI_ERR_SESS_EXISTS)."""


class IscsiConnectError(IscsiadmError):
    """The portal could not be reached, or the connection/PDU timed out (_TRANS, _TRANS_TIMEOUT,
    _PDU_TIMEOUT)."""


class IscsiLoginError(IscsiadmError):
    """The target refused the login (ISCSI_ERR_LOGIN, _FATAL_LOGIN: e.g. unknown target)."""


class IscsiAuthError(IscsiLoginError):
    """The login failed authentication: CHAP required, or wrong credentials (_LOGIN_AUTH_FAILED)."""


class IscsidError(IscsiadmError):
    """iscsid is not running or does not answer (_INTERNAL, _ISCSID_COMM_ERR, _ISCSID_NOTCONN)."""


class IscsiInvalidError(IscsiadmError):
    """The node database refused a record, a setting name or its value (_IDBM, _INVAL)."""


_ERROR_BY_CODE: dict[int, type[IscsiadmError]] = {
    IscsiErr.SESS_NOT_FOUND: IscsiNotFoundError,
    IscsiErr.NO_OBJS_FOUND: IscsiNotFoundError,
    IscsiErr.SYSFS_LOOKUP: IscsiNotFoundError,  # 2.1.8's answer to -m session -r SID for a gone SID
    IscsiErr.SESS_EXISTS: IscsiSessionExistsError,
    IscsiErr.TRANS: IscsiConnectError,
    IscsiErr.TRANS_TIMEOUT: IscsiConnectError,
    IscsiErr.PDU_TIMEOUT: IscsiConnectError,
    IscsiErr.LOGIN: IscsiLoginError,
    IscsiErr.FATAL_LOGIN: IscsiLoginError,
    IscsiErr.LOGIN_AUTH_FAILED: IscsiAuthError,
    IscsiErr.INTERNAL: IscsidError,
    IscsiErr.ISCSID_COMM_ERR: IscsidError,
    IscsiErr.ISCSID_NOTCONN: IscsidError,
    IscsiErr.IDBM: IscsiInvalidError,
    IscsiErr.INVAL: IscsiInvalidError,
}


def _known_code(returncode: int | None) -> IscsiErr | None:
    try:
        return IscsiErr(returncode) if returncode is not None else None
    except ValueError:
        return None


@dataclass(frozen=True)
class RunResult:
    """What a runner reports of one finished process."""

    returncode: int
    stdout: str
    stderr: str


Runner = Callable[[Sequence[str]], Awaitable[RunResult]]
"""Runs one argv (no shell) to completion. Cancelling it must kill the process: the timeout is
applied around it by ``Iscsiadm``. Raises FileNotFoundError if the program does not exist."""


async def run_subprocess(argv: Sequence[str]) -> RunResult:
    """The real runner: an asyncio subprocess, stdin from /dev/null, stdout/stderr captured;
    killed (and reaped) if the caller's timeout cancels it."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await proc.communicate()
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await asyncio.shield(proc.wait())
        raise
    assert proc.returncode is not None
    return RunResult(proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))


@dataclass(frozen=True)
class DiscoveredPortal:
    """One line of SendTargets discovery: a target reachable at a portal of a portal group."""

    target: str
    portal: Portal
    tpgt: int
    """The portal group tag (an array member's target portal group, in EqualLogic-style arrays)."""


# "127.0.0.1:3260,1 iqn.2003-01.org.example:vol" / "[fd00::1]:3260,2 iqn..."
_SENDTARGETS_LINE = re.compile(r"^(?:\[(?P<v6>[^\]\s]+)\]|(?P<v4>[^\s:\[\],]+)):(?P<port>\d+),"
                               r"(?P<tpgt>\d+)\s+(?P<target>\S+)$")
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+@-]*$")
"""iSCSI names (RFC 3722: iqn./eui./naa. with letters, digits, - . :) and iface names: what may go
on the argv after -T / -I (nothing starting with '-': no option injection)."""
_SETTING_OK = re.compile(r"^[a-z][A-Za-z0-9_.]*(\[\d+\][A-Za-z0-9_.]*)*$")
"""Node-record setting names: ``node.startup``, ``node.conn[0].timeo.login_timeout``."""


def parse_sendtargets(stdout: str) -> list[DiscoveredPortal]:
    """Parse ``iscsiadm -m discovery -t sendtargets`` output; raises ValueError on a line that is
    not ``ADDRESS:PORT,TPGT TARGET`` (ADDRESS in brackets for IPv6)."""
    found = []
    for line in stdout.splitlines():
        line = line.strip()
        if not line:
            continue
        m = _SENDTARGETS_LINE.match(line)
        if not m or not _NAME_OK.match(m["target"]):
            raise ValueError(f"not a SendTargets line: {line!r}")
        port, tpgt = int(m["port"]), int(m["tpgt"])
        if not 0 < port < 65536 or tpgt > 65535:
            raise ValueError(f"port or portal group tag out of range: {line!r}")
        found.append(DiscoveredPortal(m["target"], Portal(m["v6"] or m["v4"], port), tpgt))
    return found


def _check_value(kind: str, value: str, pattern: re.Pattern[str] = _NAME_OK) -> str:
    if not isinstance(value, str) or not pattern.match(value):
        raise ValueError(f"not a usable {kind}: {value!r}")
    return value


def _portal_arg(portal: Portal) -> str:
    """``-p`` wants ``ADDR:PORT`` with an IPv6 address in brackets (``Portal.__str__``)."""
    if not portal.address or any(c in portal.address for c in " ,[]") or portal.address.startswith("-") \
            or not 0 < portal.port < 65536:
        raise ValueError(f"not a usable portal: {portal!r}")
    return str(portal)


class Iscsiadm:
    """Runs iscsiadm commands: one method per command, each with a timeout (``timeout_s`` unless
    the call gives its own), errors typed by exit code."""

    def __init__(self, runner: Runner = run_subprocess, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 binary: str = ISCSIADM) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        self.runner = runner
        self.timeout_s = timeout_s
        self.binary = binary

    async def run(self, args: Sequence[Arg], *, timeout_s: float | None = None) -> RunResult:
        """Run ``iscsiadm ARGS``; returns the result of a zero exit, raises a typed error otherwise."""
        argv = [self.binary, *args]
        secrets = [a.value for a in argv if isinstance(a, Secret) and a.value]
        shown = [str(a) for a in argv]
        real = [a.value if isinstance(a, Secret) else a for a in argv]
        limit = self.timeout_s if timeout_s is None else timeout_s
        LOG.debug("run %s (timeout %g s)", " ".join(shown), limit)
        try:
            async with asyncio.timeout(limit):
                result = await self.runner(real)
        except TimeoutError:
            raise IscsiadmTimeoutError(shown, limit) from None
        except FileNotFoundError:
            raise IscsiadmMissingError(shown, None, f"{self.binary} not found (is open-iscsi installed?)") from None
        if result.returncode != 0:
            detail = _scrub((result.stderr or result.stdout).strip(), secrets)
            error = _ERROR_BY_CODE.get(result.returncode, IscsiadmError)
            raise error(shown, result.returncode, detail)
        return result

    # -- discovery -------------------------------------------------------------

    async def discovery_sendtargets(self, portal: Portal, *, iface: str = DEFAULT_IFACE,
                                    timeout_s: float | None = None) -> list[DiscoveredPortal]:
        """SendTargets discovery at ``portal``: every (target, portal, tpgt) it lists.

        ``-o nonpersistent``: iscsiadm writes no node records (it would make one per listed
        portal of every target); the caller makes the records it will log in with.
        """
        args = ["-m", "discovery", "-t", "sendtargets", "-p", _portal_arg(portal),
                "-I", _check_value("iface name", iface), "-o", "nonpersistent"]
        result = await self.run(args, timeout_s=timeout_s)
        try:
            return parse_sendtargets(result.stdout)
        except ValueError as exc:
            raise IscsiadmOutputError([self.binary, *args], 0, str(exc)) from exc

    # -- node records ----------------------------------------------------------

    def _node(self, target: str, portal: Portal, iface: str) -> list[Arg]:
        return ["-m", "node", "-T", _check_value("target name", target), "-p", _portal_arg(portal),
                "-I", _check_value("iface name", iface)]

    async def node_new(self, target: str, portal: Portal, *, iface: str = DEFAULT_IFACE,
                       timeout_s: float | None = None) -> None:
        """Create the node record (target, portal, iface) with iscsid.conf's defaults."""
        await self.run([*self._node(target, portal, iface), "-o", "new"], timeout_s=timeout_s)

    async def node_update(self, target: str, portal: Portal, name: str, value: Arg, *,
                          iface: str = DEFAULT_IFACE, timeout_s: float | None = None) -> None:
        """Set one setting of a node record (``node.startup``, ``node.session.nr_sessions`` ...).
        Pass a secret value as ``Secret(...)``: it is kept out of logs and errors."""
        await self.node_update_many(target, portal, [(name, value)], iface=iface, timeout_s=timeout_s)

    async def node_update_many(self, target: str, portal: Portal, settings: Sequence[tuple[str, Arg]], *,
                               iface: str = DEFAULT_IFACE, timeout_s: float | None = None) -> None:
        """Set several settings of a node record in one iscsiadm call (``-o update -n N1 -v V1 -n N2
        -v V2 ...``: iscsiadm takes every pair): each call is most of a second under TCG, and a
        joining member's record waits for them. Secrets as in ``node_update``."""
        if not settings:
            raise ValueError("no settings to update")
        args: list[Arg] = [*self._node(target, portal, iface), "-o", "update"]
        for name, value in settings:
            shown_value = value.value if isinstance(value, Secret) else value
            if "\n" in shown_value or "\0" in shown_value:
                raise ValueError(f"value of {name} has a newline or NUL")  # the record file is line-based
            args += ["-n", _check_value("setting name", name, _SETTING_OK), "-v", value]
        await self.run(args, timeout_s=timeout_s)

    async def node_set_startup(self, target: str, portal: Portal, startup: str, *,
                               iface: str = DEFAULT_IFACE) -> None:
        """``node.startup``: ``manual``, ``automatic`` (iscsid logs it in at start) or ``onboot``."""
        await self.node_update_many(target, portal, [startup_setting(startup)], iface=iface)

    async def node_set_chap(self, target: str, portal: Portal, *, username: str, password: str,
                            username_in: str | None = None, password_in: str | None = None,
                            iface: str = DEFAULT_IFACE) -> None:
        """Write CHAP into the node record (``node.session.auth.*``), ``_in`` for mutual CHAP.
        Username and password are passed as ``Secret``s: never logged, never in an error."""
        await self.node_update_many(target, portal, chap_settings(username, password, username_in, password_in),
                                    iface=iface)

    async def node_exists(self, target: str, portal: Portal, *, iface: str = DEFAULT_IFACE,
                          timeout_s: float | None = None) -> bool:
        """Whether the node record (target, portal, iface) is there (``-o show``; its text, which
        may hold CHAP settings, is not kept). Unlike ``--login`` it changes nothing."""
        try:
            await self.run([*self._node(target, portal, iface), "-o", "show"], timeout_s=timeout_s)
        except IscsiNotFoundError:
            return False
        return True

    async def node_delete(self, target: str, portal: Portal, *, iface: str = DEFAULT_IFACE,
                          timeout_s: float | None = None) -> None:
        """Delete the node record (iscsiadm logs its sessions out first, if any)."""
        await self.run([*self._node(target, portal, iface), "-o", "delete"], timeout_s=timeout_s)

    # -- sessions --------------------------------------------------------------

    async def node_login(self, target: str, portal: Portal, *, iface: str = DEFAULT_IFACE,
                         timeout_s: float | None = None) -> None:
        """Log the node record in (``node.session.nr_sessions`` sessions, normally one). Returns
        when iscsid has the session up and the SCSI scan has been started."""
        await self.run([*self._node(target, portal, iface), "--login"], timeout_s=timeout_s)

    async def node_logout(self, target: str, portal: Portal, *, iface: str = DEFAULT_IFACE,
                          timeout_s: float | None = None) -> None:
        """Log out every session of the node record (target, portal, iface)."""
        await self.run([*self._node(target, portal, iface), "--logout"], timeout_s=timeout_s)

    async def session_new(self, sid: int, *, timeout_s: float | None = None) -> None:
        """One more session over session ``sid``'s node record and iface (``-r SID -o new``)."""
        await self.run(["-m", "session", "-r", _sid_arg(sid), "-o", "new"], timeout_s=timeout_s)

    async def session_logout(self, sid: int, *, timeout_s: float | None = None) -> None:
        """Log out session ``sid`` only (the record's other sessions stay)."""
        await self.run(["-m", "session", "-r", _sid_arg(sid), "--logout"], timeout_s=timeout_s)


NODE_DB_DIRS = ("/etc/iscsi/nodes", "/var/lib/iscsi/nodes")
"""Where open-iscsi keeps node records (its ``ISCSI_DB_ROOT``: Debian's, and RHEL's and SUSE's)."""


class NodeRecords:
    """Whether a node record exists, from open-iscsi's record directory, without running iscsiadm.

    A record is ``<db>/<target>/<address>,<port>,<tpgt>/<iface>`` (open-iscsi's idbm; ``tpgt`` is -1
    for a record made with ``-o new``). The layout is open-iscsi's, not an interface it promises,
    so an answer counts only where a record known to exist (that of a logged-in session) is found
    the same way; otherwise ``absent()`` says None and the caller asks iscsiadm. Nothing is written.
    """

    def __init__(self, dirs: Sequence[str] = NODE_DB_DIRS) -> None:
        self.dirs = tuple(dirs)

    def absent(self, target: str, portal: Portal, iface: str, *, known: Sequence[tuple[Portal, str]]) -> bool | None:
        """True: no record for (target, portal, iface) in the record directory that holds the records
        of ``known`` (portal, iface) pairs of the target; None when no directory holds those (then
        this cannot tell); False: it is there."""
        for db in self.dirs:
            entries = self._entries(os.path.join(db, target))
            if entries and known and all(self._has(db, target, entries, p, i) for p, i in known):
                return not self._has(db, target, entries, portal, iface)
        return None

    @staticmethod
    def _entries(path: str) -> list[str]:
        try:
            return os.listdir(path)
        except OSError:
            return []

    @staticmethod
    def _has(db: str, target: str, entries: list[str], portal: Portal, iface: str) -> bool:
        for entry in entries:  # "<address>,<port>,<tpgt>"
            address, _, port = entry.rpartition(",")[0].rpartition(",")
            if not (port.isdigit() and int(port) == portal.port and same_address(address, portal.address)):
                continue
            if os.path.lexists(os.path.join(db, target, entry, iface)):
                return True
        return False


def startup_setting(startup: str) -> tuple[str, Arg]:
    """``node.startup``: ``manual``, ``automatic`` (iscsid logs it in at start) or ``onboot``."""
    if startup not in STARTUP_MODES:
        raise ValueError(f"node.startup must be one of {', '.join(STARTUP_MODES)}, got {startup!r}")
    return ("node.startup", startup)


def chap_settings(username: str, password: str, username_in: str | None = None,
                  password_in: str | None = None) -> list[tuple[str, Arg]]:
    """The node-record settings of CHAP (``_in``: mutual CHAP), the credentials as ``Secret``s."""
    if not username or not password or (username_in is None) != (password_in is None):
        raise ValueError("CHAP needs a username and a password (and both or neither _in)")
    settings: list[tuple[str, Arg]] = [
        ("node.session.auth.authmethod", "CHAP"),
        ("node.session.auth.username", Secret(username)),
        ("node.session.auth.password", Secret(password)),
    ]
    if username_in is not None and password_in is not None:
        settings += [("node.session.auth.username_in", Secret(username_in)),
                     ("node.session.auth.password_in", Secret(password_in))]
    return settings


def _sid_arg(sid: int) -> str:
    if isinstance(sid, bool) or not isinstance(sid, int) or sid < 0:
        raise ValueError(f"not a session id: {sid!r}")
    return str(sid)


def _scrub(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text
