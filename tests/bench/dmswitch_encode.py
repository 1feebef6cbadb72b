"""Benchmark: set_region_mappings encoder size and speed against the per-run baseline.

Run: ``python -m tests.bench.dmswitch_encode [--repeat N]``. Prints a table;
asserts nothing. "per-run" is the naive encoding of the whole allocated map:
``idx:path`` at every run start plus ``R1,<len-1>`` for longer runs, cut
into messages under the same limit. Every encoding is decoded with the
oracle (protocol.dmswitch_oracle.apply_region_mappings) and checked. Times
are the production (compiled) core's; the pure-Python core's median is the
baseline beside it, and both cores' messages must be the same bytes.
:func:`encoder_goal` is the goal row (issue #19: the seed map on one core
in <= 30 ms) that tests/bench/scale.py puts in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time
from collections.abc import Iterator

import numpy as np

from protocol.dmswitch_encoder import encode_region_mappings, round_robin
from protocol.dmswitch_oracle import apply_region_mappings
from protocol.dmtable import MESSAGE_NAME
from tests.bench import maps

LIMIT = 65536
PREFIX = len(MESSAGE_NAME) + 1


def per_run_bytes(regions: np.ndarray, limit: int = LIMIT) -> int:
    """Bytes of the per-run baseline for the allocated regions, messages included."""
    r = np.asarray(regions, dtype=np.int64)
    n = len(r)
    alloc = r >= 0
    brk = np.ones(n, dtype=bool)
    brk[1:] = (r[1:] != r[:-1]) | ~alloc[:-1]
    starts = np.flatnonzero(brk & alloc)
    ends = np.append(starts[1:], n)
    # A run ends at the next run start or the first hole, whichever is first.
    hole_after = np.minimum.accumulate(np.where(~alloc, np.arange(n), n)[::-1])[::-1]
    ends = np.minimum(ends, hole_after[starts])
    lens = ends - starts
    hexlen = np.vectorize(lambda v: len(f"{v:x}"))
    head = hexlen(starts) + 1 + hexlen(r[starts]) + 1
    rep = np.where(lens > 1, 3 + hexlen(np.maximum(lens - 1, 1)) + 1, 0)
    unit = head + rep  # a run's tokens travel together: R1 must follow its idx:path
    total, used = 0, 0
    for u in unit.tolist():
        if used and used + u - 1 > limit - PREFIX:
            total += PREFIX + used - 1
            used = 0
        used += u
    return total + (PREFIX + used - 1 if used else 0)


def verify(messages: list[str], regions: np.ndarray, start: np.ndarray, nr_paths: int) -> bool:
    table = start.astype(np.int64).copy()
    for m in messages:
        apply_region_mappings(table, m, nr_paths)
    alloc = regions >= 0
    return bool(np.array_equal(table[alloc], regions[alloc]))


def timed(fn, repeat: int) -> tuple[object, list[float]]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, times


def scenarios():
    """(name, regions, previous, kernel table before, nr_paths, goal) for each case."""
    seed = maps.seed_map(np.random.default_rng(2012))
    n = len(seed)
    rr = round_robin(n, 3)
    garbage = np.random.default_rng(99).integers(0, 3, n)
    stripe5 = maps.move_pages(maps.striped(n, 3), 0.05, 3, np.random.default_rng(5))
    moved = maps.move_pages(seed, 0.0, 3, np.random.default_rng(6), count=1000)
    holes = maps.with_holes(seed, 0.2, np.random.default_rng(7), mean_hole=32.0)
    wide = maps.move_pages(maps.striped(n, 3, 64), 0.05, 3, np.random.default_rng(8))
    return [
        ("seed map, unknown table", seed, None, garbage, 3, "<= 0.35x, <= 0.5 s"),
        ("seed map, after table load (round-robin)", seed, rr, rr, 3, ""),
        ("seed map, 20% don't-care, unknown table", holes, None, garbage, 3, ""),
        ("striped/3, 5% moved, unknown table", stripe5, None, garbage, 3, "<= 0.09x"),
        ("striped/3, 5% moved, round-robin table", stripe5, rr, rr, 3, "<= 0.05x"),
        ("stripes 64 pages wide/3, 5% moved, unknown", wide, None, garbage, 3, ""),
        ("seed map, 1000 pages moved, previous map", moved, seed, seed, 3, "<= 12 KiB, <= 50 ms"),
    ]


@contextlib.contextmanager
def one_core() -> Iterator[int | None]:
    """Pin this process to one CPU (the last it may use) while timing; yields it (None where unsupported)."""
    if not hasattr(os, "sched_setaffinity"):
        yield None
        return
    before = os.sched_getaffinity(0)
    cpu = max(before)
    os.sched_setaffinity(0, {cpu})
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, before)


def encoder_goal(repeat: int = 11) -> dict:
    """The seed map encoded on one core by each core: times, sizes, and whether the bytes are the same.

    From the int8 array the agent holds, into the table load's unknown table
    (previous=None, every region written), at the agent's 64 KiB limit.
    """
    seed = maps.seed_map(np.random.default_rng(2012))
    out: dict = {"regions": int(seed.size), "repeat": repeat}
    with one_core() as cpu:
        out["cpu"] = cpu
        out["load_avg"] = list(os.getloadavg())
        for core in ("compiled", "python"):
            encode_region_mappings(seed, max_message_bytes=LIMIT, core=core)  # warm: caches, first-touch pages
            cpu_times: list[float] = []

            def once(core: str = core) -> list[str]:
                c0 = time.thread_time()
                msgs = encode_region_mappings(seed, max_message_bytes=LIMIT, core=core)
                cpu_times.append(time.thread_time() - c0)
                return msgs

            msgs, times = timed(once, repeat)
            out[core] = {"s": {"min": min(times), "median": statistics.median(times), "max": max(times)},
                         # CPU time of the encoding thread: what other work on a shared core cannot inflate
                         "cpu_s": {"min": min(cpu_times), "median": statistics.median(cpu_times)},
                         "messages": len(msgs), "bytes": sum(len(m) for m in msgs)}
            out[core]["text"] = msgs
    out["identical"] = out["compiled"].pop("text") == out["python"].pop("text")
    out["per_run_bytes"] = per_run_bytes(seed)
    compiled = encode_region_mappings(seed, max_message_bytes=LIMIT)
    out["oracle_ok"] = verify(compiled, seed, np.random.default_rng(99).integers(0, 3, seed.size), 3)
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{cpu}; {os.cpu_count()} cores (load avg {load}); Python {platform.python_version()}, "
            f"numpy {np.__version__}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7, help="timed runs per case (min and median shown)")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    print(f"max_message_bytes={LIMIT}; times are min / median of {args.repeat} runs, one thread\n")
    head = ("case", "regions", "runs", "per-run B", "encoded B", "ratio", "msgs", "min ms", "med ms", "ok",
            "python med ms", "same bytes", "goal")
    rows = []
    for name, regions, previous, before, nr_paths, goal in scenarios():
        msgs, times = timed(lambda: encode_region_mappings(regions, previous=previous,
                                                              max_message_bytes=LIMIT), args.repeat)
        py_msgs, py_times = timed(lambda: encode_region_mappings(regions, previous=previous, max_message_bytes=LIMIT,
                                                                 core="python"), args.repeat)
        size = sum(len(m) for m in msgs)
        base = per_run_bytes(regions)
        alloc = regions[regions >= 0]
        runs = 1 + int(np.count_nonzero(alloc[1:] != alloc[:-1])) if len(alloc) else 0
        ok = verify(msgs, regions, before, nr_paths)
        rows.append((name, f"{len(regions):,}", f"{runs:,}", f"{base:,}", f"{size:,}", f"{size / base:.4f}x",
                     str(len(msgs)), f"{min(times) * 1e3:.1f}", f"{statistics.median(times) * 1e3:.1f}",
                     "yes" if ok else "NO", f"{statistics.median(py_times) * 1e3:.1f}",
                     "yes" if py_msgs == msgs else "NO", goal))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
    g = encoder_goal(max(args.repeat, 5))
    c, p = g["compiled"], g["python"]
    print(f"\nseed map on one core (CPU {g['cpu']}): compiled {c['s']['median'] * 1e3:.1f} ms median "
          f"(min {c['s']['min'] * 1e3:.1f}, CPU time median {c['cpu_s']['median'] * 1e3:.1f}), "
          f"python {p['s']['median'] * 1e3:.1f} ms, "
          f"ratio {c['s']['median'] / p['s']['median']:.3f}x; {c['bytes']:,} bytes = "
          f"{c['bytes'] / g['per_run_bytes']:.4f}x per-run; same bytes: {g['identical']}; oracle: {g['oracle_ok']}")


if __name__ == "__main__":
    main()
