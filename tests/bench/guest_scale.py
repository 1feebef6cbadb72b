"""Guest part of the scale benchmark: run inside the VM rig, array up and logged in.

    python -m tests.bench.guest_scale [--json] [--repeat N] [--only fetch,install,diff] [--moves 1000,1]

Started by tests/bench/scale.py (host). Measures, on the rig's one LUN (the
seed's 22.5 TiB at 15 MiB pages over 3 members):

- fetch: the agent's GET PAGE MAP fetch (agent.mapsources.pagemap.fetch_page_map through
  SG_IO, decode and CRCs included) beside `sg_raw` sending the same CDBs;
- install: the agent's own pipeline (agent.orchestrator.Orchestrator over
  agent.system.RealSystem) from the map in memory to routed, beside
  (a) the same messages sent with raw DM_TARGET_MSG ioctls to a switch over
  dm-zero legs (and the map in the fewest messages the kernel accepts), and
  (b) `dmsetup message` per 4 KiB of the seed thread's per-run text
  (a timed sample, extrapolated);
- diff: 1,000 pages, then 1 page, moved on the array, to the agent's switch holding
  them (`--moves`); with `--only diff` the LUN is routed once first, untimed,
  and the install's own measurements are skipped. Prints one summary line
  per move size.

Writes <results>/bench-scale.json (results = $SWITCH_AGENT_RESULTS) and,
with --json, prints it. Asserts nothing about the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import fcntl
import io
import json
import os
import pstats
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from agent.mapsources import pagemap as mapsource
from agent import orchestrator as orch_mod
from agent.config import Config
from agent.kernel import dm as dmk
from agent.kernel import dm_abi, dm_errors
from agent.system import RealSystem
from protocol import dmswitch_encoder
from protocol.dmtable import DmUdevFlags, SwitchParams, Target
from tests.bench import scale_lib

RESULTS = Path(os.environ.get("SWITCH_AGENT_RESULTS", "/tmp"))
BENCH_PREFIX = "SWBENCH-"  # our zero devices: never the agent's SWAGENT- prefix
DMSETUP_SAMPLE = 50


def log(msg: str) -> None:
    print(f"guest-scale: {msg}", file=sys.stderr, flush=True)


# -- helpers ------------------------------------------------------------------------------

class CountingPath:
    """A ScsiPath that counts commands and data-in bytes and keeps the CDBs."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.name = inner.name
        self.cdbs: list[tuple[bytes, int]] = []
        self.bytes_in = 0

    async def max_transfer_bytes(self) -> int:
        return await self.inner.max_transfer_bytes()

    async def execute(self, cdb: bytes, *, data_in_length: int = 0, data_out: bytes | None = None):
        result = await self.inner.execute(cdb, data_in_length=data_in_length, data_out=data_out)
        self.cdbs.append((bytes(cdb), data_in_length))
        self.bytes_in += len(result.data_in)
        return result


def wwid_and_paths() -> tuple[str, list[str]]:
    uuid = os.environ["SWITCH_AGENT_MPATH_UUID"]
    paths = os.environ["SWITCH_AGENT_MPATH_PATHS"].split()
    return uuid.removeprefix("mpath-"), paths


def remove_agent_devices(dm: dmk.DeviceMapper) -> None:
    """Top, then switches, then legs (each holds the next)."""
    order = {"top": 0, "sw": 1, "leg": 2}
    devices = [d for d in dm.list_devices() if d.uuid.startswith("SWAGENT-")]
    devices.sort(key=lambda d: order.get(d.uuid.split("-")[1], 3))
    for d in devices:
        dm.device_remove(d.name)


def packed_target_msg(name: str, message: str) -> bytes:
    """One DM_TARGET_MSG ioctl buffer, as agent.kernel.dm builds it (sector 0)."""
    payload = dm_abi.DM_TARGET_MSG.pack(0) + message.encode() + b"\0"
    size = dm_abi.DM_IOCTL_SIZE + len(payload)
    return dm_abi.pack_header(dm_abi.DmCommand.TARGET_MSG, data_size=size, name=name) + payload


