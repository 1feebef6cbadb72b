"""The `switch-agent` command: the daemon, and the questions an administrator asks it."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import control
from agent.config import DEFAULT_CONFIG_PATH, Config, ConfigError, check_config, load_config
from agent.sizes import size_argument
from protocol.errors import SwitchAgentError

if TYPE_CHECKING:  # the records pull numpy in: the CLI imports them only when it renders
    from agent.lun import MemberSessionsState
    from agent.reporting import LunStatus

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NO_DAEMON = 0, 1, 2, 3

TRIGGER_TIMEOUT_S = 2.0
"""Longest `trigger` waits for the daemon's answer: udev holds the device's event until RUN programs end."""

DESCRIPTION = """\
switch-agent routes each page of a scale-out iSCSI volume straight to the
array member that owns it. For every multipath LUN of a configured array it
reads the array's page map (a vendor SCSI command, docs/protocol.md) and
builds, beside multipathd's own map:

  /dev/mapper/switch-<wwid>         the routed device: use this one
    -> <name>-sw<N>                 dm-switch, one region per array page
      -> <name>-leg<k>-<N>          dm-multipath per member: its own paths
                                    first, the others' paths as fallback

and keeps it right as the array moves pages. Devices it creates carry the
dm uuid prefix SWAGENT- and it touches no others.

Log in once: `switch-agent login --portal GROUP_IP` makes the first iSCSI
session; from the volume's map the daemon learns every member and its
portals and keeps sessions_per_member sessions to each member that owns
pages, as members join and leave (docs/sessions.md).
"""

EPILOG = """\
examples:
  switch-agent login --portal 10.0.0.10    log in once; the daemon does the rest
  switch-agent daemon                      run the agent (systemd does this)
  switch-agent status                      every LUN, its members and paths
  switch-agent status --json               the same for scripts
  switch-agent refresh 36001405abcdef...   re-read one LUN's map now
  switch-agent locate switch-3600... 10G   which member serves byte 10 GiB
  switch-agent show switch-3600... --map   a picture of where the volume's pages live
  switch-agent logout switch-3600...       unroute the volume, end its sessions

files:
  /etc/switch-agent/switch-agent.toml      configuration (all keys optional)
  /run/switch-agent/control.sock           control socket (root only)
  switch-agent.service                     the daemon's systemd unit
  switch-agent.socket                      its socket unit: a request starts the daemon

