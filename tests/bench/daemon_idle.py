"""The real Daemon + Orchestrator over the unit-test fakes with many LUNs: what a poll round and an install cost.

    .venv/bin/python -m tests.bench.daemon_idle [--luns 64] [--members 3] [--pages 100000] [--rounds 5]
                                                [--udev-wait S] [--profile] [--memory]

Host-side stand-in for the guest's many-LUN run (tests/bench/guest_many_luns.py):
64 LUNs x 3 members (one path each) x 100,000 pages of 1 MiB, seed layout,
behind one FakeDeviceMapper. The daemon's poll sleep is a gate, so each round
is run on demand and measured alone: process CPU seconds per round (the
fakes' own work included: the emulator answering SCSI, the fake dm), and the
calls the round made into the kernel layers. `--profile` adds cProfile over
the rounds; `--memory` traces the install with tracemalloc (peak above what
the emulated arrays hold before the daemon starts, and what stays per LUN).
Prints numbers; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import tempfile
import time
import tracemalloc
from pathlib import Path

from agent.config import Config
from agent.daemon import Daemon
from tests.unit.fakes_kernel import ManyLunSystem

POLL_S = 1000.0  # the gate's marker: no other sleep in the daemon asks for this


class Counting:
    """Counts calls of chosen methods of an object (the fake dm)."""

    def __init__(self, target, names):
        self.counts = dict.fromkeys(names, 0)
        for name in names:
            original = getattr(target, name)

            def wrapper(*args, _name=name, _original=original, **kwargs):
                self.counts[_name] += 1
                return _original(*args, **kwargs)
            setattr(target, name, wrapper)


class PollGate:
    """The daemon's sleep: the poll interval waits for a token, every other sleep is real."""

    def __init__(self) -> None:
        self.tokens: asyncio.Queue[None] = asyncio.Queue()
        self.parked = 0

    async def sleep(self, seconds: float) -> None:
        if seconds != POLL_S:
            await asyncio.sleep(seconds)
            return
        self.parked += 1
        await self.tokens.get()