class ZeroSwitch:
    """A dm-switch over three dm-zero legs with the LUN's geometry: the kernel alone."""

    def __init__(self, size_sectors: int, region_sectors: int, paths: int) -> None:
        self.dm = dmk.DeviceMapper(BENCH_PREFIX)
        self.size = size_sectors
        self.region = region_sectors
        self.paths = paths
        self.legs = [f"swbench-zero{k}" for k in range(paths)]
        self.name = "swbench-switch"
        devs = []
        for leg in self.legs:
            self.dm.device_create(leg, f"{BENCH_PREFIX}{leg}")
            self.dm.table_load(leg, [Target(0, size_sectors, "zero", "")])
            self.dm.device_resume(leg, wait_for_udev=False)
            info = self.dm.device_info(leg)
            devs.append(f"{info.major}:{info.minor}")
        self.target = SwitchParams.build(size_sectors, region_sectors, devs).target()
        self.dm.device_create(self.name, f"{BENCH_PREFIX}{self.name}")
        self.reset()

    def reset(self) -> None:
        """A fresh table load: dm-switch starts over with round-robin regions."""
        self.dm.table_load(self.name, [self.target])
        self.dm.device_resume(self.name, wait_for_udev=False)

    def send_raw(self, messages: list[str]) -> float:
        """Seconds for the ioctls alone (buffers packed beforehand)."""
        bufs = [bytearray(packed_target_msg(self.name, m)) for m in messages]
        fd = self.dm._fd
        request = dm_abi.DmCommand.TARGET_MSG.request
        t0 = time.perf_counter()
        for buf in bufs:
            fcntl.ioctl(fd, request, buf)
        return time.perf_counter() - t0

    def close(self) -> None:
        for name in [self.name, *self.legs]:
            try:
                self.dm.device_remove(name)
            except dm_errors.DmError as exc:
                log(f"could not remove {name}: {exc}")
        self.dm.close()


# -- the floor: the agent's devices and messages by bare ioctls ----------------------------

def capture_stack(dm: dmk.DeviceMapper, wwid: str) -> dict:
    """The routed LUN's legs, switch and top as the kernel holds them: kind -> [(uuid, dev, targets)]."""
    out: dict[str, list] = {"leg": [], "sw": [], "top": []}
    for d in dm.list_devices():
        if d.uuid.startswith("SWAGENT-") and d.uuid.endswith(wwid):
            kind = d.uuid.split("-")[1]
            info = dm.device_info(uuid=d.uuid)
            out[kind].append((d.uuid, f"{info.major}:{info.minor}", dm.table_status(uuid=d.uuid, table=True)))
    return out


def floor_build(dm: dmk.DeviceMapper, stack: dict, bufs: list[bytearray], top_waits_udev: bool) -> dict[str, float]:
    """Create the same legs, switch and top and send the prepared messages; seconds per step.

    Every device under BENCH_PREFIX, the tables the agent's, with its major:minor replaced by ours;
    no udev wait except, with `top_waits_udev`, the top's (as the agent's top: users open it by name).
    """
    devs: dict[str, str] = {}
    marks = {"start": time.perf_counter()}

    def create(kind: str, k: int, targets: list[Target], wait: bool) -> str:
        name = f"swbench-floor-{kind}{k}"
        dm.device_create(name, f"{BENCH_PREFIX}{name}")
        dm.table_load(name, [Target(t.start_sector, t.length_sectors, t.target_type,
                                    " ".join(devs.get(tok, tok) for tok in t.params.split(" ")))
                             for t in targets])
        # Legs and switch hidden from udev's other rules, as the agent's (no blkid on them).
        dm.device_resume(name, wait_for_udev=wait, udev_flags=0 if kind == "top" else DmUdevFlags.HIDDEN)
        info = dm.device_info(name)
        return f"{info.major}:{info.minor}"

    for k, (_uuid, dev, targets) in enumerate(stack["leg"]):
        devs[dev] = create("leg", k, targets, False)
    marks["legs"] = time.perf_counter()
    (_uuid, dev, targets), = stack["sw"]
    devs[dev] = create("sw", 0, targets, False)
    marks["switch"] = time.perf_counter()
    request = dm_abi.DmCommand.TARGET_MSG.request
    for buf in bufs:
        fcntl.ioctl(dm._fd, request, buf)
    marks["messages"] = time.perf_counter()
    (_uuid, _dev, targets), = stack["top"]
    create("top", 0, targets, top_waits_udev)
    marks["top"] = time.perf_counter()
    keys = list(marks)
    steps = {f"{b}_s": marks[b] - marks[a] for a, b in zip(keys, keys[1:])}
    return {"total_s": marks["top"] - marks["start"], **steps}


