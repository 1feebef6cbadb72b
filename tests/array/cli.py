"""`python -m tests.array SUBCOMMAND`: start, drive and stop the emulated array.

`up` starts a background server (tests/array/server.py) that holds the
state; the other subcommands talk to it over a unix socket in the run
directory ($SWEMU_RUN_DIR, default /run/switch-agent-emu; the server logs to
<run dir>/emulator.log). Initiator-side steps (iscsiadm, multipathd) run
here, in the CLI process, so the server keeps serving while they wait.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from agent.sizes import size_argument
from tests.array import control, initiator
from tests.array.lio import CHAP_ENV, Chap, parse_chap
from tests.array.errors import ControlError, EmulatorError, InitiatorError

# As tests/array/layouts.py names them; not imported from there, so the CLI
# does not pay numpy's import (seconds per call under TCG).
LAYOUTS = ("striped", "random", "seed")

REPO_ROOT = Path(__file__).resolve().parents[2]
UP_TIMEOUT_S = 180.0  # LIO set-up under TCG takes tens of seconds
DOWN_TIMEOUT_S = 120.0
EXTRA_BACKSTORE_S = 3.0
LOGIN_S_PER_LUN = 6.0


_parse_size = size_argument(fractions=True, largest="T")
"""Bytes, with an optional K/M/G/T (binary) suffix: 64M, 22.5T."""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


# -- up / down ---------------------------------------------------------------------------

def cmd_up(args: argparse.Namespace) -> int:
    run_dir = control.run_dir()
    if control.server_running(run_dir):
        raise ControlError(f"an emulator is already up in {run_dir} (python -m tests.array down)")
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / control.LOG_NAME
    argv = [sys.executable, "-m", "tests.array", "_serve", "--members", str(args.members),
            "--layout", args.layout, "--size", str(args.size), "--page-size", str(args.page_size),
            "--seed", str(args.seed), "--luns", str(args.luns)]
    if args.no_member_portals:
        argv.append("--no-member-portals")
    if args.keep_data:
        argv.append("--keep-data")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
               SWEMU_RUN_DIR=str(run_dir))
    env.pop(CHAP_ENV, None)
    chap = _chap(args)
    if chap is not None:  # through the environment: the server's argv is world-readable
        env[CHAP_ENV] = f"{chap.userid}:{chap.password}"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   cwd=REPO_ROOT, env=env, start_new_session=True)
    # Each backstore of an extra LUN costs seconds of configfs work under TCG.
    up_timeout = UP_TIMEOUT_S + EXTRA_BACKSTORE_S * (args.luns - 1) * args.members
    deadline = time.monotonic() + up_timeout
    while not control.server_running(run_dir):
        if process.poll() is not None:
            raise ControlError(f"emulator server exited with {process.returncode}; "
                               f"last log lines:\n{_tail(log_path)}")
        if time.monotonic() >= deadline:
            process.terminate()
            raise ControlError(f"emulator server not ready after {up_timeout:.0f} s; see {log_path}")
        time.sleep(0.2)  # polling the socket with a deadline
    info = control.request(run_dir, "info")
    _emit(args, info, _format_info(info))
    return 0


def _chap(args: argparse.Namespace) -> Chap | None:
    """The --chap / --chap-file credentials, or None."""
    if getattr(args, "chap_file", None):
        try:
            return parse_chap(Path(args.chap_file).read_text())
        except OSError as exc:
            raise ControlError(f"cannot read the CHAP file {args.chap_file}: {exc.strerror}") from exc
    return parse_chap(args.chap) if getattr(args, "chap", None) else None


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def cmd_down(args: argparse.Namespace) -> int:
    run_dir = control.run_dir()
    try:
        info = control.request(run_dir, "info", timeout=30)
    except ControlError:
        info = None
    iqn = info["iqn"] if info else _default_iqn()
    problems = []
    if info:
        for wwid in [lun["wwid"] for lun in info.get("luns", [])] or [info["wwid"]]:
            name = initiator.multipath_map(wwid)
            if name:
                try:
                    initiator.flush_map(name)
                except InitiatorError as exc:
                    problems.append(str(exc))
    for session in initiator.sessions(iqn):
        initiator.remove_paths(session.devices)
        initiator.logout(iqn, session.address or f"127.0.0.{session.tpgt}")
    if info:
        extra = (len(info.get("luns", [])) - 1) * len(info["members"])
        control.request(run_dir, "shutdown", timeout=DOWN_TIMEOUT_S + EXTRA_BACKSTORE_S * max(extra, 0))
        _wait_gone(info["pid"])
    elif args.force:
        from tests.array.lio import delete_leftovers

        problems.extend(f"deleted leftover {what}" for what in delete_leftovers(iqn))
    for problem in problems:
        print(f"down: {problem}", file=sys.stderr)
    _emit(args, {"down": True, "notes": problems}, "down")
    return 0


def _default_iqn() -> str:
    from tests.array.lio import DEFAULT_IQN

    return DEFAULT_IQN


def _wait_gone(pid: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise ControlError(f"emulator server {pid} still running {timeout} s after shutdown")


# -- info / stats --------------------------------------------------------------------------

def cmd_info(args: argparse.Namespace) -> int:
    info = _full_info()
    _emit(args, info, _format_info(info))
    return 0


def _full_info() -> dict[str, Any]:
    """The server's view plus the initiator's: each member's sd devices and the multipath map."""
    info = control.request(control.run_dir(), "info")
    by_member: dict[int, list[str]] = {}
    for session in initiator.sessions(info["iqn"]):
        by_member.setdefault(session.member_number, []).extend(f"/dev/{d}" for d in session.devices)
    for member in info["members"]:
        member["paths"] = by_member.get(member["number"], [])
    name = initiator.multipath_map(info["wwid"])
    info["multipath_map"] = f"/dev/mapper/{name}" if name else None
    return info


