"""The daemon's session keeping over fakes: the emulated array's LU behind a FakeSystem, whose paths
are the disks of the sessions a FakeIscsiadm logs in (laid out in a fake sysfs tree)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import pytest

from agent.config import Config
from agent.kernel.iscsi import Iscsiadm
from agent.kernel.sysfs import Portal, Sysfs, SysfsMissingError
from agent.orchestrator import DeviceBusyError, Orchestrator
from agent.portals import read_member_portals
from agent.session_keeper import LEDGER_NAME, SessionKeeper, SessionLedger
from tests.unit.fakes_iscsi import FakeIscsiadm, FakeSession, FakeTarget, remove_session_tree, write_session_tree
from tests.unit.fakes_kernel import FakeArrayPath, FakeSystem, _devices_in

TARGET = "iqn.2003-01.org.example:vol0"
CONFIG = Config(max_message_bytes=4096, login_retry_initial_s=15.0, login_retry_max_s=60.0)


def portal_of(number: int) -> Portal:
    return Portal(f"127.0.0.{number + 1}", 3260)


class LinkedIscsiadm(FakeIscsiadm):
    """A FakeIscsiadm whose sessions bring paths to the FakeSystem (one disk of the member per session),
    and that records every logout of a disk a dm device still held."""

    def __init__(self, system: FakeSystem, sysfs_root: Path) -> None:
        super().__init__([FakeTarget(TARGET, {portal_of(m.number): m.tpg_tag for m in system.volume.members})],
                         sysfs_root=sysfs_root)
        self.system = system
        self.disk_number = 100
        self.held_at_logout: list[str] = []
        self.logged_out: list[int] = []

    def add_member_portal(self, number: int) -> None:
        self.targets[TARGET].portals[portal_of(number)] = number + 1

    def _start(self, target: str, portal: Portal, iface: str) -> FakeSession:
        session = super()._start(target, portal, iface)
        assert self.sysfs_root is not None
        remove_session_tree(self.sysfs_root, session)
        self.disk_number += 1
        name = f"sdx{self.disk_number}"
        member = int(portal.address.rsplit(".", 1)[1]) - 1
        self.system.paths[name] = FakeArrayPath(self.system.lu, member, name)
        self.system.devs[name] = f"65:{self.disk_number}"
        session.disks = [name]
        write_session_tree(self.sysfs_root, session)
        return session

    def _end(self, session: FakeSession) -> None:
        for disk in session.disks:
            dev = self.system.devs.pop(disk, None)
            self.system.paths.pop(disk, None)
            held = [d.name for d in self.system.dm.devices.values() if d.live
                    and any(dev in _devices_in(t[2], t[3]) for t in d.live)]
            self.held_at_logout += held
        self.logged_out.append(session.sid)
        super()._end(session)


class Host:
    """The SessionHost over the fake sysfs tree and the FakeSystem's paths."""

    def __init__(self, system: FakeSystem, root: Path) -> None:
        self.system = system
        self.sysfs = Sysfs(root)

    async def iscsi_sessions(self):
        return await self.sysfs.iscsi_sessions()

    async def disk_devnum(self, disk: str) -> str:
        if disk not in self.system.devs:
            raise SysfsMissingError(disk, "gone")
        return self.system.devs[disk]

    async def read_member_portals(self, device: str):
        return await read_member_portals(self.system.open_path(device))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclasses.dataclass
class Rig:
    system: FakeSystem
    iscsi: LinkedIscsiadm
    keeper: SessionKeeper
    orch: Orchestrator
    clock: Clock
    ledger: Path

    def reconcile(self):
        return asyncio.run(self.orch.reconcile(self.system.wwid))

    def keep(self) -> bool:
        return asyncio.run(self.orch.keep_sessions(self.system.wwid))

    def sessions_of(self, number: int) -> list[FakeSession]:
        return [s for s in self.iscsi.sessions.values() if s.portal == portal_of(number)]

    def settle(self, rounds: int = 4) -> None:
        """What the daemon does: keep, and reconcile when keeping says the legs must change."""
        for _ in range(rounds):
            if not self.keep():
                return
            self.reconcile()

    def new_keeper(self, config: Config = CONFIG) -> None:
        self.keeper = SessionKeeper(config, Host(self.system, self.iscsi.sysfs_root), Iscsiadm(self.iscsi),
                                    ledger_path=self.ledger, clock=self.clock)
        self.orch.sessions = self.keeper


