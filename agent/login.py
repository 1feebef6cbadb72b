"""`switch-agent login`: the one login an administrator makes; the daemon makes the rest.

SendTargets discovery at the given (group) portal, the node record of the
target (made with the agent's settings and CHAP if missing), ``node.startup``,
and one session, all with open-iscsi's ``iscsiadm``. A login that fails
deletes the record it made: nothing half-made stays. Telling the daemon is
the CLI's part (agent/cli.py).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from agent.config import Config
from agent.kernel.iscsi import (
    DEFAULT_IFACE,
    STARTUP_MODES,
    Iscsiadm,
    IscsiadmError,
    IscsiNotFoundError,
    IscsiSessionExistsError,
)
from agent.kernel.sysfs import Portal
from agent.session_keeper import configure_record, load_chap
from protocol.errors import SwitchAgentError

ISCSI_PORT = 3260
_HOST = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,252}$")


class LoginUsageError(SwitchAgentError):
    """The command line cannot be carried out as given (bad portal, no or several targets): exit 2."""


class TargetNotOfferedError(SwitchAgentError):
    """The portal does not offer the target asked for (or none at all): ``offered`` lists what it has."""

    def __init__(self, portal: Portal, target: str | None, offered: list[str]) -> None:
        self.portal = portal
        self.target = target
        self.offered = offered
        what = f"target {target}" if target else "any target"
        has = f"it offers: {', '.join(offered)}" if offered else "it offers none"
        super().__init__(f"{portal} does not offer {what}; {has}")


@dataclass(frozen=True)
class LoginResult:
    target: str
    portal: Portal
    record_created: bool
    session_logged_in: bool
    """False: a session to this record was there already (nothing more made)."""
    targets: tuple[str, ...]
    """Every target the portal offered."""


def parse_portal(text: str) -> Portal:
    """``ADDR[:PORT]``: IPv4, ``[IPv6]`` (or a bare IPv6 address), or a host name; port 3260 by default."""
    address, port = text, ISCSI_PORT
    if text.startswith("["):
        address, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise LoginUsageError(f"portal {text!r}: an IPv6 address goes in brackets, e.g. [fd00::1]:3260")
        if rest:
            port = _port(text, rest[1:])
    elif text.count(":") == 1:
        address, port_text = text.split(":")
        port = _port(text, port_text)
    try:
        ipaddress.ip_address(address)
    except ValueError:
        if not _HOST.match(address) or ":" in address:
            raise LoginUsageError(f"portal {text!r} is not ADDR[:PORT] (an IP address or a host name, "
                                  "IPv6 in brackets)") from None
    return Portal(address, port)


def _port(text: str, port: str) -> int:
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise LoginUsageError(f"portal {text!r}: the port must be 1-65535")
    return int(port)


async def login(config: Config, iscsiadm: Iscsiadm, portal: Portal, *, target: str | None = None,
                startup: str = "automatic", iface: str = DEFAULT_IFACE) -> LoginResult:
    """Discovery, node record, one session. Raises typed errors (iscsiadm's, LoginUsageError,
    TargetNotOfferedError, ConfigError for the CHAP file) and leaves no record it made behind."""
    if startup not in STARTUP_MODES:
        raise LoginUsageError(f"--startup must be one of {', '.join(STARTUP_MODES)}")
    load_chap(config)  # a bad credentials file stops here, before anything is made
    offered = sorted({d.target for d in await iscsiadm.discovery_sendtargets(portal, iface=iface)})
    if target is None:
        if len(offered) > 1:
            raise LoginUsageError(f"{portal} offers {len(offered)} targets; pick one with --target: "
                                  + ", ".join(offered))
        if not offered:
            raise TargetNotOfferedError(portal, None, offered)
        target = offered[0]
    elif target not in offered:
        raise TargetNotOfferedError(portal, target, offered)
    created = False
    try:
        await iscsiadm.node_set_startup(target, portal, startup, iface=iface)
    except IscsiNotFoundError:
        await iscsiadm.node_new(target, portal, iface=iface)
        created = True
    try:
        if created:
            await configure_record(iscsiadm, target, portal, iface, config, startup=startup)
        else:
            chap = load_chap(config)
            if chap is not None:
                await iscsiadm.node_set_chap(target, portal, username=chap.username, password=chap.password,
                                             username_in=chap.username_in, password_in=chap.password_in,
                                             iface=iface)
        try:
            await iscsiadm.node_login(target, portal, iface=iface)
            logged_in = True
        except IscsiSessionExistsError:
            logged_in = False
    except (IscsiadmError, SwitchAgentError):
        if created:
            try:
                await iscsiadm.node_delete(target, portal, iface=iface)
            except IscsiadmError:
                pass  # the login's error is the one to show
        raise
    return LoginResult(target, portal, created, logged_in, tuple(offered))