def _format_info(info: dict[str, Any]) -> str:
    lines = [f"volume {info['volume']}  wwid {info['wwid']}  serial {info['serial']}",
             f"size {info['size_bytes']} bytes  page {info['page_size_bytes']} bytes  "
             f"pages {info['total_pages']}  layout {info['layout']}  generation {info['generation']}",
             f"target {info['iqn']}  multipath map {info.get('multipath_map')}"]
    for m in info["members"]:
        lines.append(f"  {m['name']}  id {m['member_id']}  portal {m['portal']}  pages {m['pages']}  "
                     f"uio {m.get('uio')}  paths {' '.join(m.get('paths', [])) or '-'}")
    return "\n".join(lines)


def cmd_stats(args: argparse.Namespace) -> int:
    stats = control.request(control.run_dir(), "stats", reset=args.reset)
    lines = [f"generation {stats['generation']}",
             f"{'member':8} {'direct_cmds':>12} {'direct_bytes':>14} {'fwd_cmds':>10} {'fwd_bytes':>14} {'fwd%':>6}"]
    for name, c in stats["members"].items():
        total = c["direct_bytes"] + c["forwarded_bytes"]
        share = 100.0 * c["forwarded_bytes"] / total if total else 0.0
        lines.append(f"{name:8} {c['direct_cmds']:12} {c['direct_bytes']:14} {c['forwarded_cmds']:10} "
                     f"{c['forwarded_bytes']:14} {share:6.1f}" + ("  (removed)" if c["retired"] else ""))
    _emit(args, stats, "\n".join(lines))
    return 0


# -- changes -------------------------------------------------------------------------------

def cmd_move(args: argparse.Namespace) -> int:
    extra = {} if args.to is None else {"to": args.to}
    result = control.request(control.run_dir(), "move", fraction=args.fraction, **extra)
    _emit(args, result, f"moved {result['moved_pages']} pages, generation {result['generation']}")
    return 0


def cmd_resize(args: argparse.Namespace) -> int:
    result = control.request(control.run_dir(), "resize", size=args.size)
    _emit(args, result, f"size {result['size_bytes']}, {result['total_pages']} pages, "
                        f"generation {result['generation']}")
    return 0


def cmd_add_member(args: argparse.Namespace) -> int:
    result = control.request(control.run_dir(), "add-member", empty=args.empty)
    _emit(args, result, f"added {result['name']} (id {result['member_id']}) at {result['portal']}, "
                        f"generation {result['generation']}")
    return 0


