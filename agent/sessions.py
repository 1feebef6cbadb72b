"""Which iSCSI sessions a volume should have, and the ordered steps to get there: pure, no I/O.

``plan_sessions()`` takes plain data -- the volume's members (their portals, whether
they own pages, whether they are still in the map), the sessions that exist now
(from sysfs, each marked ours or not, and whether a leg still holds its paths),
the configuration, the host's session count, the login failures so far and the
time -- and returns a ``Plan``: logins and logouts to run in order, sessions whose
paths the legs must give up first, what waits and why, and a per-member summary
for ``status``. The orchestrator runs it (agent/kernel/iscsi.py) and enforces
the order; docs/sessions.md states the rules:

- a page-owning member wants ``sessions_per_member`` sessions, a member owning no
  pages ``sessions_per_idle_member``, a member that left the map none;
- ``max_sessions_per_volume`` is shared out one session per member per round,
  page owners first, members already holding that round's session first (no
  churn); ``max_sessions_per_host`` bounds the logins, page owners' first
  sessions first;
- new sessions go where the member has fewest, over ``ifaces`` and its portals
  (round-robin that also counts the sessions already there); include/exclude
  networks filter both portals and ifaces (those with a known address);
- logins come first in the plan; members that own pages and have no logged-in
  session are in ``Plan.join_first``: route pages to them only after their logins;
- a session is logged out only when no leg holds its paths (``held_by_legs``);
  one still held is listed in ``Plan.release`` for the orchestrator to take out
  of the legs first; sessions on excluded portals/ifaces go only once their
  replacements are logged in;
- the agent never logs out a session it did not make, unless
  ``manage_existing_sessions``; others' sessions count as paths all the same;
- a failed login waits ``retry_delay_s()`` (exponential, capped) before the same
  portal and iface are tried again; a FAILED session counts as present (iscsid
  reconnects it), a gone one is simply missing and is logged in again.

The unit is one iSCSI target: an EqualLogic-style array has one target per
volume; where several LUNs share a target (the emulator's ``--luns N``) the
caller merges them (a member owns pages if it owns pages of any of them).
"""

from __future__ import annotations

import enum
import ipaddress
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from agent.config import Config
from agent.kernel.iscsi import DEFAULT_IFACE
from agent.kernel.sysfs import SESSION_LOGGED_IN, IscsiSession, Portal
from protocol.errors import SwitchAgentError


class MemberListError(SwitchAgentError):
    """The member list cannot be planned for: ``member_id`` and what is wrong with it (a member
    listed twice, a portal two members claim). Nothing is logged in or out."""

    def __init__(self, member_id: int, problem: str) -> None:
        self.member_id = member_id
        self.problem = problem
        super().__init__(f"member {member_id}: {problem}")


# -- input -----------------------------------------------------------------------


@dataclass(frozen=True)
class MemberView:
    """One member of the volume as the array describes it."""

    member_id: int
    portals: tuple[Portal, ...]
    """Its iSCSI portals (from the array's portal data), in the array's order."""
    owns_pages: bool
    in_map: bool = True
    """False: an earlier generation listed it and the current one does not -- it left; the caller
    keeps its portals so its sessions can be found and logged out."""


@dataclass(frozen=True)
class SessionView:
    """One existing session to the volume's target (read from sysfs)."""

    sid: int
    portal: Portal | None
    """The connection's persistent portal; None if the session has no connection (being torn down)."""
    iface: str
    state: str
    """sysfs ``state``: LOGGED_IN, FAILED (iscsid reconnecting) or FREE."""
    ours: bool
    """The agent made it (the caller's ledger says so); others' are never logged out unless
    ``manage_existing_sessions``."""
    held_by_legs: bool
    """A leg (live or being built) holds one of its sd disks: it may not be logged out yet."""

    @classmethod
    def from_sysfs(cls, session: IscsiSession, *, ours: bool, held_by_legs: bool) -> SessionView:
        """The view of a session ``Sysfs.iscsi_sessions()`` read (a transport that shows no
        ``ifacename`` used open-iscsi's default iface)."""
        return cls(session.sid, session.portal, session.iface_name or DEFAULT_IFACE, session.state or "",
                   ours, held_by_legs)


class LoginKey(NamedTuple):
    """Where a login goes: failures and backoff are counted per portal and iface."""

    portal: Portal
    iface: str