exit status: 0 success, 1 the daemon reported an error, 2 usage error,
3 the daemon is not running.
"""

LOGIN_DESCRIPTION = """\
Log in once, to one iSCSI portal of the array (its group address, or any
member's), with open-iscsi: SendTargets discovery there, the target's node
record (made if missing, with CHAP from chap_credentials_file when
configured), node.startup, and one session. Then the daemon is told, and
this returns: from the volume's map the daemon learns every member and its
portals, and logs in sessions_per_member sessions to each member that owns
pages, before routing pages to it. A login that fails leaves no node record
it made behind.
"""

LOGIN_EPILOG = """\
examples:
  switch-agent login --portal 10.0.0.10
  switch-agent login --portal [fd00::10]:3260 --target iqn.2001-05.com.example:vol1

exit status: 0 logged in (or was already), 1 iscsiadm or the array said no (the
reason is printed), 2 usage error (bad portal; several targets and no --target).
"""

parse_size = size_argument()
"""Bytes from "4096" or "10G" (K, M, G, T, P are powers of 1024), for argparse."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switch-agent", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None,
                        help=f"configuration file (default {DEFAULT_CONFIG_PATH})")
    parser.add_argument("--socket", type=Path, default=None, help="control socket (default from the config)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    daemon = sub.add_parser("daemon", help="run the agent in the foreground (for systemd)",
                            description="Watch udev for multipath LUNs of configured arrays and keep "
                                        "each one routed. Run by systemd, it logs to the journal with the "
                                        "fields WWID, MPATH and MEMBER (journalctl -u switch-agent "
                                        "WWID=<wwid>) and takes its control socket from switch-agent.socket; "
                                        "anywhere else it logs to stderr and binds the socket itself. "
                                        "SIGTERM stops the daemon and leaves routed devices in place.")
    daemon.add_argument("--poll-interval", type=float, metavar="SECONDS",
                        help="how often to poll each LUN's map generation (config: poll_interval_s)")
    daemon.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                        help="log verbosity (config: log_level)")

    for name, text in (("status", "every LUN the agent knows, with members, paths and map"),):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--json", action="store_true", help="print JSON for scripts")
    show = sub.add_parser("show", help="one LUN in detail", description="One LUN in detail.")
    show.add_argument("lun", help="wwid, multipath map name, or routed device name")
    show.add_argument("--json", action="store_true", help="print JSON for scripts")
    show.add_argument("--map", action="store_true",
                      help="draw the page map as a strip of cells, a letter (and on a terminal a colour) per "
                           "member, one cell per page or group of pages; lower case: pages that moved in the "
                           "last generation. NO_COLOR=1 or a pipe gives plain letters")
    refresh = sub.add_parser("refresh", help="re-read a LUN's map from the array and apply it now",
                             description="Ask the daemon to re-discover the LUN's paths, re-fetch its page "
                                         "map and apply it (only changed regions are sent). Waits for the "
                                         "result.")
    refresh.add_argument("lun", help="wwid, multipath map name, or routed device name")
    refresh.add_argument("--json", action="store_true", help="print JSON for scripts")
    locate = sub.add_parser("locate", help="which member and path serve a byte offset",
                            description="Which array member owns the page holding OFFSET, and which "
                                        "paths the routed device sends its I/O to.")
    locate.add_argument("lun", help="wwid, multipath map name, or routed device name")
    locate.add_argument("offset", type=parse_size, help="byte offset into the LUN (suffixes K M G T: x1024)")
    locate.add_argument("--json", action="store_true", help="print JSON for scripts")
    trigger = sub.add_parser("trigger", help="(for the udev rule) schedule a re-check and return at once",
                             description="Schedule a re-check of a LUN (by wwid or dm uuid mpath-<wwid>) or "
                                         "of the LUN behind a SCSI device (--scsi-device /devices/...) and "
                                         "return without waiting. With switch-agent.socket listening, a "
                                         "daemon that is down is started by this request, and reads it once "
                                         f"it runs; the wait for its answer ends after {TRIGGER_TIMEOUT_S:g} s. "
                                         "Exit 0 either way, silent when neither the daemon nor its socket is there, "
                                         "so udev never stalls on it.")
    login = sub.add_parser(
        "login", help="log in once to the array's (group) portal; the daemon logs in to every member",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=LOGIN_DESCRIPTION,
        epilog=LOGIN_EPILOG)
    login.add_argument("--portal", required=True, metavar="ADDR[:PORT]",
                       help="the array's group portal (port 3260 if left out; IPv6 in brackets)")
    login.add_argument("--target", metavar="IQN", help="the target to log in to, when the portal offers several")
    login.add_argument("--startup", choices=("automatic", "manual"), default="automatic",
                       help="node.startup of the record: automatic (default) logs in again at boot")
    login.add_argument("--json", action="store_true", help="print JSON for scripts")
    logout = sub.add_parser(
        "logout", help="unroute a volume and log out of its iSCSI target",
        description="Ask the daemon to remove its routed device(s) of the volume -- refused, with the "
                    "holder named, while a routed device is open -- then to log out every session to "
                    "the volume's target and delete the node records the agent made. Routing of the "
                    "target is not set up again until the next `switch-agent login`.",
        epilog="exit status: 0 done, 1 refused (device in use) or iscsiadm failed, 3 the daemon is not running.")
    logout.add_argument("ref", metavar="LUN|TARGET",
                        help="wwid, multipath map name or routed device name; or the target's IQN")
    logout.add_argument("--json", action="store_true", help="print JSON for scripts")
    what = trigger.add_mutually_exclusive_group(required=True)
    what.add_argument("lun", nargs="?", help="wwid or mpath-<wwid>")
    what.add_argument("--scsi-device", metavar="DEVPATH", help="udev DEVPATH of a scsi_device")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config, required=args.config is not None)
    except ConfigError as exc:
        print(f"switch-agent: {exc}", file=sys.stderr)
        return EXIT_USAGE
    socket_path = args.socket or config.socket_path
    if args.command == "daemon":
        return run_daemon(args, config, socket_path)
    if args.command == "trigger":
        return run_trigger(args, socket_path)
    if args.command == "login":
        return run_login(args, config, socket_path)
    if args.command == "logout":
        return run_logout(args, socket_path)
    request: dict[str, Any] = {"command": args.command}
    if hasattr(args, "lun"):
        request["lun"] = args.lun
    if args.command == "locate":
        request["offset"] = args.offset
    map_row = None
    if getattr(args, "map", False):
        from agent.mapview import cells_for

        terminal = shutil.get_terminal_size()
        map_row, request["map_cells"] = cells_for(terminal.columns, terminal.lines)
    try:
        result = control.request(socket_path, request)
    except control.ControlError as exc:
        return _request_failed(exc)
    if args.json:
        print(json.dumps(result, indent=2))
    elif map_row:
        if "map" not in result:
            print("switch-agent: the daemon sent no map (it predates `show --map`: restart it)", file=sys.stderr)
            return EXIT_ERROR
        print(render_map(result, map_row, colour=sys.stdout.isatty() and not os.environ.get("NO_COLOR")))
    else:
        print(render(args.command, result))
    return EXIT_OK


