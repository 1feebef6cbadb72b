"""Session management in the real kernel (issue #15): one login, and the agent keeps the sessions.

Runs inside the VM rig with the array up and no session at all:

    python -m tests.vm.run --members 3 --no-login -- \\
        python -m pytest -p no:cacheprovider -v -s tests/guest/test_sessions.py

The scenarios run in file order on one array (they share its sessions and
the routed device) and each runs under tests/guest/verified_io.py's writer:
0 I/O errors and 0 verify failures every time. Counted independently of the
agent: sessions from sysfs (/sys/class/iscsi_session, the member is the
portal group tag - 1), the paths a leg holds from its dm-multipath table,
misrouted I/O from the emulator's forwarded counters, login attempts from
LIO's own login statistics in configfs. What each step took is printed and
written to sessions.json in the results; the issue's own bounds (30 s to a
routed, quiet device after the login, 5 s to the last misrouted write, two
poll intervals to restore a session) are asserted.

The CHAP scenario runs last: it brings the array up again with CHAP required.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from agent.kernel.dm import DeviceMapper
from agent.kernel.dm_errors import DmIoctlError
from agent.stack import DeviceKind, OwnedUuid
from protocol.multipath import MultipathParams
from tests.array import initiator
from tests.guest.agentlib import (RESULTS, AgentDaemon, agent_cli, array, array_info, install_udev_rule, our_uuids,
                                  quiesce,
                                  remove_our_devices, skip_unless_emulated_array_rig, status, wait_for)
from tests.guest.verified_io import VerifiedIo

pytestmark = pytest.mark.guest

if os.environ.get("SWITCH_AGENT_ARRAY") not in (None, "up"):
    pytest.skip("needs the rig's --no-login (the array up, no session)", allow_module_level=True)

POLL_INTERVAL_S = 3.0
LOG_LEVEL = "info"
"""Not debug: the keeper's debug log names every sysfs read (15,000 lines in a run), CPU a TCG guest lacks."""
LOGIN_RETRY_INITIAL_S = 5.0
WRITES_PER_S = 100
QUIET_WINDOW_S = 1.0
QUIET_WINDOW_WRITES = 40
"""As tests/guest/test_change.py: 40 random writes all missing a third of the pages is about 1e-7."""
LOGIN_DEADLINE_S = 30.0
"""The issue: routed with every member's sessions, and quiet, within 30 s of the one login."""
LAST_MISROUTED_WRITE_S = 5.0
"""The issue: a member added with no manual login, the last misrouted write <= 5 s after its pages moved."""

SYS = Path("/sys")
MEASURED: dict[str, dict] = {}


def session_config(per_member: int, chap_file: Path | None = None) -> str:
    lines = ["manage_sessions = true", f"sessions_per_member = {per_member}", "max_sessions_per_volume = 16",
             f"login_retry_initial_s = {LOGIN_RETRY_INITIAL_S}", "login_retry_max_s = 20.0"]
    if chap_file:
        lines.append(f'chap_credentials_file = "{chap_file}"')
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def rig():
    skip_unless_emulated_array_rig()
    install_udev_rule()
    state = {"agent": AgentDaemon(poll_interval_s=POLL_INTERVAL_S, log_level=LOG_LEVEL,
                                  extra_config=session_config(2)), "per_member": 2}
    yield state
    (RESULTS / "sessions.json").write_text(json.dumps(MEASURED, indent=2))
    if state["agent"]:
        assert state["agent"].stop() == 0
    remove_our_devices()


def restart_agent(rig: dict, per_member: int, chap_file: Path | None = None, *, routed: bool = True) -> None:
    if rig["agent"]:
        assert rig["agent"].stop() == 0
    rig["agent"] = AgentDaemon(poll_interval_s=POLL_INTERVAL_S, log_level=LOG_LEVEL,
                               extra_config=session_config(per_member, chap_file))
    rig["per_member"] = per_member
    if routed:
        wait_for(lambda: next((s for s in status() if s.get("device")), None), 60, "the new daemon to route the LUN")