def floor_remove(dm: dmk.DeviceMapper) -> None:
    """Top, then switch, then legs; the top waits for udev (its node), the hidden ones not."""
    names = {d.name for d in dm.list_devices() if d.uuid.startswith(f"{BENCH_PREFIX}swbench-floor-")}
    for prefix in ("swbench-floor-top", "swbench-floor-sw", "swbench-floor-leg"):
        for name in sorted(n for n in names if n.startswith(prefix)):
            dm.device_remove(name, wait_for_udev=prefix.endswith("top"))


def bench_floor(stack: dict, messages: list[str], repeat: int) -> dict:
    """The agent's install's floor: its devices and messages, prepared beforehand, by bare ioctls."""
    dm = dmk.DeviceMapper(BENCH_PREFIX)
    packed = [packed_target_msg("swbench-floor-sw0", m) for m in messages]
    out: dict = {"messages": len(messages), "bytes": sum(map(len, messages))}
    try:
        for label, wait in (("kernel", False), ("top_udev", True)):
            runs = []
            for _ in range(repeat):
                floor_remove(dm)
                bufs = [bytearray(b) for b in packed]  # fresh before the clock: the ioctl writes into them
                runs.append(floor_build(dm, stack, bufs, wait))
            floor_remove(dm)
            out[label] = {"s": scale_lib.summary([r["total_s"] for r in runs]), "runs": runs}
            log(f"floor ({label}): {[round(r['total_s'], 3) for r in runs]} s")
    finally:
        floor_remove(dm)
        dm.close()
    return out


# -- fetch --------------------------------------------------------------------------------

async def bench_fetch(config: Config, paths: list[str], repeat: int) -> dict:
    system = RealSystem(config)
    device = os.path.basename(paths[0])
    times, agent_only_io = [], []
    counting = None
    for _ in range(repeat):
        counting = CountingPath(system.open_path(device))
        t0 = time.perf_counter()
        page_map = await mapsource.fetch_page_map(counting, restarts=config.fetch_restarts)
        times.append(time.perf_counter() - t0)
    assert counting is not None
    cdbs = counting.cdbs
    # The same commands through SG_IO with no decode: what the decode costs.
    raw = system.open_path(device)
    for _ in range(repeat):
        t0 = time.perf_counter()
        for cdb, length in cdbs:
            await raw.execute(cdb, data_in_length=length)
        agent_only_io.append(time.perf_counter() - t0)
    sg_raw = shutil.which("sg_raw")
    sg_times = []
    out = Path("/tmp/swbench-sgraw.bin")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for cdb, length in cdbs:
            subprocess.run([sg_raw, "-r", str(length), "-o", str(out), f"/dev/{device}",
                            *(f"{b:02x}" for b in cdb)], check=True, capture_output=True, timeout=120)
        sg_times.append(time.perf_counter() - t0)
    sg_bytes = out.stat().st_size if out.exists() else None
    return {
        "device": device, "pages": page_map.total_pages, "members": len(page_map.members),
        "generation": page_map.generation, "commands": len(cdbs), "bytes": counting.bytes_in,
        "allocation": max(length for _, length in cdbs),  # the first may be a header read
        "agent_s": scale_lib.summary(times),
        "sgio_no_decode_s": scale_lib.summary(agent_only_io),
        "sg_raw_s": scale_lib.summary(sg_times), "sg_raw_last_bytes": sg_bytes,
        "cdb_first": cdbs[0][0].hex(),
    }