@dataclass(frozen=True)
class LoginFailure:
    """Consecutive failed logins to one LoginKey; forget it on the first success."""

    failures: int
    last_attempt_s: float
    """Monotonic time of the last failed attempt."""
    error: str
    """The last failure's message (for status)."""

    def after(self, now_s: float, error: str) -> LoginFailure:
        """The record after one more failure at ``now_s``."""
        return LoginFailure(self.failures + 1, now_s, error)

    @classmethod
    def first(cls, now_s: float, error: str) -> LoginFailure:
        """The record of a first failure at ``now_s``."""
        return cls(1, now_s, error)


def retry_delay_s(failures: int, initial_s: float, max_s: float) -> float:
    """How long to wait after ``failures`` consecutive failures: ``initial_s`` doubled per
    further failure, at most ``max_s``; 0 with no failure."""
    if failures <= 0:
        return 0.0
    return min(max_s, initial_s * 2.0 ** min(failures - 1, 60))


def retry_at_s(failure: LoginFailure | None, initial_s: float, max_s: float) -> float:
    """The monotonic time from which a login may be tried again (-inf: at once)."""
    if failure is None:
        return float("-inf")
    return failure.last_attempt_s + retry_delay_s(failure.failures, initial_s, max_s)


# -- output ----------------------------------------------------------------------


class Reason(enum.StrEnum):
    """Why an action is planned, or why something waits."""

    JOIN = "join"
    """The member owns pages and has no logged-in session: log in before routing pages to it."""
    SHORT = "short"
    """The member has fewer sessions than it wants (one gone, settings raised, idle member)."""
    REPLACE = "replace"
    """A session sits on an excluded or unlisted portal or iface: one on an allowed one replaces it."""
    SURPLUS = "surplus"
    """The member has more sessions than it wants (caps, settings lowered, pages left it)."""
    LEFT = "left"
    """The member left the volume, or the array no longer lists the session's portal."""
    BACKOFF = "backoff"
    """Logins there failed recently: the next try waits (``Deferred.retry_at_s``)."""
    HOST_CAP = "host-cap"
    """``max_sessions_per_host`` is reached."""
    VOLUME_CAP = "volume-cap"
    """``max_sessions_per_volume`` left this member fewer sessions than it would want."""
    NO_PORTAL = "no-portal"
    """The member has no portal the include/exclude networks allow."""
    NO_IFACE = "no-iface"
    """No configured iface is allowed by the include/exclude networks."""
    NOT_OURS = "not-ours"
    """Sessions the agent did not make are over what is wanted; kept (manage_existing_sessions off)."""
    WAIT_REPLACEMENT = "wait-replacement"
    """A session to replace stays until its replacement is logged in."""


@dataclass(frozen=True)
class Login:
    """Log in ``count`` sessions to ``member_id`` at ``portal`` over ``iface``.

    ``via_sid`` is a session on the same portal and iface (logged in and ours if there is one):
    ``iscsiadm -m session -r via_sid -o new`` adds one beside it (a node-record login would fail
    with ISCSI_ERR_SESS_EXISTS); without it, the first comes from the node record's login and the
    rest go ``-o new`` beside the session it made. Stop at the first failure of the action and
    record it (LoginFailure).
    """

    member_id: int
    portal: Portal
    iface: str
    count: int
    reason: Reason
    via_sid: int | None = None

    @property
    def key(self) -> LoginKey:
        return LoginKey(self.portal, self.iface)


@dataclass(frozen=True)
class Logout:
    """Log out session ``sid`` (no leg holds its paths)."""

    sid: int
    member_id: int | None
    """None: the session's portal belongs to no member the array lists."""
    reason: Reason


@dataclass(frozen=True)
class Release:
    """Session ``sid`` should go, but a leg still holds its paths: take them out of the legs,
    then the next plan logs it out."""

    sid: int
    member_id: int | None
    reason: Reason


@dataclass(frozen=True)
class Deferred:
    """Something wanted that does not happen now, and why."""

    member_id: int | None
    reason: Reason
    count: int = 0
    """Sessions it concerns."""
    retry_at_s: float | None = None
    """For BACKOFF: the monotonic time of the next try."""
    error: str | None = None
    """For BACKOFF: the last login failure's message."""


@dataclass(frozen=True)
class MemberSessions:
    """One member's sessions, for status: what it has and wants."""

    member_id: int
    want: int
    """After the volume cap."""
    logged_in: int
    """Its sessions in state LOGGED_IN on allowed portals and ifaces."""
    failed: int
    """Its sessions in another state (FAILED: iscsid reconnecting)."""
    not_ours: int
    """Of all its sessions, those the agent did not make."""
    misplaced: int
    """Its sessions on excluded or unlisted portals or ifaces."""
    last_error: str | None = None
    """The most recent login failure to its portals, if any."""