def make(tmp_path, *, members: int = 3, config: Config = CONFIG, first_login: bool = True) -> Rig:
    system = FakeSystem(tmp_path=tmp_path / "store", members=members, paths_per_member=0)
    iscsi = LinkedIscsiadm(system, tmp_path / "sys")
    clock = Clock()
    ledger = tmp_path / "run" / LEDGER_NAME
    keeper = SessionKeeper(config, Host(system, tmp_path / "sys"), Iscsiadm(iscsi), ledger_path=ledger, clock=clock)
    orch = Orchestrator(config, system, sessions=keeper)
    rig = Rig(system, iscsi, keeper, orch, clock, ledger)
    if first_login:  # the administrator's one login, to member 0 (not the agent's session)
        iscsi.handle(["iscsiadm", "-m", "node", "-T", TARGET, "-p", str(portal_of(0)), "-o", "new"])
        iscsi.handle(["iscsiadm", "-m", "node", "-T", TARGET, "-p", str(portal_of(0)), "--login"])
    return rig


def test_members_are_logged_in_before_pages_are_routed_to_them(tmp_path):
    rig = make(tmp_path)
    lun = rig.reconcile()
    # The first epoch already routes every page to its owner: members 1 and 2 were logged in first.
    assert lun.state == "routed"
    assert rig.system.misrouted_pages(f"switch-{rig.system.wwid}") == 0
    # Nothing was routed yet: the whole set came in the same pass, before the first epoch.
    assert [len(rig.sessions_of(n)) for n in range(3)] == [2, 2, 2]
    assert rig.orch.luns[rig.system.wwid].epoch == 1
    rig.settle()
    assert [len(rig.sessions_of(n)) for n in range(3)] == [2, 2, 2]
    state = lun.sessions
    assert state is not None and state.managed and state.target == TARGET
    assert [(m.member_id, m.logged_in, m.want, m.not_ours) for m in state.members] == \
        [(1, 2, 2, 1), (2, 2, 2, 0), (3, 2, 2, 0)]
    # Every session's disk is in the legs.
    legs = rig.orch.held_devs()
    assert all(rig.system.devs[s.disks[0]] in legs for s in rig.iscsi.sessions.values())
    # The agent's node records get login timeouts inside iscsiadm's and node.startup manual.
    record = rig.iscsi.records[(TARGET, portal_of(1), "default")]
    assert record["node.conn[0].timeo.login_timeout"] == "15"
    assert record["node.session.initial_login_retry_max"] == "2"
    assert record["node.startup"] == "manual"
    updates = [call for call in rig.iscsi.calls if "update" in call and str(portal_of(1)) in call]
    assert len(updates) == 1, updates  # one iscsiadm call for all the settings


def test_a_leaving_member_is_logged_out_only_after_no_leg_holds_its_paths(tmp_path):
    rig = make(tmp_path)
    rig.reconcile()
    rig.settle()
    leaving = rig.sessions_of(2)
    rig.system.volume.remove_member(2)
    rig.reconcile()  # the new map: member 2's paths leave the legs
    rig.settle()
    assert rig.sessions_of(2) == []
    assert {s.sid for s in leaving} <= set(rig.iscsi.logged_out)
    assert rig.iscsi.held_at_logout == []
    assert rig.system.misrouted_pages(f"switch-{rig.system.wwid}") == 0


def test_fewer_sessions_wanted_releases_them_from_the_legs_first(tmp_path):
    rig = make(tmp_path)
    rig.reconcile()
    rig.settle()
    rig.new_keeper(dataclasses.replace(CONFIG, sessions_per_member=1))
    assert rig.keep()  # sessions to drop are still in the legs: released, a reconcile is asked for
    assert rig.iscsi.logged_out == []
    released = rig.keeper.released_devs(rig.system.wwid)
    assert len(released) == 3  # one of each member's two
    rig.reconcile()
    assert not released & rig.orch.held_devs()
    rig.settle()
    assert [len(rig.sessions_of(n)) for n in range(3)] == [1, 1, 1]
    assert rig.iscsi.held_at_logout == []
    # The administrator's session to member 0 is the one kept: the agent's went.
    assert rig.sessions_of(0)[0].sid == 1