# -- install and diff -----------------------------------------------------------------------

class Instrumented:
    """The agent's orchestrator with the moments of its pipeline recorded (no behaviour changed)."""

    def __init__(self, config: Config) -> None:
        self.system = RealSystem(config)
        self.orch = orch_mod.Orchestrator(config, self.system)
        self.marks: dict[str, float] = {}
        self.routed_at = 0.0
        """When the last reconcile's switch took its last message (its end, if it sent none)."""
        self.messages: list[str] = []
        orch = self.orch
        fetch, send = orch.discovery.fetch_map, orch.applier._send

        async def fetch_map(topology, current=None):
            result = await fetch(topology, current)
            self.marks["map_in_memory"] = time.perf_counter()
            return result

        async def send_messages(lun, switch_uuid, messages):
            self.marks["send_start"] = time.perf_counter()
            self.messages = list(messages)
            await send(lun, switch_uuid, messages)
            self.marks["send_end"] = time.perf_counter()

        orch.discovery.fetch_map = fetch_map
        orch.applier._send = send_messages

    async def reconcile(self, wwid: str) -> dict:
        self.marks.clear()
        t0 = time.perf_counter()
        lun = await self.orch.reconcile(wwid)
        t1 = time.perf_counter()
        m = self.marks
        self.routed_at = m.get("send_end", t1)
        return {
            "reconcile_s": t1 - t0,
            "map_to_routed_s": t1 - m["map_in_memory"],
            "fetch_and_discover_s": m["map_in_memory"] - t0,
            "before_send_s": m["send_start"] - m["map_in_memory"],
            "send_s": m["send_end"] - m["send_start"],
            "after_send_s": t1 - m["send_end"],
            "messages": len(self.messages),
            "message_bytes": sum(len(x) for x in self.messages),
            "state": lun.state,
            "epoch": lun.epoch,
            "reconcile_parts_s": dict(lun.last_reconcile),
            "changes_since": lun.stack is not None and lun.stack.page_map.changed_since is not None,
        }


DIFF_KEYS = {1000: "diff", 1: "diff_one_page"}
"""Where each move size's records go in the JSON (scale_lib reads them; "diff" as before 1.2)."""


