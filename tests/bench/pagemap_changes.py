"""Benchmark: a page move through the agent's path, changes-since answer against the whole map.

Run: ``python -m tests.bench.pagemap_changes [--repeat N]``. Prints a table;
asserts nothing. The map is the seed thread's volume (1,572,864 pages over
3 members, ``default_rng(2012)``); the array moves 1,000 pages or 1 page to
another member. Timed, per row, from the answer's bytes to the messages for
the switch, each part as the agent runs it:

- changes: decode the changes-since answer, apply it to a copy of the held
  map (protocol.pagemap_changes.ChangesAssembler), choose the regions to
  write (agent.apply._changed_regions), encode them (dmswitch_changes);
- whole map (before 1.2): decode the whole map (PageMapAssembler), diff it
  against what the switch holds (dmswitch_encoder with ``previous``), and
  compare the maps for the moved-pages record (agent.lun.pages_moved).

Each row's messages are checked with the oracle (apply_region_mappings).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import numpy as np

from agent.apply import _changed_regions
from agent.lun import RoutedStack, pages_moved
from protocol import dmswitch_changes, dmswitch_encoder
from protocol import pagemap as pm
from protocol import pagemap_changes as pc
from protocol.dmswitch_oracle import apply_region_mappings
from tests.bench import maps

MEMBERS = tuple(pm.Member(100 + k, f"member-{k}") for k in range(3))
PAGE_SECTORS = 30720
ALLOCATION = 1 << 20
MESSAGE_BYTES = 65536


def moved(owners: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    out = owners.copy()
    pages = rng.choice(owners.size, size=count, replace=False)
    out[pages] = (out[pages] + rng.integers(1, 3, size=count)) % 3
    return out


def timed(repeat: int, step: Callable[[], object]) -> tuple[list[float], object]:
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = step()
        times.append((time.perf_counter() - t0) * 1000)
    return times, result


def changes_path(held: pm.PageMap, stack: RoutedStack, answer: bytes) -> list[str]:
    assembler = pc.ChangesAssembler(held)
    assembler.add(pc.decode_changes_response(answer))
    new = assembler.result()
    regions = _changed_regions(stack, new)
    assert regions is not None
    return dmswitch_changes.encode_changed_regions(regions, new.owners[regions], nr_regions=new.total_pages,
                                                   max_message_bytes=MESSAGE_BYTES)


def whole_map_path(held: pm.PageMap, stack: RoutedStack, chunks: list[bytes]) -> list[str]:
    assembler = pm.PageMapAssembler()
    for data in chunks:
        assembler.add(pm.decode_page_map_response(data))
    new = assembler.result()
    pages_moved(held, new)
    return dmswitch_encoder.encode_region_mappings(new.owners, previous=stack.kernel_map,
                                                   max_message_bytes=MESSAGE_BYTES)


def whole_map_chunks(owners: np.ndarray, generation: int) -> list[bytes]:
    out, start = [], 0
    while start < owners.size:
        data = pm.encode_page_map_response(owners, generation=generation, page_size_sectors=PAGE_SECTORS,
                                           members=MEMBERS, start_page=start, allocation_length=ALLOCATION)
        out.append(data)
        start += pm.decode_page_map_header(data).entry_count
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(2012)
    owners = maps.seed_map(rng).astype(pm.owners_dtype(3))
    owners.flags.writeable = False
    held = pm.PageMap(1, PAGE_SECTORS, MEMBERS, owners)
    stack = RoutedStack(None, owners, held, 0.0)  # type: ignore[arg-type]  # no plan needed here
    print("| moved pages | path | answer bytes | messages | message bytes | min ms | median ms | goal |")
    print("|---|---|---|---|---|---|---|---|")
    for count in (1000, 1):
        after = moved(owners, count, rng)
        pages = np.flatnonzero(after != owners)
        answer = pc.encode_changes_response(
            status=pc.ChangesStatus.CHANGES, current_generation=2, total_pages=owners.size,
            page_size_sectors=PAGE_SECTORS, members=MEMBERS, allocation_length=ALLOCATION,
            from_generation=1, to_generation=2, pages=pages, owners=after[pages])
        chunks = whole_map_chunks(after, 2)
        for label, step, size in (
                ("changes since", lambda: changes_path(held, stack, answer), len(answer)),
                ("whole map (1.1)", lambda: whole_map_path(held, stack, chunks), sum(map(len, chunks)))):
            times, messages = timed(args.repeat, step)
            assert isinstance(messages, list)
            table = owners.astype(np.int64)
            for message in messages:
                apply_region_mappings(table, message, 3)
            assert np.array_equal(table, after), label
            goal = "O(changes)" if label == "changes since" else "-"
            print(f"| {count:,} | {label} | {size:,} | {len(messages)} | {sum(map(len, messages)):,} | "
                  f"{min(times):.2f} | {statistics.median(times):.2f} | {goal} |")


if __name__ == "__main__":
    main()