def logout(target: str) -> None:
    """`switch-agent logout TARGET`; a udev probe may hold the routed device for a moment (busy: again)."""
    def done() -> bool:
        out = agent_cli("logout", target, check=False)
        print(f"$ switch-agent logout {target}  -> {out.returncode}\n{out.stdout}{out.stderr}", flush=True)
        assert out.returncode == 0 or "busy" in (out.stdout + out.stderr).lower(), out
        return out.returncode == 0
    wait_for(done, 30, "logout")


def record(name: str, **values) -> None:
    MEASURED.setdefault(name, {}).update(values)
    print(f"\n{name}: {MEASURED[name]}", flush=True)


# -- what the kernel and the array say, read independently of the agent -------------------------

def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def logged_in(target: str) -> Counter[int]:
    """Member number -> LOGGED_IN sessions to it (sysfs)."""
    return Counter(s.member_number for s in initiator.sessions(target)
                   if _read(SYS / "class/iscsi_session" / s.sid / "state") == "LOGGED_IN")


def sessions_of(target: str, member: int) -> list[initiator.Session]:
    return [s for s in initiator.sessions(target) if s.member_number == member]


def dev_numbers(devices: list[str]) -> set[str]:
    return {_read(SYS / "block" / d / "dev") for d in devices} - {""}


def page_owners() -> dict[int, int]:
    """Member number -> member id of every member that owns pages."""
    return {m["number"]: m["member_id"] for m in array("info")["members"] if m["pages"]}


def node_records() -> list[str]:
    out = subprocess.run(["iscsiadm", "-m", "node"], capture_output=True, text=True, timeout=60)
    return sorted(out.stdout.splitlines()) if out.returncode == 0 else []


def leg_preferred_paths() -> dict[int, set[str]]:
    """Member id -> the major:minor of the paths its leg tries first (the leg's first priority group)."""
    lun = status()
    if not lun or not lun[0].get("members"):
        return {}
    with DeviceMapper("SWAGENT-") as dm:
        held = {}
        for m in lun[0]["members"]:
            table = dm.table_status(m["leg"], table=True)
            groups = MultipathParams.parse(table[0].line()).groups
            held[m["member_id"]] = {str(p) for p in groups[0].paths} if groups else set()
    return held


def held_by_any_leg(dm: DeviceMapper) -> set[str]:
    """major:minor of every device any leg of ours opens."""
    held = set()
    for entry in dm.list_devices():
        owned = OwnedUuid.parse(entry.uuid or "")
        if owned and owned.kind == DeviceKind.LEG:
            try:
                held |= {f"{major}:{minor}" for major, minor in dm.table_deps(entry.name)}
            except DmIoctlError as exc:
                # Removed since the list (an old epoch's leg): ENXIO. The dm layer raises its typed
                # error, not OSError, so the sampler thread died on this in the run of 19:58.
                if exc.errno not in (errno.ENXIO, errno.ENODEV):
                    raise
    return held


def forwarded(stats: dict) -> tuple[int, int, float]:
    """(commands, writes, time of the last forwarded write) over every member since the counters' reset."""
    members = stats["members"].values()
    return (sum(m["forwarded_cmds"] for m in members), sum(m["forwarded_write_cmds"] for m in members),
            max(m["last_forwarded_write_at"] for m in members))


def sessions_right(target: str, per_member: int) -> bool:
    """Every member that owns pages: exactly `per_member` logged-in sessions, and its leg prefers that many
    paths, each one a disk of those sessions."""
    owners = page_owners()
    have = logged_in(target)
    if any(have[n] != per_member for n in owners):
        return False
    legs = leg_preferred_paths()
    return all(legs.get(member_id) == dev_numbers([d for s in sessions_of(target, n) for d in s.devices])
               for n, member_id in owners.items())


def quiet_window(io: VerifiedIo, deadline: float, what: str) -> None:
    """Wait for >= 1 s and >= 40 writes with nothing forwarded, before `deadline`."""
    while True:
        before, writes, started = forwarded(array("stats"))[0], io.writes, time.monotonic()
        while time.monotonic() - started < QUIET_WINDOW_S or io.writes - writes < QUIET_WINDOW_WRITES:
            io.wait_for_writes(1)
        if forwarded(array("stats"))[0] == before:
            return
        assert time.monotonic() < deadline, f"{what}: I/O still forwarded at the deadline"


