"""agent.sessions: who gets how many sessions, caps, ifaces, networks, order against legs, backoff."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from agent.config import Config
from agent.kernel.sysfs import Portal
from agent.sessions import (
    Deferred,
    Login,
    LoginFailure,
    LoginKey,
    Logout,
    MemberListError,
    MemberView,
    Reason,
    Release,
    SessionView,
    plan_sessions,
    retry_at_s,
    retry_delay_s,
)

CONFIG = Config()


def portal(member: int, k: int = 0) -> Portal:
    """Member m's k-th portal: 10.0.k.(m+1):3260."""
    return Portal(f"10.0.{k}.{member + 1}", 3260)


def member(mid: int, owns: bool = True, *, portals: int = 1, in_map: bool = True) -> MemberView:
    return MemberView(mid, tuple(portal(mid, k) for k in range(portals)), owns, in_map)


class Sessions:
    """Builds SessionViews with increasing sids."""

    def __init__(self) -> None:
        self.next_sid = 1
        self.all: list[SessionView] = []

    def add(self, mid: int, *, k: int = 0, iface: str = "default", state: str = "LOGGED_IN",
            ours: bool = True, held: bool = True, at: Portal | None = None) -> SessionView:
        s = SessionView(self.next_sid, at or portal(mid, k), iface, state, ours, held)
        self.next_sid += 1
        self.all.append(s)
        return s


def wanted(plan, mid: int) -> int:
    return next(m.want for m in plan.members if m.member_id == mid)


def logins_to(plan, mid: int) -> int:
    return sum(a.count for a in plan.logins if a.member_id == mid)


def test_group_login_shape_every_page_owner_gets_two() -> None:
    s = Sessions()
    s.add(0, ours=False)  # the administrator's one login, to member 0
    plan = plan_sessions([member(0), member(1), member(2)], s.all, CONFIG, host_sessions=1)
    assert [wanted(plan, m) for m in (0, 1, 2)] == [2, 2, 2]
    assert [logins_to(plan, m) for m in (0, 1, 2)] == [1, 2, 2]
    assert plan.logouts == () and plan.release == () and plan.deferred == ()
    # members 1 and 2 have no path: their logins first, and no pages routed to them before
    assert plan.join_first == {1, 2}
    assert [a.reason for a in plan.logins] == [Reason.SHORT, Reason.JOIN, Reason.JOIN]


@pytest.mark.parametrize("per_member", [1, 3])
def test_sessions_per_member_setting(per_member: int) -> None:
    config = replace(CONFIG, sessions_per_member=per_member, max_sessions_per_volume=12)
    plan = plan_sessions([member(0), member(1)], [], config, host_sessions=0)
    assert [logins_to(plan, m) for m in (0, 1)] == [per_member, per_member]


def test_volume_cap_is_shared_page_owners_first() -> None:
    # 4 page owners x 2 = 8 > 6: every owner gets one, then two of them a second; idle members none
    config = replace(CONFIG, sessions_per_idle_member=1)
    members = [member(0), member(1), member(2), member(3), member(4, owns=False)]
    plan = plan_sessions(members, [], config, host_sessions=0)
    assert [wanted(plan, m) for m in range(5)] == [2, 2, 1, 1, 0]
    assert sum(a.count for a in plan.logins) == 6
    assert Deferred(2, Reason.VOLUME_CAP, 1) in plan.deferred
    assert Deferred(4, Reason.VOLUME_CAP, 1) in plan.deferred


def test_volume_cap_keeps_existing_sessions_where_they_are() -> None:
    # members 2 and 3 already have two each: under the cap they keep them, 0 and 1 get one
    s = Sessions()
    for mid in (2, 3):
        s.add(mid)
        s.add(mid)
    plan = plan_sessions([member(m) for m in range(4)], s.all, CONFIG, host_sessions=4)
    assert [wanted(plan, m) for m in range(4)] == [1, 1, 2, 2]
    assert plan.logouts == () and plan.release == ()


def test_idle_members_get_sessions_per_idle_member() -> None:
    config = replace(CONFIG, sessions_per_idle_member=1)
    plan = plan_sessions([member(0), member(1, owns=False)], [], config, host_sessions=0)
    assert [logins_to(plan, m) for m in (0, 1)] == [2, 1]
    assert plan.join_first == {0}  # an idle member routes nothing: nothing waits for it
    plan = plan_sessions([member(0), member(1, owns=False)], [], CONFIG, host_sessions=0)
    assert logins_to(plan, 1) == 0