def test_a_failing_login_backs_off_and_shows_in_status(tmp_path):
    rig = make(tmp_path)
    rig.iscsi.unreachable.add(portal_of(2))
    lun = rig.reconcile()
    assert lun.state == "routed"
    member = next(m for m in lun.sessions.members if m.member_id == 3)
    assert member.logged_in == 0 and member.login_failures == 1
    assert "TRANS_TIMEOUT" in (member.last_error or "")
    tries = sum(1 for c in rig.iscsi.calls if str(portal_of(2)) in c and "--login" in c)
    rig.settle()
    rig.keep()
    # Within the backoff nothing is tried again: no tight loop.
    assert sum(1 for c in rig.iscsi.calls if str(portal_of(2)) in c and "--login" in c) == tries
    assert any(w.startswith("backoff") for w in
               next(m for m in lun.sessions.members if m.member_id == 3).waiting)
    rig.iscsi.unreachable.clear()
    rig.clock.now += 16
    rig.settle()
    assert len(rig.sessions_of(2)) == 2
    assert next(m for m in lun.sessions.members if m.member_id == 3).last_error is None


def test_a_killed_session_is_restored(tmp_path):
    rig = make(tmp_path)
    rig.reconcile()
    rig.settle()
    victim = rig.sessions_of(1)[0]
    rig.iscsi.kill_session(victim.sid)
    assert len(rig.sessions_of(1)) == 1
    rig.settle()
    assert len(rig.sessions_of(1)) == 2


def test_the_ledger_survives_a_daemon_restart(tmp_path):
    rig = make(tmp_path)
    rig.reconcile()
    rig.settle()
    ours = {s.sid for s in rig.iscsi.sessions.values()} - {1}
    saved = json.loads(rig.ledger.read_text())
    assert set(saved["targets"][TARGET]["sids"]) == ours
    ledger = SessionLedger(rig.ledger)
    ledger.load()
    assert ledger.targets[TARGET].sids == ours
    # A new daemon (new keeper) knows which are its own: asked for one session per member, it
    # logs out its own and keeps the administrator's.
    rig.new_keeper(dataclasses.replace(CONFIG, sessions_per_member=1))
    rig.settle()
    rig.reconcile()
    rig.settle()
    assert 1 in rig.iscsi.sessions
    assert [len(rig.sessions_of(n)) for n in range(3)] == [1, 1, 1]


def test_a_garbled_ledger_is_started_afresh(tmp_path):
    path = tmp_path / LEDGER_NAME
    path.write_text("{not json")
    ledger = SessionLedger(path)
    ledger.load()
    assert ledger.targets == {}


def test_sessions_the_agent_did_not_make_are_never_logged_out(tmp_path):
    rig = make(tmp_path)
    # The administrator also logged in to member 2 by hand.
    rig.iscsi.handle(["iscsiadm", "-m", "node", "-T", TARGET, "-p", str(portal_of(2)), "-o", "new"])
    rig.iscsi.handle(["iscsiadm", "-m", "node", "-T", TARGET, "-p", str(portal_of(2)), "--login"])
    by_hand = rig.sessions_of(2)[0].sid
    rig.reconcile()
    rig.settle()
    rig.system.volume.remove_member(2)
    rig.reconcile()
    rig.settle()
    assert [s.sid for s in rig.sessions_of(2)] == [by_hand]
    lun = rig.orch.luns[rig.system.wwid]
    member = next(m for m in lun.sessions.members if m.member_id == 3)
    assert member.not_ours == 1 and any(w.startswith("not-ours") for w in member.waiting)
    assert rig.iscsi.held_at_logout == []