def assert_clean(io: VerifiedIo) -> None:
    io.verify_all()
    assert io.io_errors == [] and io.verify_failures == [], (io.io_errors[:5], io.verify_failures[:5])


def sessions_status() -> dict:
    lun = status()
    return (lun[0].get("sessions") or {}) if lun else {}


def assert_status_says(per_member: int) -> None:
    """`status --json`: every page owner's sessions have == want == per_member."""
    shown = {m["member_id"]: m for m in sessions_status().get("members", [])}
    for member_id in page_owners().values():
        assert member_id in shown, sessions_status()
        assert (shown[member_id]["want"], shown[member_id]["logged_in"]) == (per_member, per_member), shown


def writer(rig: dict, seed: int) -> VerifiedIo:
    lun = status()[0]
    return VerifiedIo(lun["device"], rig["size_bytes"], seed=seed, writes_per_s=WRITES_PER_S)


def login(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = agent_cli("login", *args, check=False)
    took = time.monotonic() - started
    print(f"$ switch-agent login {' '.join(args)}  -> {result.returncode} in {took:.1f} s\n"
          f"{result.stdout}{result.stderr}", flush=True)
    return result, took


# -- the scenarios, in an order one array allows ------------------------------------------------

def test_login_refused_changes_nothing(rig):
    """(g) An unreachable portal, an unknown target: exit 1 with the reason, nothing half-made."""
    info = array("info")
    before = (node_records(), initiator.sessions(info["iqn"]), status())
    cases = {"refused portal": ("--portal", "127.0.0.99:3260"),
             "unroutable portal": ("--portal", "192.0.2.1"),
             "unknown target": ("--portal", info["members"][0]["portal"],
                                "--target", "iqn.2003-01.org.example:no-such-target")}
    for name, args in cases.items():
        result, took = login(*args)
        record("(g) login refused", **{f"{name} exit": result.returncode, f"{name} s": round(took, 1)})
        assert result.returncode == 1, result
        said = (result.stderr + result.stdout).lower()
        assert said.strip() and "traceback" not in said, result
        if name == "unknown target":
            assert "no-such-target" in said, said
        assert took < 90, took  # iscsiadm_timeout_s (60 s) plus the CLI's own start
        assert (node_records(), initiator.sessions(info["iqn"]), status()) == before


def test_one_login_and_the_agent_does_the_rest(rig):
    """(a) Daemon running, one `login` to member 0's portal: every page owner gets its sessions, routed, quiet."""
    info = array("info")
    assert initiator.sessions(info["iqn"]) == []
    portal = info["members"][0]["portal"]
    started = time.monotonic()
    result, took = login("--portal", portal)
    assert result.returncode == 0, result
    # Waited for well past the 30 s, so that a slow run still says how slow.
    lun = wait_for(lambda: next((s for s in status() if s.get("device")), None), 120,
                   "the LUN to be routed after the login")
    routed_s = time.monotonic() - started
    rig["size_bytes"] = info["size_bytes"]
    with writer(rig, seed=11) as io:
        io.wait_for_writes(20)
        wait_for(lambda: sessions_right(info["iqn"], 2), 120, "2 sessions to every page owner, in its leg")
        complete_s = time.monotonic() - started
        quiet_window(io, started + 180, "(a)")
        quiet_s = time.monotonic() - started
    assert_clean(io)
    record("(a) one login", login_returned_s=round(took, 1), routed_s=round(routed_s, 1),
           sessions_complete_s=round(complete_s, 1), quiet_window_end_s=round(quiet_s, 1),
           sessions=dict(logged_in(info["iqn"])), writes=io.writes, device=lun["device"])
    assert quiet_s <= LOGIN_DEADLINE_S, quiet_s
    assert dict(logged_in(info["iqn"])) == {n: 2 for n in page_owners()}
    assert_status_says(2)


def test_a_session_logged_out_behind_the_agents_back_is_restored(rig):
    """(d) `iscsiadm -m session -r SID -u` on one of member 1's sessions: back within two poll intervals."""
    target = array("info")["iqn"]
    victim = sessions_of(target, 1)[0]
    quiesce()
    with writer(rig, seed=12) as io:
        io.wait_for_writes(50)
        subprocess.run(["iscsiadm", "-m", "session", "-r", victim.sid.removeprefix("session"), "-u"],
                       check=True, timeout=60, capture_output=True)
        gone_at = time.monotonic()
        assert logged_in(target)[1] == rig["per_member"] - 1
        wait_for(lambda: logged_in(target)[1] == rig["per_member"], 60, "member 1's session to come back")
        restored_s = time.monotonic() - gone_at
        wait_for(lambda: sessions_right(target, rig["per_member"]), 60, "the new session's disk in member 1's leg")
        in_leg_s = time.monotonic() - gone_at
        quiet_window(io, time.monotonic() + 60, "(d)")
        io.wait_for_writes(50)
    assert_clean(io)
    record("(d) session killed", restored_s=round(restored_s, 1), in_leg_s=round(in_leg_s, 1),
           poll_interval_s=POLL_INTERVAL_S, writes=io.writes)
    assert restored_s <= 2 * POLL_INTERVAL_S, restored_s


def test_a_new_member_gets_its_sessions_without_a_login(rig):
    """(b) add-member, then pages moved to it, no manual login: the agent logs in; misrouting ends <= 5 s
    after the pages moved.

    Two steps, as the issue says ("add-member, then pages moved to it") and as an EqualLogic group does
    it: a member joins the group owning nothing (VPD 0xC1 lists it, a new generation), and the pool
    rebalances pages onto it later. The agent may prepare in between (node records, no login: an idle
    member wants no session); the bound is on the pages: from their move to the last write a member
    forwarded. The test waits, with a deadline, until the agent has seen the member (status lists it)
    and made its node record (`iscsiadm -m node` lists its portal), and measures both.
    """
    target = array("info")["iqn"]
    quiesce()
    with writer(rig, seed=13) as io:
        io.wait_for_writes(50)
        add_wall = time.time()
        new = array("add-member", empty=True)
        added_at = array("info")["change_times"][-1]
        member_id, portal = new["member_id"], new["portal"]
        wait_for(lambda: any(m["member_id"] == member_id for m in sessions_status().get("members", [])), 60,
                 "the daemon's status to list the new member")
        seen_s = time.monotonic() - added_at
        wait_for(lambda: any(line.startswith(f"{portal},") for line in node_records()), 60,
                 "a node record for the new member's portal")
        record_s = time.monotonic() - added_at
        # It owns no pages: no session yet (sessions_per_idle_member = 0), so the move below is what
        # the agent must react to -- a login and the routing -- not a member it had already logged in to.
        assert logged_in(target)[new["number"]] == 0, logged_in(target)
        quiesce()
        io.wait_for_writes(50)
        array("stats", reset=True)
        move = array("move", fraction=0.25, to=new["number"])
        moved_at = array("info")["change_times"][-1]
        # Wall-clock times, to find them in the daemon's log (its lines carry the wall clock).
        moved_wall = time.time() - (time.monotonic() - moved_at)
        wait_for(lambda: sessions_right(target, rig["per_member"]) and new["number"] in logged_in(target), 90,
                 "the new member's sessions, in its leg")
        sessions_s = time.monotonic() - moved_at
        quiet_window(io, time.monotonic() + 60, "(b)")
        cmds, writes, last_write_at = forwarded(array("stats"))
        io.wait_for_writes(50)
    assert_clean(io)
    assert move["moved_pages"] > 0 and page_owners().get(new["number"]) == member_id
    last_s = max(last_write_at - moved_at, 0.0) if writes else 0.0
    record("(b) member added, pages moved", member_seen_s=round(seen_s, 1), record_ready_s=round(record_s, 1),
           seen_to_record_s=round(record_s - seen_s, 1), moved_pages=move["moved_pages"],
           sessions_in_legs_s=round(sessions_s, 1), forwarded_cmds=cmds,
           forwarded_writes=writes, last_misrouted_write_s=round(last_s, 1), writes=io.writes,
           add_member_called_at=_wall(add_wall), moved_at=_wall(moved_wall),
           last_misrouted_write_at=_wall(moved_wall + last_s) if writes else None)
    assert logged_in(target)[new["number"]] == rig["per_member"]
    assert last_s <= LAST_MISROUTED_WRITE_S, f"last misrouted write {last_s:.1f} s after the pages moved"


def _wall(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t % 1 * 1000):03d}"