async def bench_install_and_diff(config: Config, repeat: int, only: set[str], moves: list[int]) -> dict:
    wwid, _paths = wwid_and_paths()
    out: dict = {"install": [], "diff": []}
    inst = Instrumented(config)
    dm = inst.system.dm
    remove_agent_devices(dm)
    agent_messages: list[str] = []
    if "install" not in only:
        await inst.reconcile(wwid)  # routed once, untimed: the moves below need a routed LUN
        plan = inst.orch.luns[wwid].stack.plan
        out.update(await bench_diff(inst, wwid, repeat, moves))
        remove_agent_devices(dm)
        zero = ZeroSwitch(plan.size_sectors, plan.region_size_sectors, len(plan.legs))
        try:  # the kernel alone on the same messages
            out["kernel"] = {}
            for key in ("diff", "diff_one_page"):
                if out.get(f"{key}_messages"):
                    bound = kernel_bounds_diff(zero, out.pop(f"{key}_messages"), repeat)
                    out["kernel"].update({f"{key}_{k}": v for k, v in bound.items()})
        finally:
            zero.close()
        return out
    for i in range(repeat):
        inst.orch.luns.clear()
        remove_agent_devices(dm)
        r = await inst.reconcile(wwid)
        agent_messages = inst.messages
        log(f"install {i + 1}/{repeat}: map in memory to routed {r['map_to_routed_s']:.2f} s "
            f"({r['messages']} messages, {r['message_bytes']} bytes)")
        out["install"].append(r)
    # One more install under py-spy (every thread: the encoder runs in a worker): where the time goes.
    inst.orch.luns.clear()
    remove_agent_devices(dm)
    spy = PySpy(RESULTS / "install.pyspy.txt")
    await inst.reconcile(wwid)
    out["install_pyspy"] = spy.stop()
    # The floor, while the agent's stack is up to copy: its tables, then the same build by bare ioctls.
    stack = capture_stack(dm, wwid)
    remove_agent_devices(dm)
    try:
        out["floor"] = bench_floor(stack, agent_messages, repeat)
    except (OSError, dm_errors.DmError, ValueError) as exc:  # recorded, and the other parts still run
        log(f"floor failed: {exc!r}")
        out["floor"] = {"error": repr(exc)}
    inst.orch.luns.clear()
    await inst.reconcile(wwid)  # routed again, from scratch: the parts below read the LUN's state

    lun = inst.orch.luns[wwid]
    page_map = lun.stack.page_map
    out["geometry"] = {"pages": page_map.total_pages, "page_sectors": page_map.page_size_sectors,
                       "members": len(page_map.members), "size_sectors": lun.stack.plan.size_sectors,
                       "region_sectors": lun.stack.plan.region_size_sectors}
    owners = page_map.owners

    if "diff" in only:
        out.update(await bench_diff(inst, wwid, repeat, moves))
    remove_agent_devices(dm)

    out["encode"] = encode_costs(owners, len(page_map.members), repeat, config.max_message_bytes)

    # The kernel alone, on the same messages.
    geo = out["geometry"]
    zero = ZeroSwitch(geo["size_sectors"], geo["region_sectors"], geo["members"])
    try:
        out["kernel"] = kernel_bounds(zero, agent_messages, owners, repeat, out.get("diff_messages"))
        if out.get("diff_one_page_messages"):
            one = kernel_bounds_diff(zero, out["diff_one_page_messages"], repeat)
            out["kernel"].update({f"diff_one_page_{k}": v for k, v in one.items()})
        out["dmsetup"] = dmsetup_baseline(zero, owners)
    finally:
        zero.close()
    out.pop("diff_messages", None)
    out.pop("diff_one_page_messages", None)
    out["agent_messages"] = {"count": len(agent_messages), "bytes": sum(map(len, agent_messages))}
    return out


async def bench_diff(inst: Instrumented, wwid: str, repeat: int, moves: list[int]) -> dict:
    """Pages moved on the array, timed from the array's change (its generation bumped) to the
    agent's switch holding them (its last message sent); the time from the move request is kept too.

    Each move size's records, the messages of its last run (for the kernel-alone bound), and one
    summary line per size on stderr.
    """
    from tests.guest.agentlib import array

    out: dict = {}
    pages = inst.orch.luns[wwid].stack.page_map.total_pages
    for count in moves:
        key = DIFF_KEYS.get(count, f"diff_{count}")
        out[key] = []
        for i in range(repeat):
            t0 = time.perf_counter()
            moved = array("move", fraction=count / pages)
            t_moved = time.perf_counter()
            r = await inst.reconcile(wwid)
            # Routed once the switch took the last message; the reconcile then asks the paths whose
            # members it remembered (same sessions) again, off the move's path (agent.orchestrator).
            t1 = inst.routed_at
            # The array's own moment of change (the emulator's time.monotonic(): this guest's
            # CLOCK_MONOTONIC, as perf_counter), not the start of the request that asked for it.
            changed_at = array("info")["change_times"][-1]
            r.update(moved_pages=moved["moved_pages"], generation=moved["generation"],
                     change_to_routed_s=t1 - changed_at, request_to_routed_s=t1 - t0, array_move_s=t_moved - t0,
                     array_changed_after_s=changed_at - t0,
                     agent_generation=inst.orch.luns[wwid].stack.page_map.generation)
            log(f"diff {count} {i + 1}/{repeat}: {moved['moved_pages']} pages moved, routed after "
                f"{r['change_to_routed_s']:.3f} s ({r['request_to_routed_s']:.3f} s after the move request; "
                f"array's move {r['array_move_s']:.3f} s, changed at {r['array_changed_after_s']:.3f} s; reconcile "
                f"{r['reconcile_s']:.3f} s: {r['reconcile_parts_s']}; changes-since {r['changes_since']}; "
                f"{r['messages']} messages, {r['message_bytes']} bytes)")
            out[key].append(r)
            out[f"{key}_messages"] = inst.messages
    for count in moves:
        records = out[DIFF_KEYS.get(count, f"diff_{count}")]
        times = sorted(r["change_to_routed_s"] for r in records)
        goal = {1000: " (goal <= 0.25 s)", 1: " (goal <= 0.1 s)"}.get(count, "")
        log(f"SUMMARY move of {count:,} page(s): array change -> routed median {times[len(times) // 2]:.3f} s"
            f"{goal}, min {times[0]:.3f} s, max {times[-1]:.3f} s over {len(times)}; reconcile median "
            f"{sorted(r['reconcile_s'] for r in records)[len(records) // 2]:.3f} s")
    return out