async def until(condition, *, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met before the deadline")
        await asyncio.sleep(0.005)


async def bench(args, tmp: Path) -> None:
    system = ManyLunSystem(args.luns, tmp_path=tmp, size_bytes=args.pages << 20, page_size_bytes=1 << 20,
                           members=args.members, layout="seed", paths_per_member=args.paths_per_member)
    if args.udev_wait:
        resume = system.dm.device_resume

        def resume_then_wait_for_udev(name, *, wait_for_udev=True, **kwargs):
            resume(name, wait_for_udev=wait_for_udev, **kwargs)
            if wait_for_udev:  # blocks its thread, as DeviceMapper's udev cookie wait does
                time.sleep(args.udev_wait)
        system.dm.device_resume = resume_then_wait_for_udev
    dm_calls = Counting(system.dm, ("list_devices", "table_status", "target_message", "device_resume"))
    cfg = Config(socket_path=tmp / "control.sock", poll_interval_s=POLL_S, debounce_s=0.01,
                 retry_initial_s=0.05, retry_max_s=0.5, max_parallel_luns=args.parallel)
    gate = PollGate()
    daemon = Daemon(cfg, system, None, sleep=gate.sleep)
    healing = 0
    heal_paths = daemon.orchestrator.heal_paths

    async def counted_heal(*args):
        nonlocal healing
        healing += 1
        try:
            return await heal_paths(*args)
        finally:
            healing -= 1
    daemon.orchestrator.heal_paths = counted_heal

    if args.memory:
        tracemalloc.start(1)  # one frame: deeper tracebacks make the install ~40x slower
        baseline = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
    t0, c0 = time.monotonic(), time.process_time()
    task = asyncio.create_task(daemon.run())
    luns = daemon.orchestrator.luns
    await until(lambda: len(luns) == args.luns and all(lun.state == "routed" for lun in luns.values())
                and gate.parked == 1)
    print(f"install: {args.luns} LUNs x {args.members} members x {args.pages:,} pages routed in "
          f"{time.monotonic() - t0:.2f} s wall, {time.process_time() - c0:.2f} s CPU "
          f"(max_parallel_luns {args.parallel}); process {vm_status()} (the fakes' arrays included)")
    if args.memory:
        current, peak = tracemalloc.get_traced_memory()
        snapshot = tracemalloc.take_snapshot()
        tracemalloc.stop()
        fake_kernel = sum(d.regions.nbytes for d in system.dm.devices.values() if d.regions is not None)
        print(f"memory: traced from the daemon's start (the emulated arrays made before are not counted): "
              f"peak {(peak - baseline) / 2**20:.1f} MiB, held after install {(current - baseline) / 2**20:.1f} "
              f"MiB, of which the fake kernel's switch tables {fake_kernel / 2**20:.1f} MiB")
        print_memory(snapshot, daemon, args)

    def idle() -> bool:
        return gate.parked == rounds_done + 1 and not daemon.scheduler._healing and healing == 0 \
            and not daemon.scheduler._pending

    profiler = cProfile.Profile() if args.profile else None
    scsi0 = sum(p.commands for s in system.systems for p in s.paths.values())
    calls0 = dict(dm_calls.counts)
    per_round = []
    rounds_done = 0
    for _ in range(args.rounds):
        c0, w0 = time.process_time(), time.monotonic()
        if profiler:
            profiler.enable()
        gate.tokens.put_nowait(None)
        rounds_done += 1
        await until(idle)
        if profiler:
            profiler.disable()
        per_round.append((time.process_time() - c0, time.monotonic() - w0))
    scsi = sum(p.commands for s in system.systems for p in s.paths.values()) - scsi0
    calls = {k: (v - calls0[k]) / args.rounds for k, v in dm_calls.counts.items()}
    first, steady = per_round[0][0], sorted(c for c, _ in per_round[1:]) or [per_round[0][0]]
    median = steady[len(steady) // 2]
    print(f"poll round over {args.luns} routed LUNs: first round CPU {1000 * first:.1f} ms; then median "
          f"{1000 * median:.1f} ms (min {1000 * steady[0]:.1f}, max {1000 * steady[-1]:.1f}) over "
          f"{len(steady)} rounds; all rounds' wall mean "
          f"{1000 * sum(w for _, w in per_round) / len(per_round):.1f} ms")
    print(f"calls per round (mean of {args.rounds}): {scsi / args.rounds:.0f} SCSI commands, "
          + ", ".join(f"{v:.1f} {k}" for k, v in calls.items()))
    print(f"steady rounds at poll_interval_s 15: {100 * median / 15:.3f} % of a core on this host "
          "(the fakes' own work included)")
    if profiler:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(25)
        print(out.getvalue())
    daemon.stop()
    await task


def print_memory(snapshot, daemon, args) -> None:
    stats = snapshot.filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)]).statistics("lineno")
    print("  largest still held (by line):")
    for stat in stats[:8]:
        frame = stat.traceback[0]
        print(f"    {stat.size / 2**20:8.2f} MiB  {stat.count:6d} blocks  {frame.filename}:{frame.lineno}")
    held: dict[str, int] = {}
    seen: set[int] = set()
    for lun in daemon.orchestrator.luns.values():
        stack = lun.stack
        if stack is None:
            continue
        for name, array in (("page_map.owners", stack.page_map.owners), ("kernel_map", stack.kernel_map)):
            key = f"{name} ({array.dtype})"
            address = array.__array_interface__["data"][0]
            if address in seen:  # shared with an array counted already
                key += ", shared"
            seen.add(address)
            held[key] = held.get(key, 0) + (0 if key.endswith("shared") else array.nbytes)
    for name, size in held.items():
        print(f"  per-LUN arrays, all LUNs: {name}: {size / 2**20:.2f} MiB")


def vm_status() -> str:
    """This process's VmHWM and VmRSS as /proc says."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return ", ".join(f"{key} {int(fields[key].split()[0]) / 1024:.1f} MiB" for key in ("VmHWM", "VmRSS"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--luns", type=int, default=64)
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--paths-per-member", type=int, default=1)
    p.add_argument("--pages", type=int, default=100_000)
    p.add_argument("--parallel", type=int, default=Config().max_parallel_luns)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--udev-wait", type=float, default=0.0, metavar="S",
                   help="each resume that waits for udev (a new top device) blocks its thread S seconds")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--memory", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="daemon-idle-") as tmp:
        asyncio.run(bench(args, Path(tmp)))


if __name__ == "__main__":
    main()