class LegSampler:
    """Samples, every few tens of ms, which devices the legs open and which of a member's sessions live."""

    def __init__(self, target: str, member: int) -> None:
        self.target, self.member = target, member
        self.devs = dev_numbers([d for s in sessions_of(target, member) for d in s.devices])
        self.count = len(sessions_of(target, member))
        self.last_held_at: float | None = None
        self.first_gone_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LegSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        with DeviceMapper("SWAGENT-") as dm:
            while not self._stop.wait(0.02):
                held_at = time.monotonic()
                if held_by_any_leg(dm) & self.devs:
                    self.last_held_at = held_at
                if self.first_gone_at is None and len(sessions_of(self.target, self.member)) < self.count:
                    self.first_gone_at = time.monotonic()


def test_a_removed_members_sessions_end_after_the_legs_let_go(rig):
    """(c) remove-member, the logout left to the agent: its pages leave, the legs drop its paths, then
    its sessions end; nothing forwarded after."""
    info = array("info")
    number = info["members"][-1]["number"]
    quiesce()
    with writer(rig, seed=14) as io, LegSampler(info["iqn"], number) as sampler:
        io.wait_for_writes(50)
        started = time.monotonic()
        cli = subprocess.Popen([sys.executable, "-m", "tests.array", "remove-member", str(number),
                                "--wait-for-logout", "90"], stdout=subprocess.DEVNULL)
        try:
            wait_for(lambda: not sessions_of(info["iqn"], number), 120, "the agent to log out of the member")
            gone_s = time.monotonic() - started
        finally:
            assert cli.wait(timeout=240) == 0
        wait_for(lambda: sessions_right(info["iqn"], rig["per_member"]), 60, "the remaining members' legs")
        quiet_window(io, time.monotonic() + 60, "(c)")
        io.wait_for_writes(50)
    assert_clean(io)
    assert sampler.last_held_at is not None and sampler.first_gone_at is not None, vars(sampler)
    record("(c) member removed", all_sessions_gone_s=round(gone_s, 1),
           legs_let_go_s=round(sampler.last_held_at - started, 2),
           first_session_gone_s=round(sampler.first_gone_at - started, 2), writes=io.writes)
    assert sampler.last_held_at < sampler.first_gone_at, "a session was logged out while a leg held its disk"
    assert len(status()[0]["members"]) == len(array("info")["members"])