def cmd_remove_member(args: argparse.Namespace) -> int:
    run_dir = control.run_dir()
    info = control.request(run_dir, "info")
    result = control.request(run_dir, "retire-member", number=args.member)
    # Its pages now belong to the others; drain and drop its paths, then its port.
    if args.wait_for_logout is not None:
        _wait_for_host_logout(info["iqn"], args.member, args.wait_for_logout)
    for session in initiator.sessions(info["iqn"]):
        if session.member_number == args.member:
            initiator.remove_paths(session.devices)
            initiator.logout(info["iqn"], session.address or f"127.0.0.{args.member + 1}")
    control.request(run_dir, "delete-member", number=args.member)
    _emit(args, result, f"removed m{args.member}, generation {result['generation']}")
    return 0


def _wait_for_host_logout(iqn: str, member: int, timeout_s: float) -> None:
    """Let the host's own session manager (the agent) log out of a retired member, as an array's
    member removal does: the member leaves the map and waits for the initiators to go."""
    deadline = time.monotonic() + timeout_s
    while any(s.member_number == member for s in initiator.sessions(iqn)):
        if time.monotonic() >= deadline:
            raise ControlError(f"the host still has sessions to m{member} {timeout_s:.0f} s after it was "
                               "retired (it is retired, out of the map, but not deleted)")
        time.sleep(0.2)  # polling sysfs with a deadline


def cmd_corrupt(args: argparse.Namespace) -> int:
    result = control.request(control.run_dir(), "corrupt-next-map", kind=args.kind, count=args.count)
    _emit(args, result, f"next {result['count']} GET PAGE MAP response(s): {result['kind']}")
    return 0


def cmd_owner(args: argparse.Namespace) -> int:
    results = [control.request(control.run_dir(), "owner", offset=offset) for offset in args.offset]
    lines = [(f"page {r['page']}: unallocated" if r.get("number") is None else
              f"page {r['page']}: {r['name']} (id {r['member_id']}, index {r['index']}, portal {r['portal']})")
             for r in results]
    # One offset: one object (the common case); several: a list in the same order.
    _emit(args, results[0] if len(results) == 1 else results, "\n".join(lines))
    return 0


# -- initiator -----------------------------------------------------------------------------

def cmd_login(args: argparse.Namespace) -> int:
    info = control.request(control.run_dir(), "info")
    members = {m["number"]: m for m in info["members"]}
    wanted = [args.member] if args.member is not None else sorted(members)
    for number in wanted:
        if number not in members:
            raise ControlError(f"no member m{number}")
    initiator.discover(members[wanted[0]]["portal"].split(":")[0])
    # Each LUN costs the login's SCAN (INQUIRYs, capacity, udev) seconds under TCG.
    extra = LOGIN_S_PER_LUN * max(len(info.get("luns", [])) - 1, 0)
    chap = _chap(args)
    for number in wanted:
        initiator.login(info["iqn"], members[number]["portal"].split(":")[0], timeout=120.0 + extra,
                        chap=chap)
    initiator.wait_for_devices(info["iqn"], wanted, timeout=60.0 + extra)
    full = _full_info()
    _emit(args, full, _format_info(full))
    return 0


