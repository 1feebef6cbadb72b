"""Keeps each iSCSI target's sessions as ``plan_sessions()`` says, and remembers which ones the agent made.

The orchestrator calls it at two moments of a LUN's life (docs/sessions.md):

- ``join()`` inside a reconcile, after the map is fetched and before the stack is
  planned: members that own pages and have no logged-in session are logged in
  now (``Plan.join_first``), so the epoch about to be built routes their pages
  to their own paths, not through another member;
- ``keep()`` after a reconcile and every poll round: the rest of the plan --
  more sessions where a member has too few, sessions restored after one was
  killed, logouts of sessions no leg holds. A session that should go but whose
  disks a leg still holds is marked released (``released_devs()``): the next
  reconcile builds the legs without it, and the ``keep()`` after it logs it out.

Where members can be reached comes from VPD 0xC1 (``agent.portals``); an array
that does not offer it is "unmanaged" with the reason, and routing goes on over
the sessions the host has. Which sessions are the agent's own is the ledger
(``SessionLedger``), a file under /run: sysfs cannot say who made a session.
Every iscsiadm call has a timeout (``Iscsiadm``) and a failed login waits its
backoff (``LoginFailure``), so nothing here loops tightly.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

from agent.config import ChapCredentials, Config, load_chap_credentials
from agent.kernel.iscsi import (
    DEFAULT_IFACE,
    Arg,
    Iscsiadm,
    IscsiadmError,
    IscsiNotFoundError,
    NodeRecords,
    chap_settings,
    startup_setting,
)
from agent.kernel.sysfs import IscsiSession, Portal
from agent.lun import LunState, MemberSessionsState, SessionsState
from agent.sessions import (
    LoginFailure,
    LoginKey,
    Login,
    Logout,
    MemberListError,
    MemberView,
    Plan,
    SessionView,
    plan_sessions,
)
from agent.topology import Topology
from protocol.errors import SwitchAgentError
from protocol.pagemap import PageMap
from protocol.portals import MemberPortals

LOG = logging.getLogger(__name__)

LEDGER_NAME = "sessions.json"
"""Beside the control socket (/run/switch-agent/): kept across a daemon restart, gone at reboot,
when session ids start over."""
LEDGER_VERSION = 1

RECORD_SETTINGS = (("node.conn[0].timeo.login_timeout", "15"), ("node.session.initial_login_retry_max", "2"))
"""Node records the agent makes give up a login to a dead portal after 15 s x 2, well inside
iscsiadm_timeout_s (Debian's iscsid.conf says 15 s x 8: iscsiadm would be killed first)."""
AGENT_RECORD_STARTUP = "manual"
"""The agent's own records are not logged in by iscsid at boot: the daemon makes the set from the map."""


class SessionHost(Protocol):
    """The kernel and the array as the keeper needs them (agent.system.RealSystem in the daemon)."""

    async def iscsi_sessions(self) -> list[IscsiSession]:
        """Every iSCSI session with its state, iface and disks (sysfs)."""
        ...

    async def disk_devnum(self, disk: str) -> str:
        """``major:minor`` of an sd disk, as the legs' tables name it."""
        ...

    async def read_member_portals(self, device: str) -> tuple[MemberPortals, ...] | None:
        """VPD 0xC1 over a path: every member's portals; None when the array does not offer it."""
        ...


# -- the ledger ------------------------------------------------------------------


class LedgerError(SwitchAgentError):
    """The ledger file is there but unreadable or garbled: it is started afresh (sessions become not ours)."""


@dataclass
class TargetLedger:
    """What the agent made for one target: session ids, and node records (portal, iface)."""

    sids: set[int] = field(default_factory=set)
    records: set[tuple[str, int, str]] = field(default_factory=set)
    """(address, port, iface) of node records the agent created (deleted again by `logout`)."""


class SessionLedger:
    """The sessions and node records the agent made, per target, in a JSON file written atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.targets: dict[str, TargetLedger] = {}

    def load(self) -> None:
        """Read the file (none: nothing made yet). A garbled file is logged and started afresh."""
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or data.get("version") != LEDGER_VERSION:
                raise ValueError("not a version-1 ledger")
            targets = {}
            for name, entry in data["targets"].items():
                sids = {int(s) for s in entry["sids"]}
                records = {(str(a), int(p), str(i)) for a, p, i in entry["records"]}
                targets[str(name)] = TargetLedger(sids, records)
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            LOG.error("%s: %s; starting a new ledger (sessions made before count as not ours)", self.path, exc)
            return
        self.targets = targets

    def save(self) -> None:
        """Write the whole ledger: a temporary file beside it, renamed over it (root only)."""
        data = {"version": LEDGER_VERSION,
                "targets": {name: {"sids": sorted(t.sids), "records": sorted(t.records)}
                            for name, t in sorted(self.targets.items()) if t.sids or t.records}}
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def of(self, target: str) -> TargetLedger:
        return self.targets.setdefault(target, TargetLedger())


# -- per target state ------------------------------------------------------------


@dataclass
class _Target:
    name: str
    views: dict[str, tuple[MemberView, ...]] = field(default_factory=dict)
    """wwid -> that LUN's members (a target may carry several LUNs: merged when planning)."""
    known: dict[int, tuple[Portal, ...]] = field(default_factory=dict)
    """Every member's portals ever seen: a member that left is found (and logged out) by them."""
    failures: dict[LoginKey, LoginFailure] = field(default_factory=dict)
    release: set[int] = field(default_factory=set)
    """Sessions to take out of the legs before their logout."""
    released_devs: frozenset[str] = frozenset()
    plan: Plan | None = None
    login_failures: Counter[int] = field(default_factory=Counter)
    ready: set[tuple[str, int, str]] = field(default_factory=set)
    """(address, port, iface) of node records known to be there (made by ``prepare()``, or found)."""
    session_records: tuple[tuple[Portal, str], ...] = ()
    """(portal, iface) of the target's sessions at the last plan: their node records exist."""
    seen_sids: frozenset[int] = frozenset()
    """Every session id (of any target) the last plan's sysfs read showed."""
    login_runs: int = 0
    """keep()'s login phases so far: a join planned before one ran plans again."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Held while logins to the target run: ``join()`` (under the LUN's lock) and ``keep()`` (not
    under it, so that a page move's reconcile need not wait for a second session) never log in to
    the same member side by side."""


@dataclass(frozen=True)
class Joined:
    """What ``join()`` logged in: the members and the new session ids (their disks are the new paths)."""

    members: frozenset[int] = frozenset()
    sids: tuple[int, ...] = ()
    disks: tuple[str, ...] = ()
    """Their disks as the logins' own sysfs reads saw them (none yet where the kernel's scan was not
    done): the first look for their paths needs no read of its own."""


class SessionKeeper:
    """Plans and runs each target's logins and logouts; keeps the ledger and the status."""

    def __init__(self, config: Config, host: SessionHost, iscsiadm: Iscsiadm, *, ledger_path: Path,
                 clock: Callable[[], float], node_records: NodeRecords | None = None) -> None:
        self.config = config
        self.host = host
        self.iscsiadm = iscsiadm
        self.node_records = node_records
        """Where a record's absence is seen without an iscsiadm call (None: always ask iscsiadm)."""
        self.clock = clock
        self.ledger = SessionLedger(ledger_path)
        self.ledger.load()
        self._targets: dict[str, _Target] = {}
        self._target_of: dict[str, str] = {}
        """wwid -> target name."""
        self._forgotten: set[str] = set()
        """Targets `logout` took away: left alone until the next `login` asks again."""
        self._devnums: dict[str, str] = {}
        """sd disk name -> major:minor (fixed for a name: sd.c derives both from one index)."""

    # -- what the orchestrator asks -------------------------------------------------

    def target_of(self, wwid: str) -> str | None:
        return self._target_of.get(wwid)

    def wwids_of(self, target: str) -> list[str]:
        return sorted(w for w, t in self._target_of.items() if t == target)

    def released_devs(self, wwid: str) -> frozenset[str]:
        """Disks (major:minor) the legs must give up: their sessions are to be logged out."""
        target = self._targets.get(self._target_of.get(wwid, ""))
        return target.released_devs if target else frozenset()

    def remember(self, target: str, record: tuple[Portal, str] | None = None) -> None:
        """`login` asked for this target again: manage it (after a `logout` forgot it); ``record``:
        the node record (portal, iface) `login` made, for `logout` to delete."""
        self._forgotten.discard(target)
        if record is not None:
            portal, iface = record
            self.ledger.of(target).records.add((portal.address, portal.port, iface))
            self.ledger.save()

    async def prepare(self, lun: LunState, topology: Topology) -> None:
        """Make the node records a join would log in with, for every member VPD 0xC1 lists that has
        no session, ahead of the join: the orchestrator runs this beside a routed LUN's discovery
        and map fetch, so that a joining member's pages wait for its ``--login`` only, not for three
        iscsiadm calls more (a look, ``-o new``, ``-o update``). Never logs in; errors are left to
        the join, which makes a missing record itself."""
        name = self._target_of.get(lun.wwid)
        target = self._targets.get(name or "")
        if (target is None or name in self._forgotten or not self.config.manage_sessions
                or topology.map_source != "page-map" or lun.stack is None):
            return
        try:
            portals, sessions = await asyncio.gather(self._member_portals(topology), self.host.iscsi_sessions())
        except SwitchAgentError as exc:
            LOG.debug("%s: no records prepared: %s", target.name, exc)
            return
        if portals is None:
            return
        # Where the policy would log in a member with no session, as if it owned pages now.
        views = [SessionView.from_sysfs(s, ours=False, held_by_legs=False) for s in sessions
                 if s.target_name == target.name]
        target.session_records = tuple((v.portal, v.iface) for v in views if v.portal is not None)
        reached = {v.portal for v in views}
        members = [dataclasses.replace(m, owns_pages=m.owns_pages or not set(m.portals) & reached)
                   for m in self._views(target, lun.stack.page_map, portals) if m.in_map]
        try:
            plan = plan_sessions(members, views, self.config, host_sessions=len(sessions),
                                 failures=target.failures, now_s=self.clock())
        except MemberListError:
            return
        entry = self.ledger.of(target.name)
        wanted = [(login.portal, login.iface) for login in plan.logins if login.via_sid is None
                  and not set(next(m.portals for m in members if m.member_id == login.member_id)) & reached]
        wanted = [(p, i) for p, i in wanted
                  if (p.address, p.port, i) not in target.ready and (p.address, p.port, i) not in entry.records]
        if not wanted:
            return
        async with target.lock:
            for portal, iface in wanted:
                started = self.clock()
                try:
                    if await self._record_absent(target, portal, iface):
                        await self._new_record(target.name, portal, iface)
                        await configure_record(self.iscsiadm, target.name, portal, iface, self.config,
                                               startup=AGENT_RECORD_STARTUP)
                        LOG.info("%s: node record for %s over %s made ahead of its login in %.2f s", target.name,
                                 portal, iface, self.clock() - started)
                except (IscsiadmError, SwitchAgentError) as exc:
                    LOG.info("%s: node record for %s over %s not made ahead (the login makes it): %s",
                             target.name, portal, iface, exc)
                    continue
                target.ready.add((portal.address, portal.port, iface))

    async def join(self, lun: LunState, topology: Topology, page_map: PageMap, held_devs: set[str]) -> Joined:
        """Log in one session to each member that owns pages and has no logged-in session, before it
        is routed to; nothing when no member joins. Its other sessions, and the other members'
        missing ones, are ``keep()``'s: the pages wait for one login per member, not for the set."""
        if not _may_join(topology, page_map):
            return Joined()  # every page owner has a path: nothing to plan for here (keep() does the rest)
        started = self.clock()
        known = self._targets.get(self._target_of.get(lun.wwid, ""))
        runs = known.login_runs if known else -1
        plan = await self._plan(lun, topology, page_map, held_devs)
        if plan is None or not plan.join_first:
            return Joined()
        target = self._targets[self._target_of[lun.wwid]]
        LOG.info("%s: member(s) %s join; planned in %.2f s", target.name, ",".join(map(str, sorted(plan.join_first))),
                 self.clock() - started)
        async with target.lock:
            if target.login_runs != runs:
                # keep() logged in meanwhile: plan again over what sysfs shows now.
                plan = await self._replan(lun, target, held_devs)
                if plan is None or not plan.join_first:
                    return Joined()
            by_member: dict[int, list[Login]] = {}
            for login in plan.logins:
                if lun.stack is None:
                    # Nothing routed yet: the whole set before the first epoch (its disks, and udev's
                    # reads of them, are done with before the routed device carries I/O).
                    by_member.setdefault(login.member_id, []).append(login)
                elif login.member_id in plan.join_first and login.member_id not in by_member:
                    # Routed: a joining member's pages wait for its first session only.
                    by_member[login.member_id] = [dataclasses.replace(login, count=1)]
            # Members side by side (each login is a second or more of iscsiadm and iscsid): the
            # pages wait for the slowest, not for the sum. No other login of ours runs meanwhile
            # (the lock), so the sessions the plan saw are the "before" of each member's first.
            seen: list[str] = []
            results = await asyncio.gather(*(self._logins(target, logins, before=target.seen_sids, disks=seen)
                                             for logins in by_member.values()))
        sids: list[int] = []
        members: set[int] = set()
        for member_id, made in zip(by_member, results):
            sids += made
            members |= {member_id} if made and member_id in plan.join_first else set()
        if sids:
            self.ledger.save()
        if members != set(plan.join_first):
            await self._replan(lun, target, held_devs)  # the status shows the failure now
        # (else the keep() after the reconcile publishes it: the pages need not wait for a sysfs read)
        return Joined(frozenset(members), tuple(sids), tuple(seen))

    async def keep(self, lun: LunState, held_devs: Callable[[], set[str]],
                   lun_lock: asyncio.Lock | None = None) -> bool:
        """The rest of the plan for the LUN's target; True when the legs must change (a reconcile):
        sessions to release, or new sessions whose disks the legs should take.

        Planning, logouts and releases run under ``lun_lock`` (the legs hold still while it is
        decided what no leg holds); the logins do not: a second session takes a second or more,
        and a page move's reconcile must not wait behind it. ``held_devs``: the legs' paths now."""
        if not self.config.manage_sessions:
            # Before held_devs(), which walks every LUN's legs: this runs for every LUN every poll
            # round (128 LUNs: a fifth of the idle daemon's samples, py-spy, run of 21:54).
            self._unmanaged(lun, None, "manage_sessions = false")
            return False
        async with lun_lock or contextlib.nullcontext():
            if lun.topology is None or lun.stack is None:
                return False
            plan = await self._plan(lun, lun.topology, lun.stack.page_map, held_devs())
            if plan is None:
                return False
            target = self._targets[self._target_of[lun.wwid]]
            for action in plan.actions:
                if isinstance(action, Logout):
                    await self._logout(target, action)
            before = target.released_devs
            target.release = {r.sid for r in plan.release}
            target.released_devs = frozenset(await self._devs_of(target.name, target.release))
        made: list[int] = []
        if any(isinstance(action, Login) for action in plan.actions):
            async with target.lock:
                try:
                    # A join may have run meanwhile: log in what is missing now.
                    fresh = await self._replan(lun, target, held_devs())
                    by_member: dict[int, list[Login]] = {}
                    for login in fresh.logins if fresh else ():
                        by_member.setdefault(login.member_id, []).append(login)
                    for logins in await asyncio.gather(*(self._logins(target, logins)
                                                         for logins in by_member.values())):
                        made += logins
                finally:
                    target.login_runs += 1
        if plan.actions:
            self.ledger.save()
            await self._replan(lun, target, held_devs())
        return bool(made) or target.released_devs != before

    async def disks_of(self, sids: Iterable[int]) -> list[str]:
        """The sd disks of these sessions now (a login's SCSI scan adds them over a moment)."""
        wanted = set(sids)
        return [d for s in await self.host.iscsi_sessions() if s.sid in wanted for d in s.disks]

    async def logout_target(self, target: str) -> dict[str, Any]:
        """Log out every session to ``target`` and delete the agent's node records of it (`logout`).

        The caller has removed the routing first. The target is forgotten until the next `login`.
        """
        self._forgotten.add(target)
        entry = self.ledger.of(target)
        sessions = [s for s in await self.host.iscsi_sessions() if s.target_name == target]
        errors: list[str] = []
        logged_out = []
        for s in sessions:
            try:
                await self.iscsiadm.session_logout(s.sid)
                logged_out.append(s.sid)
            except IscsiNotFoundError:
                logged_out.append(s.sid)  # gone meanwhile
            except IscsiadmError as exc:
                errors.append(str(exc))
        deleted = []
        for address, port, iface in sorted(entry.records):
            try:
                await self.iscsiadm.node_delete(target, Portal(address, port), iface=iface)
                deleted.append(f"{Portal(address, port)} {iface}")
            except IscsiNotFoundError:
                pass
            except IscsiadmError as exc:
                errors.append(str(exc))
        self.ledger.targets.pop(target, None)
        self.ledger.save()
        self._targets.pop(target, None)
        for wwid in self.wwids_of(target):
            self._target_of.pop(wwid, None)
        return {"target": target, "sessions_logged_out": logged_out, "records_deleted": deleted, "errors": errors}

    def forget_lun(self, wwid: str) -> None:
        target = self._target_of.pop(wwid, None)
        if target and target in self._targets:
            self._targets[target].views.pop(wwid, None)

    # -- planning ---------------------------------------------------------------

    async def _plan(self, lun: LunState, topology: Topology, page_map: PageMap, held_devs: set[str]) -> Plan | None:
        """Find the LUN's target and members, and plan; None (with lun.sessions saying why) when unmanaged."""
        if not self.config.manage_sessions:
            self._unmanaged(lun, None, "manage_sessions = false")
            return None
        # VPD 0xC1 asked beside the sysfs read (a joining member's first login waits for both).
        asked = asyncio.ensure_future(self._member_portals(topology)) if topology.map_source == "page-map" else None
        try:
            sessions = await self.host.iscsi_sessions()
            return await self._plan_with(lun, topology, page_map, held_devs, sessions, asked)
        finally:
            _drop(asked)

    async def _plan_with(self, lun: LunState, topology: Topology, page_map: PageMap, held_devs: set[str],
                         sessions: list[IscsiSession], asked: asyncio.Future[tuple[MemberPortals, ...] | None] | None,
                         ) -> Plan | None:
        devices = {p.device for p in topology.paths}
        targets = sorted({s.target_name for s in sessions if devices & set(s.disks)})
        if not targets:
            self._unmanaged(lun, None, "no iSCSI session carries its paths")
            return None
        if len(targets) > 1:
            self._unmanaged(lun, None, f"its paths come from several targets: {', '.join(targets)}")
            return None
        name = targets[0]
        if name in self._forgotten:
            self._unmanaged(lun, name, "logged out with `switch-agent logout`; `switch-agent login` again")
            return None
        if topology.map_source != "page-map":
            # Its portals would come from SendTargets discovery (agent.portals.match_sendtargets),
            # which iscsiadm runs over TCP itself: the sandboxed daemon has no IP (RestrictAddressFamilies).
            self._unmanaged(lun, name, f"map source {topology.map_source}: the array does not list its "
                                       "members' portals (SendTargets matching is not run by the daemon); "
                                       "log in to every member's portal")
            return None
        try:
            portals = await asked if asked is not None else await self._member_portals(topology)
        except SwitchAgentError as exc:
            self._unmanaged(lun, name, f"cannot read VPD 0xC1 (member portals): {exc}")
            return None
        if portals is None:
            self._unmanaged(lun, name, "the array does not offer VPD 0xC1 (member portals)")
            return None
        target = self._targets.setdefault(name, _Target(name))
        self._target_of[lun.wwid] = name
        target.views[lun.wwid] = self._views(target, page_map, portals)
        return await self._replan(lun, target, held_devs, sessions)

    async def _replan(self, lun: LunState, target: _Target, held_devs: set[str],
                      sessions: list[IscsiSession] | None = None) -> Plan | None:
        """Plan over what sysfs shows now, and publish the per-member status on every LUN of the target."""
        if sessions is None:
            sessions = await self.host.iscsi_sessions()
        target.seen_sids = frozenset(s.sid for s in sessions)
        entry = self.ledger.of(target.name)
        mine = [s for s in sessions if s.target_name == target.name]
        target.session_records = tuple((s.portal, s.iface_name or DEFAULT_IFACE) for s in mine if s.portal)
        live = {s.sid for s in mine}
        if entry.sids - live:  # ended behind our back (or by us): not ours to track any more
            entry.sids &= live
            self.ledger.save()
        # Side by side: a plan stands in the way of a joining member's first login.
        devs_of = await asyncio.gather(*(self._devs_of_session(s) for s in mine))
        views = [SessionView.from_sysfs(s, ours=s.sid in entry.sids, held_by_legs=bool(devs & held_devs))
                 for s, devs in zip(mine, devs_of)]
        members = _merge(target.views.values())
        # A member that left and has no session any more is forgotten.
        gone = {m.member_id for m in members if not m.in_map
                and not any(v.portal in m.portals for v in views if v.portal is not None)}
        for member_id in gone:
            target.known.pop(member_id, None)
        members = [m for m in members if m.member_id not in gone]
        try:
            plan = plan_sessions(members, views, self.config, host_sessions=len(sessions),
                                 failures=target.failures, now_s=self.clock())
        except MemberListError as exc:
            self._unmanaged(lun, target.name, f"the array's member list cannot be planned for: {exc}")
            return None
        target.plan = plan
        lun.sessions = _state(target, plan)
        return plan

    def state_of(self, wwid: str) -> SessionsState | None:
        """The target's latest status (for LUNs sharing the target, after another LUN's run)."""
        target = self._targets.get(self._target_of.get(wwid, ""))
        return _state(target, target.plan) if target and target.plan else None

    def _unmanaged(self, lun: LunState, target: str | None, reason: str) -> None:
        if lun.sessions is None or lun.sessions.unmanaged_reason != reason:
            LOG.info("%s: sessions unmanaged: %s", lun.wwid, reason)
        lun.sessions = SessionsState(target, False, reason)

    async def _member_portals(self, topology: Topology) -> tuple[MemberPortals, ...] | None:
        last: SwitchAgentError | None = None
        for path in topology.paths:
            if not path.usable:
                continue
            try:
                return await self.host.read_member_portals(path.device)
            except SwitchAgentError as exc:
                last = exc
        raise last or SwitchAgentError("no usable path to ask")

    def _views(self, target: _Target, page_map: PageMap, portals: tuple[MemberPortals, ...]) -> tuple[MemberView, ...]:
        """The LUN's members: the map's (page owners or not), VPD 0xC1's, and those that left."""
        pages = page_map.pages_per_member()
        listed = {m.member_id: tuple(Portal(str(p.address), p.port) for p in m.portals) for m in portals}
        target.known.update(listed)
        views = []
        for member_id in sorted(set(pages) | set(listed)):
            views.append(MemberView(member_id, listed.get(member_id, target.known.get(member_id, ())),
                                    owns_pages=pages.get(member_id, 0) > 0))
        for member_id in sorted(set(target.known) - set(pages) - set(listed)):
            views.append(MemberView(member_id, target.known[member_id], owns_pages=False, in_map=False))
        return tuple(views)

    # -- running it ---------------------------------------------------------------

    async def _logins(self, target: _Target, logins: list[Login], before: frozenset[int] | None = None,
                      disks: list[str] | None = None) -> list[int]:
        """One member's logins, one after another (its second session goes beside its first);
        ``before``: the session ids there are now, for the first (see ``_login``); ``disks``: see there."""
        made: list[int] = []
        for i, login in enumerate(logins):
            made += await self._login(target, login, before=before if i == 0 else None, disks=disks)
        return made

    async def _login(self, target: _Target, login: Login, before: frozenset[int] | None = None,
                     disks: list[str] | None = None) -> list[int]:
        """Run one Login action; the new session ids (recorded as ours). Stops at the first failure.
        ``before``: the session ids there are now, when the caller knows (else sysfs is read);
        ``disks``: the new sessions' disks that read saw are added to it."""
        entry = self.ledger.of(target.name)
        made: list[int] = []
        via = login.via_sid
        for i in range(login.count):
            started = self.clock()
            steps = ""
            if before is None or i > 0:
                before = frozenset(s.sid for s in await self.host.iscsi_sessions())
            try:
                if via is not None:
                    await self.iscsiadm.session_new(via)
                else:
                    steps = await self._record_login(target.name, login.portal, login.iface)
            except (IscsiadmError, SwitchAgentError) as exc:
                key = login.key
                old = target.failures.get(key)
                target.failures[key] = old.after(self.clock(), str(exc)) if old else \
                    LoginFailure.first(self.clock(), str(exc))
                target.login_failures[login.member_id] += 1
                LOG.warning("%s: login to member %d at %s over %s failed: %s", target.name, login.member_id,
                            login.portal, login.iface, exc)
                break
            target.failures.pop(login.key, None)
            # This login's: logins to other members may run beside it (join() runs them side by side).
            found = [s for s in await self.host.iscsi_sessions()
                     if s.sid not in before and s.target_name == target.name
                     and s.portal is not None and s.portal.same_as(login.portal)
                     and (s.iface_name or DEFAULT_IFACE) == login.iface]
            new = sorted(s.sid for s in found)
            if disks is not None:
                disks += [d for s in found for d in s.disks]
            entry.sids.update(new)
            made += new
            if via is None and new:
                via = new[0]
            # With what it took: a joining member's pages wait for its first login.
            LOG.info("%s: logged in to member %d at %s over %s (%s): session %s in %.2f s%s", target.name,
                     login.member_id, login.portal, login.iface, login.reason, ",".join(map(str, new)) or "?",
                     self.clock() - started, steps)
        return made

    async def _record_login(self, target: str, portal: Portal, iface: str) -> str:
        """Log in the node record (target, portal, iface); made first, with our settings, if missing.
        Returns what it took when the record was made (for the log), else ""."""
        started = self.clock()
        known = self._targets.get(target)
        try:
            # Straight to making it where the record directory says there is none (a login
            # that fails is an iscsiadm call, most of a second in a TCG guest).
            if known is None or not await self._record_absent(known, portal, iface, ask=False):
                await self.iscsiadm.node_login(target, portal, iface=iface)
                return ""
        except IscsiNotFoundError:
            pass  # no such record: make it
        looked = self.clock()
        await self._new_record(target, portal, iface)
        made = self.clock()
        await configure_record(self.iscsiadm, target, portal, iface, self.config, startup=AGENT_RECORD_STARTUP)
        configured = self.clock()
        await self.iscsiadm.node_login(target, portal, iface=iface)
        return (f" (no record: looked {looked - started:.2f} s, made {made - looked:.2f} s, set up "
                f"{configured - made:.2f} s, logged in {self.clock() - configured:.2f} s)")

    async def _new_record(self, target: str, portal: Portal, iface: str) -> None:
        """``-o new`` of a node record, remembered in the ledger as the agent's (``logout`` deletes it)."""
        await self.iscsiadm.node_new(target, portal, iface=iface)
        self.ledger.of(target).records.add((portal.address, portal.port, iface))
        self.ledger.save()

    async def _record_absent(self, target: _Target, portal: Portal, iface: str, *, ask: bool = True) -> bool:
        """Whether the node record (portal, iface) of the target is missing: from the record directory
        where that can tell (NodeRecords), else from iscsiadm (``ask``), else False (assume there)."""
        if self.node_records is not None:
            absent = await asyncio.to_thread(self.node_records.absent, target.name, portal, iface,
                                             known=target.session_records)
            if absent is not None:
                return absent
        return not await self.iscsiadm.node_exists(target.name, portal, iface=iface) if ask else False

    async def _logout(self, target: _Target, logout: Logout) -> None:
        try:
            await self.iscsiadm.session_logout(logout.sid)
        except IscsiNotFoundError:
            pass  # gone already
        except IscsiadmError as exc:
            LOG.warning("%s: logout of session %d failed: %s", target.name, logout.sid, exc)
            return
        self.ledger.of(target.name).sids.discard(logout.sid)
        LOG.info("%s: logged out session %d of member %s (%s)", target.name, logout.sid,
                 logout.member_id if logout.member_id is not None else "-", logout.reason)

    async def _devs_of(self, target: str, sids: set[int]) -> set[str]:
        devs: set[str] = set()
        for s in await self.host.iscsi_sessions():
            if s.sid in sids and s.target_name == target:
                devs |= await self._devs_of_session(s)
        return devs

    async def _devs_of_session(self, session: IscsiSession) -> set[str]:
        async def devnum(disk: str) -> str | None:
            # An sd disk's name and number come from the same index (sd.c): one read per name.
            if disk in self._devnums:
                return self._devnums[disk]
            try:
                found = self._devnums[disk] = await self.host.disk_devnum(disk)
                return found
            except SwitchAgentError:
                return None  # going away
        return {d for d in await asyncio.gather(*(devnum(disk) for disk in session.disks)) if d is not None}


async def configure_record(iscsiadm: Iscsiadm, target: str, portal: Portal, iface: str, config: Config, *,
                           startup: str) -> None:
    """A node record as the agent makes them: login timeouts inside iscsiadm_timeout_s, CHAP from
    chap_credentials_file (when set), node.startup -- in one iscsiadm call (a joining member's
    first login waits for it)."""
    settings: list[tuple[str, Arg]] = [*RECORD_SETTINGS]
    chap = load_chap(config)
    if chap is not None:
        settings += chap_settings(chap.username, chap.password, chap.username_in, chap.password_in)
    settings.append(startup_setting(startup))
    await iscsiadm.node_update_many(target, portal, settings, iface=iface)


def load_chap(config: Config) -> ChapCredentials | None:
    """The CHAP credentials of chap_credentials_file, read now (the file may have changed); None: no CHAP."""
    if config.chap_credentials_file is None:
        return None
    return load_chap_credentials(config.chap_credentials_file)


def _drop(task: asyncio.Future[Any] | None) -> None:
    """A VPD 0xC1 read the plan did not need after all: cancelled, and its error (if any) taken."""
    if task is None:
        return
    if not task.done():
        task.cancel()
    elif not task.cancelled():
        task.exception()


def _may_join(topology: Topology, page_map: PageMap) -> bool:
    """A member owns pages and no usable path lands on it: a join to plan for (else none can be:
    a member with a logged-in session has a path in the map, or soon will as ``keep()`` adds it)."""
    reached = {p.member_id for p in topology.paths if p.usable}
    return any(count and member_id not in reached for member_id, count in page_map.pages_per_member().items())


def _merge(groups: Iterable[tuple[MemberView, ...]]) -> list[MemberView]:
    """One view per member over the target's LUNs: owns pages / in the map if it does for any LUN."""
    merged: dict[int, MemberView] = {}
    for views in groups:
        for v in views:
            old = merged.get(v.member_id)
            merged[v.member_id] = v if old is None else MemberView(
                v.member_id, old.portals or v.portals, old.owns_pages or v.owns_pages, old.in_map or v.in_map)
    return [merged[k] for k in sorted(merged)]


def _state(target: _Target, plan: Plan) -> SessionsState:
    deferred: dict[int | None, list[str]] = {}
    for d in plan.deferred:
        text = str(d.reason) + (f" x{d.count}" if d.count else "") + (f": {d.error}" if d.error else "")
        deferred.setdefault(d.member_id, []).append(text)
    released = {r.member_id for r in plan.release}
    members = tuple(MemberSessionsState(
        m.member_id, m.want, m.logged_in, m.failed, m.not_ours, m.misplaced, m.last_error,
        target.login_failures.get(m.member_id, 0),
        tuple(deferred.get(m.member_id, ())) + (("release",) if m.member_id in released else ()))
        for m in plan.members)
    return SessionsState(target.name, True, None, members)