@pytest.mark.parametrize("per_member", [3, 1])
def test_sessions_per_member_setting(rig, per_member):
    """(e) sessions_per_member = 3, then 1: that many sessions to each page owner, that many paths in its leg."""
    target = array("info")["iqn"]
    restart_agent(rig, per_member)
    started = time.monotonic()
    with writer(rig, seed=15 + per_member) as io:
        io.wait_for_writes(20)
        wait_for(lambda: sessions_right(target, per_member), 120, f"{per_member} sessions per member, in the legs")
        settled_s = time.monotonic() - started
        quiet_window(io, time.monotonic() + 60, f"(e) {per_member}")
        io.wait_for_writes(50)
    assert_clean(io)
    record(f"(e) sessions_per_member {per_member}", settled_s=round(settled_s, 1),
           sessions=dict(logged_in(target)), writes=io.writes)
    assert dict(logged_in(target)) == {n: per_member for n in page_owners()}
    assert_status_says(per_member)


LOGIN_STATS = ("accepts", "other_fails", "redirects", "authorize_fails", "authenticate_fails", "negotiate_fails")


def login_stats(target: str) -> dict[str, int]:
    """LIO's own count of the logins the target saw (configfs iscsi_login_stats)."""
    stats = Path("/sys/kernel/config/target/iscsi") / target / "fabric_statistics/iscsi_login_stats"
    return {name: int(_read(stats / name) or 0) for name in LOGIN_STATS}


def login_attempts(before: dict[str, int], after: dict[str, int]) -> int:
    """Logins between two readings. A login refused for its CHAP response counts in both
    authenticate_fails and negotiate_fails (seen in the rig: one wrong login, 1 and 1)."""
    d = {name: after[name] - before[name] for name in LOGIN_STATS}
    return (d["accepts"] + d["other_fails"] + d["redirects"] + d["authorize_fails"]
            + max(d["authenticate_fails"], d["negotiate_fails"]))