def cmd_logout(args: argparse.Namespace) -> int:
    info = control.request(control.run_dir(), "info")
    for session in initiator.sessions(info["iqn"]):
        if session.member_number == args.member:
            initiator.remove_paths(session.devices)
            initiator.logout(info["iqn"], session.address or f"127.0.0.{args.member + 1}")
    _emit(args, {"member": args.member, "logged_out": True}, f"logged out of m{args.member}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from tests.array.server import ServerConfig, run

    chap = os.environ.get(CHAP_ENV)
    return run(ServerConfig(run_dir=control.run_dir(), members=args.members, layout=args.layout,
                            size_bytes=args.size, page_size_bytes=args.page_size, seed=args.seed,
                            luns=args.luns, chap=parse_chap(chap) if chap else None,
                            member_portals=not args.no_member_portals, keep_data=args.keep_data))


# -- parser ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every subcommand."""
    parser = argparse.ArgumentParser(prog="python -m tests.array", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func, help_text: str, json_flag: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(func=func)
        if json_flag:
            p.add_argument("--json", action="store_true", help="print JSON")
        return p

    def geometry(p: argparse.ArgumentParser) -> None:
        p.add_argument("--members", type=int, default=3)
        p.add_argument("--layout", choices=LAYOUTS, default="striped")
        p.add_argument("--size", type=_parse_size, default=_parse_size("1G"), help="bytes (64M, 22.5T ok)")
        p.add_argument("--page-size", type=_parse_size, default=_parse_size("1M"))
        p.add_argument("--seed", type=int, default=0, help="random layouts and page moves")
        p.add_argument("--luns", type=_positive, default=1,
                       help="volumes, each LUN i of every member; LUN 0 follows the control commands")
        p.add_argument("--no-member-portals", action="store_true",
                       help="do not offer VPD 0xC1 (a protocol-1.0 array: hosts cannot manage its sessions)")
        p.add_argument("--keep-data", action="store_true",
                       help="serve the data already in the data directory ($SWEMU_DATA_DIR) instead of "
                            "starting from zeros: the array's disks survive a restart (same --size)")

    def credentials(p: argparse.ArgumentParser, what: str) -> None:
        group = p.add_mutually_exclusive_group()
        group.add_argument("--chap", metavar="USER:PASSWORD", help=f"{what} (test credentials only: "
                           "a command line is visible to every user)")
        group.add_argument("--chap-file", metavar="PATH", help="the same, read from a file holding USER:PASSWORD")

    up = add("up", cmd_up, "start the array and return once every backstore is serving")
    geometry(up)
    credentials(up, "every member's TPG requires one-way CHAP with these credentials")
    add("down", cmd_down, "flush multipath, log out, delete the LIO objects, stop the server").add_argument(
        "--force", action="store_true", help="also delete LIO leftovers when no server answers")
    add("info", cmd_info, "volume, members, their path devices and the multipath map")
    add("stats", cmd_stats, "per-member direct/forwarded counters").add_argument(
        "--reset", action="store_true", help="zero the counters after printing them")
    move = add("move", cmd_move, "reassign a fraction of the pages (new generation)")
    move.add_argument("--fraction", type=float, required=True)
    move.add_argument("--to", type=int, metavar="K", help="give the pages to member m<K> (from the others)")
    add("resize", cmd_resize, "grow or shrink the volume").add_argument("--size", type=_parse_size, required=True)
    add("add-member", cmd_add_member, "a new member with its own portal; it takes ~1/(M+1) of the pages").add_argument(
        "--empty", action="store_true", help="it joins owning no pages (then: move --fraction F --to K)")
    remove = add("remove-member", cmd_remove_member, "move a member's pages away, log out of it, delete it")
    remove.add_argument("member", type=int, help="member number k (m<k>)")
    remove.add_argument("--wait-for-logout", type=float, metavar="S",
                        help="leave the logout to the host (its agent): wait up to S s for its sessions to "
                             "the member to end before deleting it")
    login = add("login", cmd_login, "iscsiadm discovery and login (all members or one)")
    login.add_argument("--member", type=int)
    credentials(login, "write these CHAP credentials into the node records before logging in")
    add("logout", cmd_logout, "log out of one member's portal").add_argument("--member", type=int, required=True)
    corrupt = add("corrupt-next-map", cmd_corrupt, "damage the next GET PAGE MAP response(s)")
    corrupt.add_argument("kind", choices=("bad-crc", "truncated", "entry-out-of-range", "generation-churn"))
    corrupt.add_argument("--count", type=int, default=1, help="how many responses (default 1)")
    add("owner", cmd_owner, "which member owns the page holding a byte offset").add_argument(
        "offset", type=_parse_size, nargs="+")
    geometry(add("_serve", cmd_serve, "internal: the server process that up starts", json_flag=False))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; typed errors become one line on stderr and exit status 1."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EmulatorError as exc:
        print(f"tests.array {args.command}: {exc}", file=sys.stderr)
        return 1