def test_host_cap_bounds_logins_first_sessions_first() -> None:
    config = replace(CONFIG, max_sessions_per_host=10)
    plan = plan_sessions([member(0), member(1), member(2)], [], config, host_sessions=7)
    assert [logins_to(plan, m) for m in (0, 1, 2)] == [1, 1, 1]
    assert {d.member_id: (d.reason, d.count) for d in plan.deferred} == {
        0: (Reason.HOST_CAP, 1), 1: (Reason.HOST_CAP, 1), 2: (Reason.HOST_CAP, 1)}
    full = plan_sessions([member(0)], [], config, host_sessions=10)
    assert full.logins == () and full.deferred == (Deferred(0, Reason.HOST_CAP, 2),)


def test_spread_over_ifaces_and_portals() -> None:
    config = replace(CONFIG, ifaces=("eth1", "eth2"), sessions_per_member=4, max_sessions_per_volume=12)
    plan = plan_sessions([member(0, portals=2)], [], config, host_sessions=0)
    pairs = sorted((a.iface, a.portal.address, a.count) for a in plan.logins)
    # two ifaces x two portals, four sessions: one on each pair
    assert pairs == [("eth1", "10.0.0.1", 1), ("eth1", "10.0.1.1", 1),
                     ("eth2", "10.0.0.1", 1), ("eth2", "10.0.1.1", 1)]


def test_spread_counts_sessions_already_there() -> None:
    config = replace(CONFIG, ifaces=("eth1", "eth2"))
    s = Sessions()
    s.add(0, iface="eth1", ours=False)
    plan = plan_sessions([member(0)], s.all, config, host_sessions=1)
    assert [(a.iface, a.count) for a in plan.logins] == [("eth2", 1)]
    # ifaces also alternate between members
    plan = plan_sessions([member(0), member(1)], [], replace(config, sessions_per_member=1), host_sessions=0)
    assert [a.iface for a in plan.logins] == ["eth1", "eth2"]


def test_second_session_over_a_pair_goes_via_an_existing_one() -> None:
    s = Sessions()
    theirs = s.add(0, ours=False)
    plan = plan_sessions([member(0)], s.all, replace(CONFIG, sessions_per_member=3), host_sessions=1)
    # the node record is logged in already: only -o new beside an existing session adds one
    assert plan.logins == (Login(0, portal(0), "default", 2, Reason.SHORT, via_sid=theirs.sid),)
    mine = s.add(0)
    (login,) = plan_sessions([member(0)], s.all, replace(CONFIG, sessions_per_member=3), host_sessions=2).logins
    assert login.via_sid == mine.sid  # ours preferred
    failed = Sessions()
    down = failed.add(0, state="FAILED")
    (login,) = plan_sessions([member(0)], failed.all, CONFIG, host_sessions=1).logins
    assert login.via_sid == down.sid  # the record is still "logged in": only -o new adds one
    (login,) = plan_sessions([member(1)], [], CONFIG, host_sessions=0).logins
    assert login.via_sid is None  # nothing there: the node record's own login


def test_include_and_exclude_networks() -> None:
    two = MemberView(0, (Portal("192.168.1.10", 3260), Portal("10.5.0.10", 3260)), True)
    plan = plan_sessions([two], [], replace(CONFIG, exclude_networks=("192.168.1.0/24",)), host_sessions=0)
    assert {a.portal.address for a in plan.logins} == {"10.5.0.10"}
    plan = plan_sessions([two], [], replace(CONFIG, include_networks=("192.168.0.0/16",)), host_sessions=0)
    assert {a.portal.address for a in plan.logins} == {"192.168.1.10"}
    plan = plan_sessions([two], [], replace(CONFIG, include_networks=("172.16.0.0/12",)), host_sessions=0)
    assert plan.logins == () and plan.deferred == (Deferred(0, Reason.NO_PORTAL, 2),)
    # iface addresses are filtered too
    config = replace(CONFIG, ifaces=("mgmt", "san"), exclude_networks=("192.168.1.0/24",))
    plan = plan_sessions([member(0)], [], config, host_sessions=0,
                         iface_addresses={"mgmt": "192.168.1.5", "san": "10.0.0.100"})
    assert {a.iface for a in plan.logins} == {"san"}
    plan = plan_sessions([member(0)], [], replace(config, ifaces=("mgmt",)), host_sessions=0,
                         iface_addresses={"mgmt": "192.168.1.5"})
    assert plan.deferred == (Deferred(0, Reason.NO_IFACE, 2),)