@dataclass(frozen=True)
class Plan:
    """The steps for one volume's target, in the order to run them."""

    actions: tuple[Login | Logout, ...]
    release: tuple[Release, ...]
    deferred: tuple[Deferred, ...]
    join_first: frozenset[int]
    """Members that own pages and have no logged-in session: route pages to them only after a first
    login (the orchestrator waits for its disk before it builds the epoch that routes to them)."""
    members: tuple[MemberSessions, ...]

    @property
    def logins(self) -> tuple[Login, ...]:
        return tuple(a for a in self.actions if isinstance(a, Login))

    @property
    def logouts(self) -> tuple[Logout, ...]:
        return tuple(a for a in self.actions if isinstance(a, Logout))


# -- the policy ------------------------------------------------------------------


@dataclass
class _Member:
    view: MemberView
    portals: list[Portal]
    sessions: list[SessionView] = field(default_factory=list)
    placed: list[SessionView] = field(default_factory=list)
    misplaced: list[SessionView] = field(default_factory=list)
    base_want: int = 0
    want: int = 0

    @property
    def logged_in(self) -> int:
        return sum(1 for s in self.placed if s.state == SESSION_LOGGED_IN)

    @property
    def joining(self) -> bool:
        """It owns pages and no session to it (misplaced ones included) carries I/O."""
        return self.view.in_map and self.view.owns_pages and not any(
            s.state == SESSION_LOGGED_IN for s in self.sessions)


def plan_sessions(
    members: Sequence[MemberView],
    sessions: Sequence[SessionView],
    settings: Config,
    *,
    host_sessions: int,
    failures: Mapping[LoginKey, LoginFailure] | None = None,
    now_s: float = 0.0,
    iface_addresses: Mapping[str, str] | None = None,
) -> Plan:
    """The plan for one target: see the module docstring for the rules.

    ``host_sessions`` counts every iSCSI session on the host (all targets); ``iface_addresses``
    gives the address of ifaces bound to one (for include/exclude); ``failures`` and ``now_s``
    (monotonic seconds) drive the backoff.
    """
    failures = failures or {}
    networks = _Networks(settings.include_networks, settings.exclude_networks)
    addresses = iface_addresses or {}
    ifaces = [i for i in dict.fromkeys(settings.ifaces) if networks.allows(addresses.get(i))]
    state: dict[int, _Member] = {}
    by_portal: dict[tuple[str, int] | None, int] = {}
    for m in members:
        if m.member_id in state:
            raise MemberListError(m.member_id, "the member is listed twice")
        state[m.member_id] = _Member(m, [p for p in m.portals if networks.allows(p.address)])
        for p in m.portals:
            other = by_portal.setdefault(_portal_key(p), m.member_id)
            if other != m.member_id:
                raise MemberListError(m.member_id, f"portal {p} is member {other}'s too")
    strays: list[SessionView] = []
    for s in sorted(sessions, key=lambda s: s.sid):
        if s.portal is None:
            continue  # no connection: being set up or torn down; the next plan sees it settled
        owner = by_portal.get(_portal_key(s.portal))
        if owner is None:
            strays.append(s)
            continue
        member = state[owner]
        member.sessions.append(s)
        allowed = s.iface in ifaces and any(_portal_key(p) == _portal_key(s.portal) for p in member.portals)
        (member.placed if allowed else member.misplaced).append(s)

    deferred: list[Deferred] = []
    for member in state.values():
        v = member.view
        member.base_want = (0 if not v.in_map else settings.sessions_per_member if v.owns_pages
                            else settings.sessions_per_idle_member)
    _share_volume_cap(list(state.values()), settings.max_sessions_per_volume)
    for member in state.values():
        if member.want < member.base_want:
            deferred.append(Deferred(member.view.member_id, Reason.VOLUME_CAP, member.base_want - member.want))

    logins, login_deferred = _plan_logins(list(state.values()), ifaces, settings, host_sessions, failures, now_s)
    deferred += login_deferred

    actions: list[Login | Logout] = list(logins)
    release: list[Release] = []

    def remove(s: SessionView, member_id: int | None, reason: Reason) -> None:
        if s.held_by_legs:
            release.append(Release(s.sid, member_id, reason))
        else:
            actions.append(Logout(s.sid, member_id, reason))

    def removable(s: SessionView) -> bool:
        return s.ours or settings.manage_existing_sessions

    for member in sorted(state.values(), key=lambda m: m.view.member_id):
        mid = member.view.member_id
        if not member.view.in_map:
            for s in member.sessions:
                if removable(s):
                    remove(s, mid, Reason.LEFT)
            kept = sum(1 for s in member.sessions if not removable(s))
            if kept:
                deferred.append(Deferred(mid, Reason.NOT_OURS, kept))
            continue
        # Misplaced sessions go once the allowed ones are logged in (never strand the member).
        replaced = member.logged_in >= member.want
        waiting = 0
        for s in member.misplaced:
            if not removable(s):
                continue
            if replaced:
                remove(s, mid, Reason.REPLACE)
            else:
                waiting += 1
        if waiting:
            deferred.append(Deferred(mid, Reason.WAIT_REPLACEMENT, waiting))
        surplus = len(member.placed) - member.want
        if surplus > 0:
            candidates = [s for s in member.placed if removable(s)]
            chosen = _pick_surplus(candidates, surplus)
            for s in chosen:
                remove(s, mid, Reason.SURPLUS)
            if len(chosen) < surplus:
                deferred.append(Deferred(mid, Reason.NOT_OURS, surplus - len(chosen)))
    for s in strays:
        if removable(s):
            remove(s, None, Reason.LEFT)

    join_first = frozenset(m.view.member_id for m in state.values()
                           if m.joining and any(a.member_id == m.view.member_id for a in logins))
    summary = tuple(
        MemberSessions(
            member_id=m.view.member_id, want=m.want, logged_in=m.logged_in,
            failed=sum(1 for s in m.placed if s.state != SESSION_LOGGED_IN),
            not_ours=sum(1 for s in m.sessions if not s.ours), misplaced=len(m.misplaced),
            last_error=_last_error(m.portals, failures))
        for m in sorted(state.values(), key=lambda m: m.view.member_id))
    return Plan(tuple(actions), tuple(release), tuple(deferred), join_first, summary)