def test_chap_right_routes_wrong_is_refused_without_a_retry_storm(rig, tmp_path):
    """(f) The array requires CHAP. Wrong credentials: `login` exits 1 with the reason and leaves nothing;
    the daemon's own logins fail into a status entry, with backoff. Right ones: routed."""
    info = array("info")
    # Log out the way an administrator does: routing, sessions, records.
    logout(info["iqn"])
    assert initiator.sessions(info["iqn"]) == [] and node_records() == [] and not our_uuids()
    rig["agent"].stop()
    rig["agent"] = None
    array_argv = [sys.executable, "-m", "tests.array"]
    right = tmp_path / "array-chap"
    right.write_text("swagent-host:chap-secret-0123\n")
    subprocess.run([*array_argv, "down"], check=True, timeout=300)
    subprocess.run([*array_argv, "up", "--members", "2", "--size", str(info["size_bytes"]),
                    "--page-size", str(info["page_size_bytes"]), "--chap-file", str(right)],
                   check=True, timeout=300, stdout=subprocess.DEVNULL)
    info = array("info")
    credentials = tmp_path / "chap.toml"
    credentials.write_text('username = "swagent-host"\npassword = "not-the-secret"\n')
    credentials.chmod(0o600)
    restart_agent(rig, 2, credentials, routed=False)

    result, took = login("--portal", info["members"][0]["portal"])
    assert result.returncode == 1, result
    assert "auth" in (result.stderr + result.stdout).lower(), result
    assert "not-the-secret" not in result.stderr + result.stdout
    assert initiator.sessions(info["iqn"]) == [] and node_records() == []

    # The administrator logs in to member 0 by hand with the right secret; the daemon, holding the
    # wrong one, tries member 1 and must back off.
    subprocess.run([*array_argv, "login", "--member", "0", "--chap-file", str(right)], check=True, timeout=300,
                   stdout=subprocess.DEVNULL)
    window_from, stats_from = time.monotonic(), login_stats(info["iqn"])
    error = wait_for(lambda: next((m.get("last_error") for m in sessions_status().get("members", [])
                                   if m.get("last_error")), None), 60, "a login error in status")
    time.sleep(max(0.0, window_from + 20.0 - time.monotonic()))  # the window over which attempts are counted
    attempts = login_attempts(stats_from, login_stats(info["iqn"]))
    record("(f) CHAP", wrong_login_exit=result.returncode, wrong_login_s=round(took, 1),
           status_error=error, daemon_attempts_in_20s=attempts)
    assert "auth" in error.lower(), error
    assert "not-the-secret" not in json.dumps(status())
    assert 1 <= attempts <= 4, attempts  # backoff 5 s, 10 s, ...: a tight loop makes dozens

    # Right credentials: log out what the administrator made, then one `login`.
    logout(info["iqn"])
    # The administrator's discovery wrote records for every portal; logout deletes only the agent's
    # and login's. Delete the rest as the administrator would: the daemon makes its own again.
    record("(f) CHAP", records_left_by_logout=node_records())
    subprocess.run(["iscsiadm", "-m", "node", "-T", info["iqn"], "-o", "delete"], check=False, timeout=60)
    credentials.write_text('username = "swagent-host"\npassword = "chap-secret-0123"\n')
    restart_agent(rig, 2, credentials, routed=False)
    started = time.monotonic()
    result, took = login("--portal", info["members"][0]["portal"])
    assert result.returncode == 0, result
    wait_for(lambda: next((s for s in status() if s.get("device")), None), 60, "routed with CHAP")
    rig["size_bytes"] = info["size_bytes"]
    with writer(rig, seed=21) as io:
        io.wait_for_writes(20)
        wait_for(lambda: sessions_right(info["iqn"], 2), 60, "2 sessions per member with CHAP")
        quiet_window(io, time.monotonic() + 60, "(f)")
        routed_s = time.monotonic() - started
    assert_clean(io)
    record("(f) CHAP", right_login_s=round(took, 1), right_routed_quiet_s=round(routed_s, 1))
    assert "chap-secret" not in json.dumps(status())