def test_ipv6_portals_compare_canonically() -> None:
    m = MemberView(0, (Portal("fd00:0:0::1", 3260),), True)
    s = Sessions()
    s.add(0, at=Portal("fd00::1", 3260))
    s.add(0, at=Portal("FD00::0001", 3260))
    plan = plan_sessions([m], s.all, CONFIG, host_sessions=2)
    assert plan.logins == () and plan.logouts == () and plan.members[0].logged_in == 2


def test_member_leaving_is_released_from_legs_before_logout() -> None:
    s = Sessions()
    s.add(0)
    s.add(0)
    gone_a = s.add(1, held=True)
    gone_b = s.add(1, held=True)
    members = [member(0), member(1, in_map=False)]
    plan = plan_sessions(members, s.all, CONFIG, host_sessions=4)
    # a leg still holds its paths: no logout yet, only the request to take the paths out
    assert plan.logouts == ()
    assert plan.release == (Release(gone_a.sid, 1, Reason.LEFT), Release(gone_b.sid, 1, Reason.LEFT))
    # once the legs hold none of its paths, it is logged out
    s.all = [replace(x, held_by_legs=False) if x.sid in (gone_a.sid, gone_b.sid) else x for x in s.all]
    plan = plan_sessions(members, s.all, CONFIG, host_sessions=4)
    assert plan.logouts == (Logout(gone_a.sid, 1, Reason.LEFT), Logout(gone_b.sid, 1, Reason.LEFT))
    assert plan.release == () and plan.logins == ()


def test_logins_come_before_logouts() -> None:
    s = Sessions()
    old = s.add(1, held=False)
    plan = plan_sessions([member(0), member(1, in_map=False)], s.all, CONFIG, host_sessions=1)
    kinds = [type(a) for a in plan.actions]
    assert kinds == [Login, Logout] and plan.actions[1].sid == old.sid


def test_never_log_out_what_we_did_not_make() -> None:
    s = Sessions()
    for _ in range(3):
        s.add(0, ours=False, held=False)
    s.add(1, ours=False, held=False)
    members = [member(0), member(1, in_map=False)]
    plan = plan_sessions(members, s.all, CONFIG, host_sessions=4)
    assert plan.logouts == () and plan.release == ()
    assert Deferred(0, Reason.NOT_OURS, 1) in plan.deferred and Deferred(1, Reason.NOT_OURS, 1) in plan.deferred
    managed = plan_sessions(members, s.all, replace(CONFIG, manage_existing_sessions=True), host_sessions=4)
    assert sorted(x.sid for x in managed.logouts) == [3, 4]  # the newest surplus of member 0, member 1's


def test_surplus_drops_ours_failed_first_then_crowded_then_newest() -> None:
    config = replace(CONFIG, ifaces=("eth1", "eth2"), sessions_per_member=1)
    s = Sessions()
    s.add(0, iface="eth1", held=False)
    failed = s.add(0, iface="eth2", state="FAILED", held=False)
    s.add(0, iface="eth1", ours=False, held=False)
    plan = plan_sessions([member(0)], s.all, config, host_sessions=3)
    assert plan.logouts[0] == Logout(failed.sid, 0, Reason.SURPLUS)
    assert [x.sid for x in plan.logouts] == [failed.sid, 1]  # two ours go; the foreign one stays


def test_stray_session_of_ours_to_an_unlisted_portal_goes() -> None:
    s = Sessions()
    s.add(0)
    s.add(0)
    stray = s.add(0, at=Portal("10.9.9.9", 3260), held=False)
    foreign = s.add(0, at=Portal("10.9.9.8", 3260), ours=False, held=False)
    plan = plan_sessions([member(0)], s.all, CONFIG, host_sessions=4)
    assert plan.logouts == (Logout(stray.sid, None, Reason.LEFT),)
    assert foreign.sid not in [x.sid for x in plan.logouts]


