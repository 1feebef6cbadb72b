"""Benchmark: decoding a GET PAGE MAP response into an owner array, CRC checked.

Run: ``python -m tests.bench.pagemap_decode [--repeat N]``. Prints a table;
asserts nothing. The map is the seed thread's volume: 1,572,864 pages over
3 members (2 bits per entry), in one response and in 64 KiB chunks (a path
with a small max_sectors_kb), through the same PageMapAssembler the agent
uses.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from protocol import pagemap as pm
from tests.bench import maps

MEMBERS = tuple(pm.Member(100 + k, f"member-{k}") for k in range(3))


def responses(owners: np.ndarray, allocation: int) -> list[bytes]:
    out, start = [], 0
    while start < owners.size:
        data = pm.encode_page_map_response(owners, generation=1, page_size_sectors=30720, members=MEMBERS,
                                           start_page=start, allocation_length=allocation)
        out.append(data)
        start += pm.decode_page_map_header(data).entry_count
    return out


def decode_all(chunks: list[bytes]) -> np.ndarray:
    assembler = pm.PageMapAssembler()
    for data in chunks:
        assembler.add(pm.decode_page_map_response(data))
    return assembler.result().owners


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    owners = maps.seed_map(np.random.default_rng(2012)).astype(np.int16)
    print("| case | pages | responses | bytes | min ms | median ms | goal |")
    print("|---|---|---|---|---|---|---|")
    for label, allocation in (("one response", pm.MAX_ALLOCATION_LENGTH), ("64 KiB chunks", 64 << 10)):
        chunks = responses(owners, allocation)
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            decoded = decode_all(chunks)
            times.append((time.perf_counter() - t0) * 1000)
        assert np.array_equal(decoded, owners)
        print(f"| seed map, 2 bits/entry, {label} | {owners.size:,} | {len(chunks)} | "
              f"{sum(map(len, chunks)):,} | {min(times):.1f} | {statistics.median(times):.1f} | <= 50 ms |")


if __name__ == "__main__":
    main()