def _request_failed(exc: control.ControlError, refused: str = "") -> int:
    """Say why a request to the daemon failed; the exit status (3 when no daemon runs)."""
    if isinstance(exc, control.DaemonNotRunningError):
        print(f"switch-agent: {exc}", file=sys.stderr)
        return EXIT_NO_DAEMON
    print(f"switch-agent: {refused}{exc}", file=sys.stderr)
    return EXIT_ERROR


def run_trigger(args: argparse.Namespace, socket_path: Path) -> int:
    """Fire and forget, with arguments checked: they come from udev, i.e. from device data.

    The request is sent even when no daemon runs: with switch-agent.socket
    listening, that connection starts the daemon, which reads the request
    once it serves. Only the wait for the answer is bounded.
    """
    request = {"command": "trigger", **({"scsi_device": "/sys" + args.scsi_device.removeprefix("/sys")}
                                        if args.scsi_device else {"lun": args.lun})}
    try:
        control.check_trigger(request)
        control.request(socket_path, request, timeout_s=TRIGGER_TIMEOUT_S)
    except control.SuspiciousArgumentError as exc:
        print(f"switch-agent: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except control.DaemonNotRunningError:
        return EXIT_OK  # no daemon and no socket unit: it scans everything when it starts
    except control.NoAnswerError as exc:
        # Queued on the socket: a daemon that systemd is starting reads it when it serves.
        print(f"switch-agent: trigger sent; {exc} (starting?)", file=sys.stderr)
        return EXIT_OK
    except control.ControlError as exc:
        print(f"switch-agent: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def run_login(args: argparse.Namespace, config: Config, socket_path: Path) -> int:
    """iscsiadm here, as root; then one message to the daemon, which makes the rest of the set."""
    from agent.kernel.iscsi import Iscsiadm
    from agent.login import LoginUsageError, login, parse_portal

    try:
        portal = parse_portal(args.portal)
        result = asyncio.run(login(config, Iscsiadm(timeout_s=config.iscsiadm_timeout_s), portal,
                                   target=args.target, startup=args.startup))
    except LoginUsageError as exc:
        print(f"switch-agent: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SwitchAgentError as exc:
        print(f"switch-agent: login failed: {exc}", file=sys.stderr)
        return EXIT_ERROR
    told = True
    try:
        message: dict[str, Any] = {"command": "sessions", "target": result.target}
        if result.record_created:
            message |= {"portal": str(result.portal), "iface": "default"}
        control.request(socket_path, message, timeout_s=10.0)
    except control.ControlError as exc:
        told = False
        print(f"switch-agent: warning: {exc}; the daemon logs in to the other members once it runs",
              file=sys.stderr)
    if args.json:
        print(json.dumps({"target": result.target, "portal": str(result.portal),
                          "record_created": result.record_created, "session_logged_in": result.session_logged_in,
                          "daemon_told": told, "targets": list(result.targets)}, indent=2))
    else:
        done = "logged in to" if result.session_logged_in else "already logged in to"
        print(f"{done} {result.target} at {result.portal}"
              + ("; the daemon now logs in to every member that owns pages" if told else ""))
    return EXIT_OK


def run_logout(args: argparse.Namespace, socket_path: Path) -> int:
    try:
        result = control.request(socket_path, {"command": "logout", "ref": args.ref})
    except control.ControlError as exc:
        return _request_failed(exc, "logout refused: ")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        removed = ", ".join(result.get("routing_removed") or []) or "no routed device"
        print(f"{result.get('target')}: removed {removed}; logged out {len(result.get('sessions_logged_out') or [])} "
              f"session(s); deleted {len(result.get('records_deleted') or [])} node record(s)")
        for error in result.get("errors") or []:
            print(f"  error: {error}")
    return EXIT_ERROR if result.get("errors") else EXIT_OK


def run_daemon(args: argparse.Namespace, config: Config, socket_path: Path) -> int:
    from dataclasses import replace

    from agent.daemon import Daemon, install_signal_handlers, limit_malloc_arenas
    from agent.system import RealSystem, open_udev_events

    overrides: dict[str, Any] = {"socket_path": socket_path}
    if args.poll_interval is not None:
        overrides["poll_interval_s"] = args.poll_interval
    if args.log_level:
        overrides["log_level"] = args.log_level
    config = replace(config, **overrides)
    try:
        check_config(config, "command line")  # the file's rules for flags too: --poll-interval nan is no interval
    except ConfigError as exc:
        print(f"switch-agent: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # journald stamps each line itself; anywhere else a time is worth having. Under systemd the
    # messages go to the journal natively, with their LUN's and member's fields (agent.journal).
    from agent.journal import daemon_handler

    stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
    logging.basicConfig(level=config.log_level.upper(),
                        handlers=[daemon_handler(stamp + "%(levelname)s %(name)s: %(message)s")])

    limit_malloc_arenas()

    async def serve() -> None:
        from agent.kernel.iscsi import Iscsiadm, NodeRecords
        from agent.session_keeper import LEDGER_NAME, SessionKeeper

        system = RealSystem(config)
        # The ledger beside the control socket: /run (a tmpfs) -- kept across restarts, not reboots.
        keeper = SessionKeeper(config, system, Iscsiadm(timeout_s=config.iscsiadm_timeout_s),
                               ledger_path=socket_path.parent / LEDGER_NAME, clock=time.monotonic,
                               node_records=NodeRecords())
        daemon = Daemon(config, system, open_udev_events(), sessions=keeper)
        install_signal_handlers(daemon)
        await daemon.run()

    try:
        asyncio.run(serve())
    except SwitchAgentError as exc:
        logging.getLogger("switch-agent").error("%s", exc)
        return EXIT_ERROR
    return EXIT_OK


def render(command: str, result: Any) -> str:
    """Human-readable output of the daemon's JSON answer, in the spirit of `multipath -ll`."""
    from agent.reporting import Location, LunStatus

    if command == "locate":
        where = Location.from_json(result)
        member = where.member if where.member is not None else "no member (unallocated page)"
        return (f"{where.wwid} offset {where.offset}: page {where.page} -> {member}"
                f" via {where.leg or '-'} ({', '.join(where.paths) or 'no own path'})")
    records = [LunStatus.from_json(r) for r in (result if isinstance(result, list) else [result])]
    if not records:
        return "no array LUNs found"
    return "\n".join(_render_lun(r) for r in records)


def render_map(result: dict[str, Any], per_row: int, *, colour: bool) -> str:
    """`show --map`: the daemon's status record with its "map" drawn as cells and a legend."""
    from agent.mapview import MapPicture, render
    from agent.reporting import LunStatus

    return render(LunStatus.from_json(result), MapPicture.from_json(result["map"]), per_row, colour=colour)


def _render_lun(r: LunStatus) -> str:
    lines = [f"{r.wwid} {r.state} {r.device or '(not routed)'}"]
    if r.generation is not None:
        lines.append(f"  map generation {r.generation}, {r.pages} pages of "
                     f"{(r.page_size_bytes or 0) // (1024 * 1024)} MiB, age {r.map_age_s} s"
                     + (f", {r.unallocated_pages} unallocated" if r.unallocated_pages else ""))
    sessions = {s.member_id: s for s in r.sessions.members} if r.sessions else {}
    for m in r.members:
        paths = " ".join(f"{p.device}({p.state})" for p in m.paths) or "no paths"
        lines.append(f"  member {m.name} (id {m.member_id}): {m.pages} pages, {paths}")
        if m.member_id in sessions:
            lines.append(_render_sessions(sessions.pop(m.member_id)))
    for s in sessions.values():  # members outside the map: leaving, or idle ones VPD 0xC1 lists
        lines.append(f"  member id {s.member_id} (not in the map):")
        lines.append(_render_sessions(s))
    if r.sessions and not r.sessions.managed:
        lines.append(f"  sessions unmanaged: {r.sessions.unmanaged_reason}")
    elif r.sessions:
        lines.append(f"  sessions managed, target {r.sessions.target}")
    if r.last_error:
        lines.append(f"  last error: {r.last_error}")
    for warning in r.warnings:
        lines.append(f"  warning: {warning}")
    return "\n".join(lines)


def _render_sessions(s: MemberSessionsState) -> str:
    line = f"    sessions {s.logged_in}/{s.want} (logged in {s.logged_in}, failed {s.failed}"
    line += f", not ours {s.not_ours}" if s.not_ours else ""
    line += f", misplaced {s.misplaced}" if s.misplaced else ""
    line += ")" + (f"; waiting: {', '.join(s.waiting)}" if s.waiting else "")
    if s.last_error:
        line += f"\n    last login error: {s.last_error}"
    return line


if __name__ == "__main__":
    sys.exit(main())