def test_misplaced_sessions_wait_for_their_replacement() -> None:
    config = replace(CONFIG, ifaces=("eth2",))  # eth1 was removed from the config
    s = Sessions()
    s.add(0, iface="eth1", held=True)
    s.add(0, iface="eth1", held=True)
    plan = plan_sessions([member(0)], s.all, config, host_sessions=2)
    assert [(a.iface, a.count, a.reason) for a in plan.logins] == [("eth2", 2, Reason.REPLACE)]
    assert plan.release == () and plan.logouts == ()
    assert Deferred(0, Reason.WAIT_REPLACEMENT, 2) in plan.deferred
    assert plan.join_first == frozenset()  # it still has working paths
    s.add(0, iface="eth2")
    s.add(0, iface="eth2")
    plan = plan_sessions([member(0)], s.all, config, host_sessions=4)
    assert [r.sid for r in plan.release] == [1, 2] and plan.logins == ()


def test_failed_session_counts_gone_session_is_restored() -> None:
    s = Sessions()
    s.add(0)
    s.add(0, state="FAILED")  # iscsid is reconnecting it: no second login beside it
    plan = plan_sessions([member(0)], s.all, CONFIG, host_sessions=2)
    assert plan.logins == () and plan.members[0].failed == 1 and plan.members[0].logged_in == 1
    s.all.pop()  # the session is gone (killed by hand, or iscsid gave up)
    plan = plan_sessions([member(0)], s.all, CONFIG, host_sessions=1)
    assert [(a.member_id, a.count) for a in plan.logins] == [(0, 1)]


def test_backoff_after_failed_logins() -> None:
    key = LoginKey(portal(1), "default")
    failure = LoginFailure.first(100.0, "iscsiadm: exit 24 LOGIN_AUTH_FAILED")
    members = [member(0), member(1)]
    plan = plan_sessions(members, [], CONFIG, host_sessions=0, failures={key: failure}, now_s=105.0)
    assert logins_to(plan, 0) == 2 and logins_to(plan, 1) == 0
    (d,) = [d for d in plan.deferred if d.member_id == 1]
    assert (d.reason, d.count, d.retry_at_s) == (Reason.BACKOFF, 2, 115.0)
    assert d.error == failure.error and plan.members[1].last_error == failure.error
    plan = plan_sessions(members, [], CONFIG, host_sessions=0, failures={key: failure}, now_s=115.0)
    assert logins_to(plan, 1) == 2
    # another portal or iface of the member is tried while one backs off
    config = replace(CONFIG, ifaces=("eth1", "eth2"))
    failures = {LoginKey(portal(1), "eth1"): failure}
    plan = plan_sessions(members, [], config, host_sessions=0, failures=failures, now_s=101.0)
    assert {(a.iface, a.count) for a in plan.logins if a.member_id == 1} == {("eth2", 2)}


def test_retry_delay_is_exponential_and_capped() -> None:
    delays = [retry_delay_s(n, 15.0, 300.0) for n in range(0, 8)]
    assert delays == [0.0, 15.0, 30.0, 60.0, 120.0, 240.0, 300.0, 300.0]
    assert retry_delay_s(10_000, 15.0, 300.0) == 300.0  # no overflow
    f = LoginFailure.first(50.0, "x").after(60.0, "y")
    assert (f.failures, f.last_attempt_s, f.error) == (2, 60.0, "y")
    assert retry_at_s(f, 15.0, 300.0) == 90.0 and retry_at_s(None, 15.0, 300.0) == float("-inf")


def test_bad_member_lists_are_refused_typed() -> None:
    with pytest.raises(MemberListError, match="listed twice") as err:
        plan_sessions([member(0), member(0)], [], CONFIG, host_sessions=0)
    assert err.value.member_id == 0
    shared = MemberView(1, (Portal("10.0.0.1", 3260),), True)  # member 0's portal
    with pytest.raises(MemberListError, match="member 0's too") as err:
        plan_sessions([member(0), shared], [], CONFIG, host_sessions=0)
    assert err.value.member_id == 1