def test_an_array_without_member_portals_is_routed_with_unmanaged_sessions(tmp_path):
    rig = make(tmp_path)
    for member in range(1, 3):  # the administrator logged in to every member
        rig.iscsi.handle(["iscsiadm", "-m", "node", "-T", TARGET, "-p", str(portal_of(member)), "-o", "new"])
        rig.iscsi.handle(["iscsiadm", "-m", "node", "-T", TARGET, "-p", str(portal_of(member)), "--login"])
    rig.system.lu.member_portals = False
    calls = len(rig.iscsi.calls)
    lun = rig.reconcile()
    rig.settle()
    assert lun.state == "routed"
    assert rig.system.misrouted_pages(f"switch-{rig.system.wwid}") == 0
    assert lun.sessions is not None and not lun.sessions.managed
    assert "VPD 0xC1" in (lun.sessions.unmanaged_reason or "")
    assert len(rig.iscsi.calls) == calls  # nothing logged in or out


def test_manage_sessions_false_leaves_sessions_alone(tmp_path):
    rig = make(tmp_path, config=dataclasses.replace(CONFIG, manage_sessions=False))
    lun = rig.reconcile()
    rig.settle()
    assert lun.sessions is not None and lun.sessions.unmanaged_reason == "manage_sessions = false"
    assert len(rig.iscsi.sessions) == 1

    def walked() -> set[str]:
        raise AssertionError("every LUN's legs walked for a LUN whose sessions are not managed")

    # Every poll round runs this for every LUN: it must not cost a walk of every leg.
    assert asyncio.run(rig.orch.sessions.keep(lun, walked)) is False


def test_logout_refuses_an_open_device_and_then_removes_routing_sessions_and_records(tmp_path):
    rig = make(tmp_path)
    rig.reconcile()
    rig.settle()
    top = f"switch-{rig.system.wwid}"
    rig.system.dm.opened[top] = 1
    with pytest.raises(DeviceBusyError, match=top):
        asyncio.run(rig.orch.logout(top))
    assert top in rig.system.dm.devices and len(rig.iscsi.sessions) == 6
    rig.system.dm.opened.clear()
    result = asyncio.run(rig.orch.logout(TARGET))
    assert result["routing_removed"] == [f"/dev/mapper/{top}"]
    assert not [d for d in rig.system.dm.devices.values() if d.uuid.startswith("SWAGENT-")]
    assert rig.iscsi.sessions == {}
    # The records the agent made are gone; the administrator's record stays.
    assert list(rig.iscsi.records) == [(TARGET, portal_of(0), "default")]
    assert result["errors"] == []
    # Not routed again until a login.
    with pytest.raises(Exception, match="logged out"):
        rig.reconcile()
    rig.orch.login_seen(TARGET)
    assert rig.orch.withdrawn == set()


# -- what the daemon answers: status, the control messages, the metrics ---------------


def test_status_render_metrics_and_control_messages(tmp_path):
    from agent.cli import render
    from agent.daemon import Daemon
    from agent.metrics import Metrics
    from tests.unit.test_metrics import OFF, samples, value
    from prometheus_client import generate_latest

    rig = make(tmp_path)
    rig.iscsi.unreachable.add(portal_of(2))
    daemon = Daemon(dataclasses.replace(CONFIG, socket_path=tmp_path / "run" / "control.sock"), rig.system,
                    None, sessions=rig.keeper)
    rig.orch = daemon.orchestrator

    async def scenario():
        await daemon.orchestrator.reconcile(rig.system.wwid)
        await daemon.orchestrator.keep_sessions(rig.system.wwid)
        status = await daemon.handle_request({"command": "status"})
        told = await daemon.handle_request({"command": "sessions", "target": TARGET,
                                            "portal": str(portal_of(0)), "iface": "default"})
        with pytest.raises(ValueError):
            await daemon.handle_request({"command": "sessions", "target": "-o delete"})
        await asyncio.gather(*daemon._tasks)
        return status, told

    status, told = asyncio.run(scenario())
    record = status[0]["sessions"]
    assert record["managed"] and record["target"] == TARGET
    by_id = {m["member_id"]: m for m in record["members"]}
    assert (by_id[1]["logged_in"], by_id[1]["want"], by_id[1]["not_ours"]) == (2, 2, 1)
    assert by_id[3]["logged_in"] == 0 and "TRANS_TIMEOUT" in by_id[3]["last_error"]
    assert told == {"target": TARGET, "luns": [rig.system.wwid]}
    text = render("status", status)
    assert "sessions 2/2 (logged in 2, failed 0, not ours 1)" in text
    assert "last login error:" in text and f"sessions managed, target {TARGET}" in text
    found = samples(generate_latest(Metrics(OFF, lambda: daemon.orchestrator.luns.values(),
                                            daemon.orchestrator.clock).registry))
    wwid = rig.system.wwid
    assert value(found, "switch_agent_member_sessions", wwid=wwid, member="m0", state="logged_in") == 2
    assert value(found, "switch_agent_member_sessions", wwid=wwid, member="m2", state="want") == 2
    assert value(found, "switch_agent_member_sessions", wwid=wwid, member="m2", state="logged_in") == 0
    assert value(found, "switch_agent_login_failures_total", wwid=wwid, member="m2") >= 1

    async def logout():
        with pytest.raises(ValueError):
            await daemon.handle_request({"command": "logout"})
        return await daemon.handle_request({"command": "logout", "ref": f"switch-{wwid}"})

    result = asyncio.run(logout())
    assert result["target"] == TARGET and result["luns"] == [wwid]
    assert rig.iscsi.sessions == {}
    assert rig.iscsi.records == {}  # login's record too: the daemon was told it made it


