"""The initiator side of the emulated array: iscsiadm, the sd devices of each session, multipathd's map.

Runs in the CLI process, never in the server: a login's SCSI scan needs the
server to answer, so the two must not share a thread.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.array.errors import InitiatorError

SYS = Path("/sys")
PORT = 3260
# Under multipath a dead path should fail over quickly, not after 120 s.
REPLACEMENT_TIMEOUT_S = 5


@dataclass
class Session:
    """One iSCSI session to the emulated target, and the sd devices it carries."""

    sid: str  # "session3"
    target: str
    tpgt: int
    address: str
    devices: list[str] = field(default_factory=list)  # ["sdb"]

    @property
    def member_number(self) -> int:
        """The member this session lands on (TPG tag k+1)."""
        return self.tpgt - 1


def _run(argv: list[str], *, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as exc:
        raise InitiatorError(f"{argv[0]} is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise InitiatorError(f"{' '.join(argv)} did not finish within {timeout} s") from exc
    if check and result.returncode:
        raise InitiatorError(f"{' '.join(argv)} failed ({result.returncode}): "
                             f"{(result.stderr or result.stdout).strip()}")
    return result


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def sessions(target: str, sys_root: Path = SYS) -> list[Session]:
    """Sessions to `target` with their sd devices, from /sys/class/iscsi_session."""
    found = []
    for entry in sorted((sys_root / "class/iscsi_session").glob("session*")):
        if _read(entry / "targetname") != target:
            continue
        tpgt = int(_read(entry / "tpgt") or 0)
        address = ""
        for conn in (sys_root / "class/iscsi_connection").glob(f"connection{entry.name[7:]}:*"):
            address = _read(conn / "persistent_address") or _read(conn / "address")
        try:
            devices = sorted(p.name for p in (entry / "device").glob("target*/*:*:*:*/block/*"))
        except FileNotFoundError:  # logged out while being read (the glob's scandir raises): going away
            continue
        found.append(Session(entry.name, target, tpgt, address, devices))
    return found


def multipath_map(wwid: str, sys_root: Path = SYS) -> str | None:
    """The dm name of multipathd's map for `wwid` (DM uuid mpath-<wwid>), or None."""
    for dm in (sys_root / "block").glob("dm-*"):
        if _read(dm / "dm/uuid") == f"mpath-{wwid}":
            return _read(dm / "dm/name")
    return None


def discover(portal_ip: str) -> None:
    """SendTargets discovery through one portal (LIO lists every enabled TPG's portal)."""
    _run(["iscsiadm", "-m", "discovery", "-t", "sendtargets", "-p", f"{portal_ip}:{PORT}"])


def node_settings(chap=None) -> list[tuple[str, str]]:
    """The node-record settings login writes: a short replacement timeout, and CHAP when given.

    `chap` is a tests.array.lio.Chap (test credentials: they pass through
    iscsiadm's command line, which the agent itself never does).
    """
    settings = [("node.session.timeo.replacement_timeout", str(REPLACEMENT_TIMEOUT_S))]
    if chap is not None:
        settings += [("node.session.auth.authmethod", "CHAP"),
                     ("node.session.auth.username", chap.userid),
                     ("node.session.auth.password", chap.password)]
    return settings


def login(target: str, portal_ip: str, timeout: float = 120.0, *, chap=None) -> None:
    """Log in to one member's portal (after discovery made its node record).

    iscsiadm returns once iscsid has scanned the session's LUNs: allow
    more `timeout` for many LUNs.
    """
    node = ["iscsiadm", "-m", "node", "-T", target, "-p", f"{portal_ip}:{PORT}"]
    for name, value in node_settings(chap):
        _run(node + ["-o", "update", "-n", name, "-v", value])
    result = _run(node + ["--login"], check=False, timeout=timeout)
    # 15 = ISCSI_ERR_SESS_EXISTS: already logged in is fine.
    if result.returncode not in (0, 15):
        raise InitiatorError(f"login to {portal_ip} failed ({result.returncode}): "
                             f"{(result.stderr or result.stdout).strip()}")


def wait_for_devices(target: str, members: list[int], timeout: float = 60.0) -> list[Session]:
    """Poll sysfs until each member in `members` has a session with an sd device."""
    deadline = time.monotonic() + timeout
    while True:
        current = sessions(target)
        ready = {s.member_number for s in current if s.devices}
        if set(members) <= ready:
            return current
        if time.monotonic() >= deadline:
            raise InitiatorError(f"members {sorted(set(members) - ready)} have no sd device "
                                 f"after {timeout} s of login")
        time.sleep(0.2)  # no event to wait on from here; the SCSI scan runs in the kernel


def remove_paths(devices: list[str]) -> None:
    """Take sd devices out of multipathd's maps before their session goes (no queued I/O on them)."""
    for device in devices:
        _run(["multipathd", "del", "path", device], check=False, timeout=30)


def logout(target: str, portal_ip: str) -> None:
    """Log out of one member's portal and forget its node record."""
    node = ["iscsiadm", "-m", "node", "-T", target, "-p", f"{portal_ip}:{PORT}"]
    result = _run(node + ["--logout"], check=False)
    # 21 = ISCSI_ERR_NO_OBJS_FOUND: not logged in.
    if result.returncode not in (0, 21):
        raise InitiatorError(f"logout from {portal_ip} failed ({result.returncode}): "
                             f"{(result.stderr or result.stdout).strip()}")
    _run(node + ["-o", "delete"], check=False)


def flush_map(name: str) -> None:
    """multipath -f: remove the map (fails if something, e.g. a dm-switch, still holds it)."""
    _run(["multipath", "-f", name], timeout=60)


def wait_for_map(wwid: str, timeout: float = 60.0) -> str:
    """Poll until multipathd has built the map for `wwid`; return its name."""
    deadline = time.monotonic() + timeout
    while True:
        name = multipath_map(wwid)
        if name:
            return name
        if time.monotonic() >= deadline:
            raise InitiatorError(f"no multipath map for {wwid} after {timeout} s")
        time.sleep(0.2)
