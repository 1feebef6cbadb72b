"""LIO's own REPORT REFERRALS, set up for the agent to read: no emulator, the kernel answers.

    python -m tests.array.lio_referrals up --members N --size BYTES --lba-map SPEC
    python -m tests.array.lio_referrals login [--first] | logout | down [--force]
    python -m tests.array.lio_referrals set-map SPEC      # rewrite the lba_map only
    python -m tests.array.lio_referrals stats [--json]    # per-port counters

One fileio backstore (a sparse file on the guest's /tmp), one iSCSI target
with N TPGs (tag k on portal 127.0.0.k:3260, as the emulator's members), and
one ALUA target port group per port (id k, name "port<k>", LUN 0 of TPG k in
it). The device's `lba_map` configfs attribute (target_core_configfs.c
target_dev_lba_map_store) holds the layout: first line "<segment size>
<segment multiplier>", then "<first lba> <last lba> <pg>:<state> ..." per
segment; LIO answers VPD 0xB3 and REPORT REFERRALS from it.

Every group stays Active/Optimized (LIO's default), so every port serves
every LBA: LIO enforces the lba_map only in the LBA-dependent state
(core_alua_state_lba_dependent), and there an LBA no segment covers is
"unavailable". The per-port statistics (configfs
.../tpgt_k/lun/lun_0/statistics/scsi_tgt_port/) show where I/O arrived.

SPEC (sizes in bytes, K/M/G suffixes; groups are port numbers 1..N):
    striped:SIZE              segments of SIZE over the whole LUN, optimized
                              on group 1, 2, ..., N, 1, ... in turn
    SIZE:G,SIZE:G,...         consecutive segments from LBA 0; G = - lists
                              every group non-optimized (no optimized group);
                              LBAs after the last segment are in no segment
Each segment line lists every group: its optimized one O, the others A.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import warnings
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from agent import sizes
from tests.array import initiator
from tests.array.errors import InitiatorError, LioError
from tests.array.lio import DEMO_MODE_ATTRIBUTES, PORT, delete_target_and_storage

IQN = "iqn.2026-11.org.switch-agent:lio-referrals"
BACKSTORE = "lioref"
BACKING_FILE = Path("/tmp/switch-agent-lio-referrals.img")
SERIAL = "5a6e7c1d-0b2f-4e3a-9c8d-1f2e3d4c5b6a"
BLOCK_BYTES = 512
CONFIGFS = Path("/sys/kernel/config/target")
STATE_FILE = Path("/run/switch-agent-lioref.json")
LBA_MAP_MAX_BYTES = 4096  # a configfs attribute write is one page

def parse_size(text: str) -> int:
    return sizes.parse_size(text, minimum=1, largest="T")


@dataclass(frozen=True)
class Segment:
    first_lba: int
    last_lba: int
    optimized: int | None
    """The port group that is Active/Optimized for it; None: every group non-optimized."""


def parse_spec(spec: str, members: int, size_bytes: int) -> list[Segment]:
    """The segments SPEC describes on a LUN of `size_bytes` with `members` port groups."""
    blocks = size_bytes // BLOCK_BYTES
    segments: list[Segment] = []
    if spec.startswith("striped:"):
        seg = parse_size(spec.split(":", 1)[1]) // BLOCK_BYTES
        if seg < 1:
            raise ValueError(f"{spec}: segment smaller than a block")
        for k, first in enumerate(range(0, blocks, seg)):
            segments.append(Segment(first, min(first + seg, blocks) - 1, k % members + 1))
        return segments
    at = 0
    for item in spec.split(","):
        size_text, _, group_text = item.partition(":")
        count = parse_size(size_text) // BLOCK_BYTES
        group = None if group_text.strip() == "-" else int(group_text)
        if group is not None and not 1 <= group <= members:
            raise ValueError(f"{item}: group must be 1..{members} or -")
        if count < 1 or at + count > blocks:
            raise ValueError(f"{item}: segment empty or past the LUN's end ({blocks} blocks)")
        segments.append(Segment(at, at + count - 1, group))
        at += count
    return segments


def lba_map_text(segments: list[Segment], members: int) -> str:
    """The lba_map attribute's text; segment size/multiplier 0 0 (explicit segments)."""
    lines = ["0 0"]
    for s in segments:
        states = " ".join(f"{g}:{'O' if g == s.optimized else 'A'}" for g in range(1, members + 1))
        lines.append(f"{s.first_lba} {s.last_lba} {states}")
    text = "\n".join(lines) + "\n"
    if len(text) > LBA_MAP_MAX_BYTES:
        raise ValueError(f"lba_map of {len(segments)} segments is {len(text)} bytes; configfs takes "
                         f"{LBA_MAP_MAX_BYTES}: use fewer segments")
    return text


def _rts():
    import rtslib_fb  # only in the guest: the host has no configfs

    Path("/etc/target").mkdir(exist_ok=True)  # rtslib refuses to start without its dbroot
    return rtslib_fb


@contextlib.contextmanager
def _quiet():
    """rtslib's own warnings (pyudev deprecations; "cannot set dbroot" once a backstore exists,
    where we save nothing) are not ours: under pytest's warnings-as-errors they would abort."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _state() -> dict:
    try:
        return json.loads(STATE_FILE.read_text())
    except (OSError, ValueError):
        raise LioError("no LIO referrals array is up (python -m tests.array.lio_referrals up)") from None


def storage_path() -> Path:
    return next(CONFIGFS.glob(f"core/fileio_*/{BACKSTORE}"))


def set_map(spec: str) -> list[Segment]:
    """Rewrite the device's lba_map (LIO swaps the whole list under its lock)."""
    state = _state()
    segments = parse_spec(spec, state["members"], state["size"])
    (storage_path() / "lba_map").write_text(lba_map_text(segments, state["members"]))
    STATE_FILE.write_text(json.dumps(state | {"spec": spec}))
    return segments