def test_unmanaged_status_says_why(tmp_path):
    from agent.cli import render

    rig = make(tmp_path)
    rig.system.lu.member_portals = False
    lun = rig.reconcile()
    text = render("status", [rig.orch.status(lun).to_json()])
    assert "sessions unmanaged: the array does not offer VPD 0xC1" in text


def test_a_joined_member_whose_paths_do_not_show_is_waited_for_a_bounded_time(tmp_path):
    import time

    rig = make(tmp_path, config=dataclasses.replace(CONFIG, iscsiadm_timeout_s=1.0))
    first = set(rig.system.paths)
    describe = rig.system.describe_path

    async def only_the_first(device, luns=None):  # the new disks never get a wwid (a stuck scan)
        return await describe(device, luns) if device in first else None

    rig.system.describe_path = only_the_first
    class AllBut(set):
        def __contains__(self, name):
            return name not in first

    rig.system.not_in_mpath = AllBut()  # nor does multipathd take them
    started = time.monotonic()
    lun = rig.reconcile()
    assert 1.0 <= time.monotonic() - started < 10
    assert lun.state == "routed"  # routed over the paths there are
    assert len(rig.iscsi.sessions) == 6


def test_a_new_member_is_routed_after_its_first_session_and_a_move_meanwhile_goes_into_that_epoch(tmp_path):
    rig = make(tmp_path, config=dataclasses.replace(CONFIG, max_sessions_per_volume=16))  # 4 members x 2
    rig.reconcile()
    rig.settle()
    volume = rig.system.volume
    new = volume.add_member()
    rig.iscsi.add_member_portal(new.number)
    handle = rig.iscsi.handle

    def move_during_the_login(argv):  # the array moves pages while the agent logs in to the new member
        if "--login" in argv and str(portal_of(new.number)) in argv and not volume.change_times[-1:] == ["moved"]:
            volume.move_pages(0.25)
            volume.change_times.append("moved")  # once
        return handle(argv)

    rig.iscsi.handle = move_during_the_login  # type: ignore[method-assign]
    calls = len(rig.iscsi.calls)
    lun = rig.reconcile()
    # One reconcile: the new member got one session (its second is keep()'s), and the epoch it built
    # routes the move made during the login too -- no page is left to another reconcile.
    assert len(rig.sessions_of(new.number)) == 1
    assert lun.stack is not None and lun.stack.page_map.generation == volume.generation
    assert rig.system.misrouted_pages(f"switch-{rig.system.wwid}") == 0
    # The record: made once, set up in one call, logged in once (no -o new beside it before the
    # routing). Whether prepare() (beside the discovery) or the join made it depends on who ran first.
    made = [next(op for op in ("--login", "new", "update", "show") if op in c)
            for c in rig.iscsi.calls[calls:] if str(portal_of(new.number)) in c]
    assert (made.count("new"), made.count("update"), made[-1]) == (1, 1, "--login"), made
    rig.settle()
    assert len(rig.sessions_of(new.number)) == 2
    assert rig.system.misrouted_pages(f"switch-{rig.system.wwid}") == 0


