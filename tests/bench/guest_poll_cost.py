"""What one generation poll costs in CPU, layer by layer, on a real path in the guest.

    python -m tests.vm.run --members 3 -- python -m tests.bench.guest_poll_cost [--count N]

Run in the VM rig with the array up and logged in (the rig's default). Takes
the first path of the first multipathd map and times, in this process's CPU
(time.process_time, all threads) and wall clock, N repetitions of: the poll as
the daemon's round runs it (every poll in one worker thread, blocking there),
the same poll through ScsiDevice.execute (a hop to a worker and back per
command), a bare hop to a worker, the SG_IO ioctl alone, the header decode,
the node check open_path does and one DM_LIST_DEVICES. Prints a table and
writes <results>/bench-poll-cost.json. Asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import sys
import time
from typing import Callable

from agent import mapsources
from agent.config import Config
from agent.kernel import sgio
from agent.mapsources.pagemap import poll_map_header
from agent.health import poll_round
from agent.system import RealSystem
from protocol import pagemap
from tests.guest import agentlib


async def measure(count: int) -> dict[str, dict[str, float]]:
    system = RealSystem(Config())
    maps = await system.find_mpath_maps()
    if not maps:
        raise SystemExit("guest_poll_cost: no multipath map (is the rig logged in?)")
    device = maps[0].slaves[0][0]
    path = system.open_path(device)
    await poll_map_header(path)  # the device's limits read and cached before timing
    loop = asyncio.get_running_loop()
    hop = concurrent.futures.ThreadPoolExecutor(1)
    size = pagemap.HEADER_FIXED_BYTES
    cdb = pagemap.build_get_page_map_cdb(0, size)
    data = sgio.sg_io(path.fileno(), cdb, device=device, data_in_length=size).data_in
    rows: dict[str, dict[str, float]] = {}

    async def timed(name: str, run: Callable, n: int = count) -> None:
        cpu, wall = time.process_time(), time.monotonic()
        await run(n)
        rows[name] = {"cpu_ms": 1000 * (time.process_time() - cpu) / n,
                      "wall_ms": 1000 * (time.monotonic() - wall) / n, "n": n}

    async def round_in_one_thread(n: int) -> None:
        work = [(str(i), mapsources.get("page-map"), [path.blocking()]) for i in range(n)]
        answers = await loop.run_in_executor(hop, asyncio.run, poll_round(work))
        assert None not in answers.values(), "a poll failed"

    async def hop_per_command(n: int) -> None:
        for _ in range(n):
            await poll_map_header(path)

    async def bare_hop(n: int) -> None:
        for _ in range(n):
            await loop.run_in_executor(hop, int)

    async def ioctl_only(n: int) -> None:
        for _ in range(n):
            sgio.sg_io(path.fileno(), cdb, device=device, data_in_length=size)

    async def decode(n: int) -> None:
        for _ in range(n):
            pagemap.decode_page_map_header(data)

    async def node_check(n: int) -> None:
        for _ in range(n):
            system.open_path(device)

    async def list_devices(n: int) -> None:
        for _ in range(n):
            system.dm.list_devices()

    await timed("poll, daemon's round (one thread, blocking)", round_in_one_thread)
    await timed("poll, a worker hop per command", hop_per_command)
    await timed("bare hop to a worker and back", bare_hop)
    await timed("SG_IO ioctl alone (sg_io on this thread)", ioctl_only)
    await timed("header decode (both checks)", decode)
    await timed("open_path of a cached path (node check)", node_check)
    await timed(f"DM_LIST_DEVICES ({len(system.dm.list_devices())} devices, unchanged)", list_devices,
                max(1, count // 10))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.guest_poll_cost")
    p.add_argument("--count", type=int, default=300)
    args = p.parse_args(argv)
    rows = asyncio.run(measure(args.count))
    print(f"| what (per operation, {args.count} times) | CPU ms | wall ms |\n|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['cpu_ms']:.3f} | {row['wall_ms']:.3f} |")
    (agentlib.RESULTS / "bench-poll-cost.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