def test_config_session_keys_and_defaults() -> None:
    from agent.config import ConfigError, config_from_mapping
    c = Config()
    assert (c.sessions_per_member, c.max_sessions_per_volume, c.max_sessions_per_host,
            c.sessions_per_idle_member, c.ifaces, c.manage_existing_sessions) == (2, 6, 1024, 0, ("default",), False)
    c = config_from_mapping({"sessions_per_member": 3, "ifaces": ["eth1", "eth2"],
                             "include_networks": ["10.0.0.0/8", "fd00::/64"], "exclude_networks": ["10.9.0.0/16"],
                             "chap_credentials_file": "/etc/switch-agent/chap.toml"})
    assert c.ifaces == ("eth1", "eth2") and c.include_networks == ("10.0.0.0/8", "fd00::/64")
    assert c.chap_credentials_file == Path("/etc/switch-agent/chap.toml")
    assert config_from_mapping({"chap_credentials_file": ""}).chap_credentials_file is None
    bad = [
        ({"sessions_per_member": 0}, "sessions_per_member"),
        ({"sessions_per_idle_member": 3}, "sessions_per_idle_member"),
        ({"max_sessions_per_volume": 0}, "max_sessions_per_volume"),
        ({"max_sessions_per_host": -1}, "max_sessions_per_host"),
        ({"ifaces": []}, "ifaces"),
        ({"ifaces": "default"}, "ifaces"),
        ({"ifaces": ["eth1", "eth1"]}, "ifaces"),
        ({"ifaces": ["-I"]}, "ifaces"),
        ({"include_networks": ["10.0.0.0/33"]}, "include_networks"),
        ({"exclude_networks": ["lan"]}, "exclude_networks"),
        ({"login_retry_initial_s": float("nan")}, "login_retry_initial_s"),
        ({"login_retry_max_s": float("inf")}, "login_retry_max_s"),
        ({"chap_credentials_file": 7}, "chap_credentials_file"),
        ({"login_retry_initial_s": 30.0, "login_retry_max_s": 10.0}, "login_retry_max_s"),
        ({"iscsiadm_timeout_s": 0}, "iscsiadm_timeout_s"),
        ({"chap_credentials_file": "chap.toml"}, "chap_credentials_file"),
        ({"manage_existing_sessions": "yes"}, "manage_existing_sessions"),
    ]
    for data, key in bad:
        with pytest.raises(ConfigError) as err:
            config_from_mapping(data)
        assert err.value.key == key, data


def test_plans_run_by_iscsiadm_converge_and_stay(tmp_path) -> None:
    """The pieces together: sysfs -> plan -> iscsiadm (the fake) -> sysfs, round after round."""
    import asyncio

    from agent.kernel.iscsi import Iscsiadm
    from agent.kernel.sysfs import Sysfs
    from tests.unit.fakes_iscsi import FakeIscsiadm, FakeTarget

    target = "iqn.2026-11.org.example:vol0"
    members = [member(0), member(1), member(2, owns=False)]
    fake = FakeIscsiadm([FakeTarget(target, {m.portals[0]: m.member_id + 1 for m in members})],
                        sysfs_root=tmp_path / "sys")
    adm, sysfs = Iscsiadm(fake), Sysfs(tmp_path / "sys")
    ours: set[int] = set()

    async def one_round():
        found = [x for x in await sysfs.iscsi_sessions() if x.target_name == target]
        views = [SessionView.from_sysfs(x, ours=x.sid in ours, held_by_legs=False) for x in found]
        plan = plan_sessions(members, views, CONFIG, host_sessions=len(found))
        for action in plan.actions:
            if isinstance(action, Logout):
                await adm.session_logout(action.sid)
                continue
            via = action.via_sid
            for _ in range(action.count):
                before = {x.sid for x in await sysfs.iscsi_sessions()}
                if via is None:
                    await adm.node_new(target, action.portal, iface=action.iface)
                    await adm.node_login(target, action.portal, iface=action.iface)
                else:
                    await adm.session_new(via)
                (made,) = {x.sid for x in await sysfs.iscsi_sessions()} - before
                ours.add(made)
                via = made if via is None else via
        return plan

    async def scenario():
        await adm.node_new(target, portal(0))
        await adm.node_login(target, portal(0))  # the administrator's one login
        first = await one_round()
        assert first.join_first == {1}
        second = await one_round()
        assert second.actions == () and second.deferred == ()
        per_member = sorted((m.member_id, m.logged_in) for m in second.members)
        assert per_member == [(0, 2), (1, 2), (2, 0)]
        fake.kill_session(max(ours))  # killed by hand: the next round restores it
        assert [a.count for a in (await one_round()).logins] == [1]
        assert (await one_round()).actions == ()

    asyncio.run(scenario())
    assert 1 not in ours and len(ours) == 4  # the administrator's session is not ours