def kernel_bounds_diff(zero: ZeroSwitch, messages: list[str], repeat: int) -> dict:
    samples = []
    for _ in range(repeat):
        zero.reset()
        samples.append(zero.send_raw(messages))
    return {"messages_s": scale_lib.summary(samples),
            "messages": {"count": len(messages), "bytes": sum(map(len, messages))}}


def kernel_bounds(zero: ZeroSwitch, agent_messages: list[str], owners: np.ndarray, repeat: int,
                  diff_messages: list[str] | None) -> dict:
    res: dict = {}
    times = []
    for _ in range(repeat):
        zero.reset()
        times.append(zero.send_raw(agent_messages))
    res["agent_messages_s"] = scale_lib.summary(times)
    # The same map in fewer, bigger messages, up to what the kernel accepts.
    rr = dmswitch_encoder.round_robin(owners.size, zero.paths)
    tried = []
    # The encoder caps a message at 64k tokens (MAX_MESSAGE_TOKENS); the last try lifts the cap
    # to find what the kernel itself refuses (its argv array is one kmalloc).
    for limit, tokens in ((1 << 18, None), (1 << 20, None), (4 << 20, None), (4 << 20, 1 << 20)):
        saved = dmswitch_encoder.MAX_MESSAGE_TOKENS
        if tokens:
            dmswitch_encoder.MAX_MESSAGE_TOKENS = tokens
        try:
            messages = dmswitch_encoder.encode_region_mappings(owners, previous=rr, max_message_bytes=limit)
        finally:
            dmswitch_encoder.MAX_MESSAGE_TOKENS = saved
        entry = {"limit": limit, "tokens": tokens or saved, "messages": len(messages),
                 "bytes": sum(map(len, messages)), "max_tokens": max(len(m.split()) for m in messages)}
        samples = []
        try:
            for _ in range(repeat):
                zero.reset()
                samples.append(zero.send_raw(messages))
            entry["s"] = scale_lib.summary(samples)
        except OSError as exc:
            entry["error"] = f"{exc.__class__.__name__}: {exc}"
        tried.append(entry)
    res["bigger_messages"] = tried
    if diff_messages:
        samples = []
        for _ in range(repeat):
            zero.reset()
            samples.append(zero.send_raw(diff_messages))
        res["diff_messages_s"] = scale_lib.summary(samples)
        res["diff_messages"] = {"count": len(diff_messages), "bytes": sum(map(len, diff_messages))}
    return res