def test_a_member_joining_empty_gets_a_record_then_on_its_pages_one_login_and_no_new_epoch(tmp_path):
    rig = make(tmp_path, config=dataclasses.replace(CONFIG, max_sessions_per_volume=16))
    rig.reconcile()
    rig.settle()
    volume = rig.system.volume
    new = volume.add_member(take_pages=False)  # joins owning nothing (VPD 0xC1 lists it)
    rig.iscsi.add_member_portal(new.number)
    lun = rig.reconcile()
    rig.settle()
    epoch = lun.epoch
    assert len(lun.stack.plan.legs) == 4 and lun.stack.plan.leg_paths[3][0] == ()
    assert rig.sessions_of(new.number) == []  # an idle member: a record, no session
    assert any(str(portal_of(new.number)) in c and "new" in c for c in rig.iscsi.calls)
    looks = []
    disks_of = rig.keeper.disks_of

    async def counted(sids):
        looks.append(sids)
        return await disks_of(sids)

    rig.keeper.disks_of = counted  # type: ignore[method-assign]
    calls = len(rig.iscsi.calls)
    volume.move_pages(0.25, to=new.number)
    lun = rig.reconcile()
    # Its record was there: the pages waited for one --login; the disk the login's own read saw
    # was its first look (no sysfs read of its own); the legs were reloaded in place.
    assert [c for c in rig.iscsi.calls[calls:] if str(portal_of(new.number)) in c and "--login" not in c] == []
    assert len(rig.sessions_of(new.number)) == 1 and looks == []
    assert lun.epoch == epoch and lun.stack.plan.leg_paths[3][0] != ()
    assert rig.system.misrouted_pages(f"switch-{rig.system.wwid}") == 0


def test_keeping_sessions_logs_in_without_holding_the_lun(tmp_path):
    rig = make(tmp_path)
    rig.reconcile()
    rig.settle()
    rig.iscsi.kill_session(rig.sessions_of(1)[0].sid)  # keep() logs one in again beside the other
    entered, gate = hold_iscsiadm(rig, lambda argv: "-r" in argv and "new" in argv)  # second sessions
    wwid = rig.system.wwid

    async def scenario():
        keeping = asyncio.create_task(rig.orch.keep_sessions(wwid))
        await asyncio.wait_for(entered.wait(), 5)
        # A page move meanwhile: its reconcile does not wait for the logins.
        rig.system.volume.move_pages(0.25)
        lun = await asyncio.wait_for(rig.orch.reconcile(wwid), 5)
        assert rig.system.misrouted_pages(f"switch-{wwid}") == 0 and not keeping.done()
        gate.set()
        assert await asyncio.wait_for(keeping, 5)  # new sessions: the legs must take them
        return lun

    asyncio.run(scenario())
    rig.settle()
    assert [len(rig.sessions_of(n)) for n in range(3)] == [2, 2, 2]


def test_records_for_a_member_with_no_session_are_made_ahead_of_its_join(tmp_path):
    rig = make(tmp_path, config=dataclasses.replace(CONFIG, max_sessions_per_volume=16))
    rig.reconcile()
    rig.settle()
    lun = rig.orch.luns[rig.system.wwid]
    new = rig.system.volume.add_member()
    rig.iscsi.add_member_portal(new.number)
    key = (TARGET, portal_of(new.number), "default")
    calls = len(rig.iscsi.calls)
    asyncio.run(rig.keeper.prepare(lun, lun.topology))
    ops = [next(op for op in ("--login", "new", "update", "show") if op in c) for c in rig.iscsi.calls[calls:]]
    assert ops == ["show", "new", "update"]  # looked, made, set up: never logged in
    assert rig.iscsi.records[key]["node.startup"] == "manual" and rig.sessions_of(new.number) == []
    assert (portal_of(new.number).address, 3260, "default") in ledger_records(rig)
    # Again: nothing (the record is known), and members with sessions get none.
    calls = len(rig.iscsi.calls)
    asyncio.run(rig.keeper.prepare(lun, lun.topology))
    assert rig.iscsi.calls[calls:] == []
    # The join then only logs in.
    rig.reconcile()
    ops = [next(op for op in ("--login", "new", "update", "show") if op in c) for c in rig.iscsi.calls[calls:]
           if str(portal_of(new.number)) in c]
    assert ops == ["--login"] and len(rig.sessions_of(new.number)) == 1
    assert rig.system.misrouted_pages(f"switch-{rig.system.wwid}") == 0