def _share_volume_cap(members: list[_Member], cap: int) -> None:
    """Share ``cap`` sessions out one per member per round: page owners first, and within a
    round members that already have that many sessions first (a cap never moves sessions)."""
    budget = max(cap, 0)
    for member in members:
        member.want = 0
    for tier in (True, False):
        group = [m for m in members if m.view.in_map and m.view.owns_pages == tier]
        for round_no in range(max((m.base_want for m in group), default=0)):
            eligible = [m for m in group if m.base_want > round_no]
            eligible.sort(key=lambda m: (len(m.placed) <= round_no, m.view.member_id))
            for member in eligible:
                if budget == 0:
                    return
                member.want += 1
                budget -= 1


def _plan_logins(members: list[_Member], ifaces: list[str], settings: Config, host_sessions: int,
                 failures: Mapping[LoginKey, LoginFailure], now_s: float) -> tuple[list[Login], list[Deferred]]:
    """Logins for every member short of its want, within the host cap: one per member per
    round (page owners first), each to the member's least used iface and portal not in backoff."""
    deferred: list[Deferred] = []
    budget = max(settings.max_sessions_per_host - host_sessions, 0)
    short: dict[int, int] = {}
    for m in members:
        need = m.want - len(m.placed)
        if need <= 0:
            continue
        if not m.portals:
            deferred.append(Deferred(m.view.member_id, Reason.NO_PORTAL, need))
        elif not ifaces:
            deferred.append(Deferred(m.view.member_id, Reason.NO_IFACE, need))
        else:
            short[m.view.member_id] = need
    order = sorted((m for m in members if m.view.member_id in short),
                   key=lambda m: (not m.view.owns_pages, m.view.member_id))
    picks: dict[int, list[LoginKey]] = {m.view.member_id: [] for m in order}
    blocked: dict[int, LoginKey] = {}
    iface_load = Counter(s.iface for m in members for s in m.placed)
    for round_no in range(max(short.values(), default=0)):
        for m in order:
            mid = m.view.member_id
            if round_no >= short[mid] or mid in blocked:
                continue
            if budget == 0:
                continue
            key, ready = _next_key(m, ifaces, picks[mid], iface_load, failures, now_s, settings)
            if not ready:
                blocked[mid] = key
                continue
            picks[mid].append(key)
            iface_load[key.iface] += 1
            budget -= 1
    logins: list[Login] = []
    for m in order:
        mid = m.view.member_id
        taken = picks[mid]
        if taken:
            reason = Reason.JOIN if m.joining else Reason.REPLACE if m.misplaced else Reason.SHORT
            for key, count in Counter(taken).items():
                there = [s for s in m.sessions if s.iface == key.iface
                         and _portal_key(s.portal) == _portal_key(key.portal)]
                # logged in and ours first; any will do: the node record is shared anyway (its login
                # would fail with SESS_EXISTS), -o new reads target, portal and iface from sysfs even
                # for a FAILED session, and the new sid is the caller's to record as ours
                via = min(there, key=lambda s: (s.state != SESSION_LOGGED_IN, not s.ours, s.sid)).sid \
                    if there else None
                logins.append(Login(mid, key.portal, key.iface, count, reason, via))
        missing = short[mid] - len(taken)
        if missing <= 0:
            continue
        if mid in blocked:
            failure = failures[blocked[mid]]
            deferred.append(Deferred(mid, Reason.BACKOFF, missing,
                                     retry_at_s(failure, settings.login_retry_initial_s, settings.login_retry_max_s),
                                     failure.error))
        else:
            deferred.append(Deferred(mid, Reason.HOST_CAP, missing))
    return logins, deferred