def encode_costs(owners: np.ndarray, paths: int, repeat: int, limit: int) -> dict:
    """The agent's encoder alone on the install's map, and its runs-only plan (no match search) for scale."""
    rr = dmswitch_encoder.round_robin(owners.size, paths)
    res = {}
    prof = cProfile.Profile()
    prof.enable()
    dmswitch_encoder.encode_region_mappings(owners, previous=rr, max_message_bytes=limit)
    prof.disable()
    res["profile"] = profile_text(prof, RESULTS / "bench-encode.prof")
    # The runs-only plan is the Python core's with its match search switched off (the compiled core has no switch).
    for label, core in (("agent", None), ("runs_only", "python")):
        saved = dmswitch_encoder.lz_plan
        if label == "runs_only":
            dmswitch_encoder.lz_plan = lambda *a, **k: None
        try:
            samples = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                messages = dmswitch_encoder.encode_region_mappings(owners, previous=rr, max_message_bytes=limit,
                                                                   core=core)
                samples.append(time.perf_counter() - t0)
        finally:
            dmswitch_encoder.lz_plan = saved
        res[label] = {"s": scale_lib.summary(samples), "messages": len(messages),
                      "bytes": sum(map(len, messages))}
    return res


def dmsetup_baseline(zero: ZeroSwitch, owners: np.ndarray) -> dict:
    count, nbytes = scale_lib.naive_message_count(owners)
    sample = scale_lib.naive_messages(owners, max_messages=DMSETUP_SAMPLE)
    dmsetup = shutil.which("dmsetup")
    zero.reset()
    t0 = time.perf_counter()
    for m in sample:
        subprocess.run([dmsetup, "message", zero.name, "0", m], check=True, capture_output=True, timeout=120)
    elapsed = time.perf_counter() - t0
    # The raw-ioctl cost of the same sample: what is the process, what the kernel.
    zero.reset()
    raw = zero.send_raw(sample)
    return {"messages": count, "bytes": nbytes, "sample": len(sample), "sample_s": elapsed,
            "sample_raw_ioctl_s": raw, "extrapolated_s": elapsed / len(sample) * count}


class PySpy:
    """py-spy sampling this process (all threads, non-blocking, 100 Hz) until stop()."""

    def __init__(self, out: Path) -> None:
        self.out = out
        spy = scale_lib.py_spy()
        self.proc = None if spy is None else subprocess.Popen(
            [spy, "record", "--nonblocking", "-r", "100", "-f", "raw", "-o", str(out), "--pid", str(os.getpid())],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # It attaches within about a second: samples start then (the fetch comes first anyway).

    def stop(self) -> dict | None:
        if self.proc is None:
            return None
        self.proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            _, err = self.proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return {"error": "py-spy did not stop"}
        if not self.out.exists():
            return {"error": err.decode(errors="replace")[-500:]}
        return scale_lib.summarise_collapsed(self.out.read_text(), top=20)


def profile_text(prof: cProfile.Profile, path: Path, top: int = 25) -> str:
    prof.dump_stats(str(path))
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(top)
    text = buf.getvalue()
    (path.with_suffix(".txt")).write_text(text)
    return text


# -- main ---------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.guest_scale", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--only", default="fetch,install,diff")
    p.add_argument("--moves", default="1000,1", help="page counts the diff part moves, comma-separated")
    p.add_argument("--out", type=Path, default=RESULTS / "bench-scale.json")
    args = p.parse_args(argv)
    only = set(args.only.split(","))
    config = Config(log_level="warning")
    result: dict = {"rig": {k: os.environ.get(k) for k in ("SWITCH_AGENT_MEMBERS", "SWITCH_AGENT_LAYOUT",
                                                            "SWITCH_AGENT_SIZE", "SWITCH_AGENT_PAGE_SIZE")},
                    "kernel_release": os.uname().release, "cpus": os.cpu_count(),
                    "max_message_bytes": config.max_message_bytes}
    if "fetch" in only:
        log("fetch")
        result["fetch"] = asyncio.run(bench_fetch(config, wwid_and_paths()[1], args.repeat))
    if only & {"install", "diff"}:
        log("install" if "install" in only else "diff")
        moves = [int(m) for m in args.moves.split(",") if m]
        result.update(asyncio.run(bench_install_and_diff(config, args.repeat, only, moves)))
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