def ledger_records(rig: Rig) -> set[tuple[str, int, str]]:
    ledger = SessionLedger(rig.ledger)
    ledger.load()
    return ledger.of(TARGET).records


def test_where_the_record_directory_tells_a_record_is_missing_no_iscsiadm_call_looks(tmp_path):
    from agent.kernel.iscsi import NodeRecords

    db = tmp_path / "nodes"
    rig = make(tmp_path, config=dataclasses.replace(CONFIG, max_sessions_per_volume=16))
    rig.keeper.node_records = NodeRecords([str(db)])

    def mirror() -> None:  # open-iscsi's record directory, as iscsiadm keeps it
        for target, portal, iface in rig.iscsi.records:
            (db / target / f"{portal.address},{portal.port},-1").mkdir(parents=True, exist_ok=True)
            (db / target / f"{portal.address},{portal.port},-1" / iface).write_text("")

    mirror()
    rig.reconcile()  # members 1 and 2 join: their records are made without a failing login first
    ops = [next(op for op in ("--login", "new", "update", "show") if op in c) for c in rig.iscsi.calls
           if str(portal_of(1)) in c]
    assert ops == ["new", "update", "--login"], ops
    rig.settle()
    mirror()
    lun = rig.orch.luns[rig.system.wwid]
    new = rig.system.volume.add_member()
    rig.iscsi.add_member_portal(new.number)
    calls = len(rig.iscsi.calls)
    asyncio.run(rig.keeper.prepare(lun, lun.topology))
    ops = [next(op for op in ("--login", "new", "update", "show") if op in c) for c in rig.iscsi.calls[calls:]]
    assert ops == ["new", "update"]  # no -o show: the directory said there is none


def test_a_keeping_run_waiting_for_the_lun_does_not_lose_the_session_a_join_made_meanwhile(tmp_path):
    rig = make(tmp_path, config=dataclasses.replace(CONFIG, max_sessions_per_volume=16))
    rig.reconcile()
    rig.settle()
    new = rig.system.volume.add_member()
    rig.iscsi.add_member_portal(new.number)
    entered, gate = hold_iscsiadm(rig, lambda argv: "--login" in argv and str(portal_of(new.number)) in argv)
    wwid = rig.system.wwid

    async def scenario():
        reconciling = asyncio.create_task(rig.orch.reconcile(wwid))
        await asyncio.wait_for(entered.wait(), 5)  # the join holds the LUN, its login under way
        keeping = asyncio.create_task(rig.orch.keep_sessions(wwid))
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.wait_for(reconciling, 5)
        await asyncio.wait_for(keeping, 5)

    asyncio.run(scenario())
    made = {s.sid for s in rig.sessions_of(new.number)}
    assert made and made <= ledger_records_sids(rig)  # the join's session (and keep()'s) still ours
    rig.settle()
    rig.system.volume.remove_member(new.number)
    rig.reconcile()
    rig.settle()
    assert rig.sessions_of(new.number) == []  # ours, so logged out once no leg holds it


def hold_iscsiadm(rig: Rig, when) -> tuple[asyncio.Event, asyncio.Event]:
    """Make the keeper's iscsiadm calls that match `when` wait: (entered, set when one waits; gate, set to let
    it go on)."""
    entered, gate = asyncio.Event(), asyncio.Event()
    real = rig.keeper.iscsiadm.runner

    async def held(argv):
        if when(argv):
            entered.set()
            await gate.wait()
        return await real(argv)

    rig.keeper.iscsiadm.runner = held
    return entered, gate


def ledger_records_sids(rig: Rig) -> set[int]:
    ledger = SessionLedger(rig.ledger)
    ledger.load()
    return ledger.of(TARGET).sids