def _next_key(m: _Member, ifaces: list[str], taken: list[LoginKey], iface_load: Counter[str],
              failures: Mapping[LoginKey, LoginFailure], now_s: float,
              settings: Config) -> tuple[LoginKey, bool]:
    """The member's least used (iface, portal) not in backoff, and True; when every one is in
    backoff, the one that frees up first, and False."""
    per_iface = Counter(s.iface for s in m.placed) + Counter(k.iface for k in taken)
    per_portal = Counter(_portal_key(s.portal) for s in m.placed) + Counter(_portal_key(k.portal) for k in taken)
    per_pair = Counter((s.iface, _portal_key(s.portal)) for s in m.placed) \
        + Counter((k.iface, _portal_key(k.portal)) for k in taken)
    ranked = sorted(
        ((per_iface[i], per_portal[_portal_key(p)], per_pair[(i, _portal_key(p))], iface_load[i], ii, pi),
         LoginKey(p, i))
        for ii, i in enumerate(ifaces) for pi, p in enumerate(m.portals))
    initial, cap = settings.login_retry_initial_s, settings.login_retry_max_s
    for _, key in ranked:
        if retry_at_s(failures.get(key), initial, cap) <= now_s:
            return key, True
    return min((key for _, key in ranked), key=lambda k: retry_at_s(failures.get(k), initial, cap)), False


def _pick_surplus(candidates: list[SessionView], count: int) -> list[SessionView]:
    """Which ``count`` of a member's sessions to give up: not logged in first, then from the
    most crowded iface and portal, then the newest."""
    chosen: list[SessionView] = []
    pool = list(candidates)
    while pool and len(chosen) < count:
        load = Counter((s.iface, _portal_key(s.portal)) for s in pool)
        pool.sort(key=lambda s: (s.state == SESSION_LOGGED_IN, -load[(s.iface, _portal_key(s.portal))], -s.sid))
        chosen.append(pool.pop(0))
    return chosen


def _last_error(portals: Iterable[Portal], failures: Mapping[LoginKey, LoginFailure]) -> str | None:
    keys = {_portal_key(p) for p in portals}
    mine = [f for k, f in failures.items() if _portal_key(k.portal) in keys]
    return max(mine, key=lambda f: f.last_attempt_s).error if mine else None


def _portal_key(portal: Portal | None) -> tuple[str, int] | None:
    """A portal as a comparable key: IP addresses in canonical form (``fd00:0::1`` == ``fd00::1``)."""
    if portal is None:
        return None
    try:
        address = str(ipaddress.ip_address(portal.address))
    except ValueError:
        address = portal.address.lower()
    return (address, portal.port)


class _Networks:
    """include/exclude networks: an address is allowed when it is in an include network (or
    there is none) and in no exclude network; an unknown address (None) is allowed."""

    def __init__(self, include: Iterable[str], exclude: Iterable[str]) -> None:
        self.include = [ipaddress.ip_network(n, strict=False) for n in include]
        self.exclude = [ipaddress.ip_network(n, strict=False) for n in exclude]

    def allows(self, address: str | None) -> bool:
        if address is None:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return not self.include  # a host name: only when nothing is required
        if any(ip in n for n in self.exclude):
            return False
        return not self.include or any(ip in n for n in self.include)