def up(members: int, size_bytes: int, spec: str) -> list[Segment]:
    """Backstore, target, N TPGs/portals/ALUA groups, and the lba_map."""
    if not 1 <= members <= 250:
        raise LioError("members must be 1..250")
    segments = parse_spec(spec, members, size_bytes)
    text = lba_map_text(segments, members)
    rts = _rts()
    with _quiet():
        _create(rts, members, size_bytes, text)
    STATE_FILE.write_text(json.dumps({"members": members, "size": size_bytes, "spec": spec}))
    return segments


def _create(rts, members: int, size_bytes: int, text: str) -> None:
    try:
        BACKING_FILE.unlink(missing_ok=True)
        storage = rts.FileIOStorageObject(BACKSTORE, dev=str(BACKING_FILE), size=size_bytes, wwn=SERIAL,
                                          write_back=False)
        target = rts.Target(rts.FabricModule("iscsi"), IQN, mode="create")
        for k in range(1, members + 1):
            rts.ALUATargetPortGroup(storage, f"port{k}", tag=k)
            tpg = rts.TPG(target, k, mode="create")
            for name, value in DEMO_MODE_ATTRIBUTES:
                tpg.set_attribute(name, value)
            rts.NetworkPortal(tpg, f"127.0.0.{k}", PORT, mode="create")
            lun = rts.LUN(tpg, 0, storage)
            lun.alua_tg_pt_gp_name = f"port{k}"
            tpg.enable = True
        (Path(storage.path) / "lba_map").write_text(text)
    except rts.RTSLibError as exc:
        raise LioError(f"cannot set up LIO referrals array: {exc} "
                       "(left over? python -m tests.array.lio_referrals down --force)") from exc


def login(timeout_s: float = 60.0, *, first_only: bool = False) -> list[initiator.Session]:
    """Discover through port 1, log in to every port (or port 1 only), wait for each session's sd device."""
    members = 1 if first_only else _state()["members"]
    initiator.discover("127.0.0.1")
    for k in range(1, members + 1):
        initiator.login(IQN, f"127.0.0.{k}")
    # initiator.Session.member_number is tpgt - 1
    return initiator.wait_for_devices(IQN, list(range(members)), timeout=timeout_s)


def logout() -> None:
    """Take the paths out of multipathd's map, flush the map, log out of every port."""
    current = initiator.sessions(IQN)
    for session in current:
        initiator.remove_paths(session.devices)
    wwid = _wwid()
    name = initiator.multipath_map(wwid) if wwid else None
    if name:
        subprocess.run(["multipath", "-f", name], capture_output=True, timeout=60)
    for session in current:
        initiator.logout(IQN, session.address or f"127.0.0.{session.tpgt}")


def _wwid() -> str | None:
    """The LUN's wwid as udev sees it (NAA 6 from the backstore's serial): from any session's disk."""
    for session in initiator.sessions(IQN):
        for device in session.devices:
            wwid = Path(f"/sys/block/{device}/device/wwid")
            if wwid.is_file():
                text = wwid.read_text().strip()
                return "3" + text.removeprefix("naa.") if text.startswith("naa.") else None
    return None


def down(force: bool = False) -> list[str]:
    """Log out (unless forced), then delete the target and backstore; returns what was deleted."""
    if not force:
        logout()
    rts = _rts()
    with _quiet():
        deleted = delete_target_and_storage(rts.RTSRoot(), IQN, lambda storage: storage.name == BACKSTORE)
    BACKING_FILE.unlink(missing_ok=True)
    STATE_FILE.unlink(missing_ok=True)
    return deleted


def port_stats() -> dict[int, dict[str, int]]:
    """Per port group (= TPG tag): LIO's scsi_tgt_port counters of LUN 0."""
    out = {}
    for tpgt in sorted(CONFIGFS.glob(f"iscsi/{IQN}/tpgt_*")):
        stats = tpgt / "lun" / "lun_0" / "statistics" / "scsi_tgt_port"
        out[int(tpgt.name.removeprefix("tpgt_"))] = {
            name: int((stats / name).read_text().split()[0]) for name in ("in_cmds", "read_mbytes", "write_mbytes")}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.array.lio_referrals", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    u = sub.add_parser("up")
    u.add_argument("--members", type=int, required=True)
    u.add_argument("--size", type=parse_size, required=True)
    u.add_argument("--lba-map", required=True)
    sub.add_parser("login").add_argument("--first", action="store_true",
                                         help="port 1 only: the group login a host starts from")
    sub.add_parser("logout")
    d = sub.add_parser("down")
    d.add_argument("--force", action="store_true", help="do not log out first (nothing is logged in)")
    m = sub.add_parser("set-map")
    m.add_argument("spec")
    s = sub.add_parser("stats")
    s.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        if args.command == "up":
            segments = up(args.members, args.size, args.lba_map)
            print(f"LIO referrals array up: {args.members} port groups, {len(segments)} segments")
        elif args.command == "login":
            sessions = login(first_only=args.first)
            print("logged in: " + ", ".join(f"tpgt {s.tpgt} -> {' '.join(s.devices)}" for s in sessions))
        elif args.command == "logout":
            logout()
        elif args.command == "down":
            print("deleted: " + (", ".join(down(args.force)) or "nothing"))
        elif args.command == "set-map":
            print(f"lba_map: {len(set_map(args.spec))} segments")
        elif args.command == "stats":
            stats = port_stats()
            print(json.dumps(stats) if args.json else "\n".join(f"port group {k}: {v}" for k, v in stats.items()))
    except (LioError, InitiatorError, ValueError, OSError) as exc:
        print(f"lio_referrals {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
