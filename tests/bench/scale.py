"""Benchmark at the seed's scale and with many LUNs, in the VM rig: one command on the host.

    .venv/bin/python -m tests.bench.scale [--repeat N] [--luns N] [--idle-window S] [--skip-host] [--skip-seed] [--skip-luns]
        [--results DIR] [--no-docs] [--from-json FILE ...]

First times the dm-switch encoder on the host itself, one core, compiled
core against the Python one (tests/bench/dmswitch_encode.py encoder_goal).
Then boots the rig (tests/vm/run.py) once for the seed's LUN (22.5 TiB at 15 MiB
pages, 3 members, seed layout) and runs `python -m tests.bench.guest_scale`
in it; then once with many LUNs (`--luns`, 3 members, 100k pages each) and
`python -m tests.bench.guest_many_luns`. Reads each part's JSON from the
shared results directory, prints one table and rewrites its own section of
docs/benchmarks.md (between the scale-bench markers; other sections are left
alone). `--from-json` renders saved JSON files instead of booting.

Needs `sh tests/vm/setup.sh` once. Asserts nothing: a benchmark records.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.bench import scale_lib

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "benchmarks.md"
RECORDS = Path(__file__).resolve().parent / "records"
SEED_PAGES = 1_572_864
PAGE = 15 << 20


def rig(results: Path, rig_args: list[str], command: list[str], timeout: int) -> int:
    argv = [sys.executable, "-m", "tests.vm.run", *rig_args, "--results", str(results),
            "--timeout", str(timeout), "--", *command]
    print("scale: " + shlex.join(argv), flush=True)
    return subprocess.run(argv, cwd=REPO).returncode


def seed_command(repeat: int) -> tuple[list[str], list[str]]:
    rig_args = ["--members", "3", "--layout", "seed", "--size", str(SEED_PAGES * PAGE), "--page-size", "15M"]
    return rig_args, ["python", "-m", "tests.bench.guest_scale", "--repeat", str(repeat)]


def luns_command(luns: int, pages: int, idle_window: float) -> tuple[list[str], list[str]]:
    # Guest memory: 3G held 64 LUNs; 128 add 192 more TCMU rings, SCSI disks and their multipathd paths.
    memory = "3G" if luns <= 64 else "5G"
    rig_args = ["--members", "3", "--layout", "seed", "--luns", str(luns), "--size", str(pages * (1 << 20)),
                "--page-size", "1M", "--no-login", "--memory", memory, "--array-timeout", str(max(900, 12 * luns))]
    return rig_args, ["python", "-m", "tests.bench.guest_many_luns", "--idle-window", str(idle_window)]


def section(results: dict, commands: list[str], machine: str, compare: list[dict] | None = None,
            options: str = "") -> str:
    rows = scale_lib.build_rows(results)
    for earlier in compare or []:
        rows.extend(scale_lib.many_rows(earlier["many_luns"]))
    out = ["Produced by one command on the host (boots the VM rig once per part):", "",
           f"    .venv/bin/python -m tests.bench.scale{options}", "",
           "which runs, for each part:", ""]
    out += [f"    {c}" for c in commands]
    out += ["", machine, "", scale_lib.render_table(rows), ""]
    spy = results.get("install_pyspy")
    if spy and spy.get("samples"):
        out += [f"py-spy over one more install of the seed map (all threads, {spy['samples']} samples "
                "at 100 Hz, idle waits included):", "",
                "| innermost frame | samples | | on the stack | samples |", "|---|---|---|---|---|"]
        agent_frames = [kv for kv in spy["on_stack"] if "agent/" in kv[0] or "protocol/" in kv[0]]
        for (f1, n1), (f2, n2) in zip(spy["innermost"][:10], agent_frames[:10]):
            out.append(f"| `{f1}` | {n1} | | `{f2}` | {n2} |")
        out.append("")
    prof = results.get("profile_summary")
    if prof:
        out += ["The agent's encoder alone on the same map (cProfile, cumulative):", "", "```", prof, "```", ""]
    many = results.get("many_luns") or {}
    if many.get("rss_by_mapping"):
        start = many.get("start_rss_by_mapping") or {}
        out += ["The daemon's resident memory by mapping (/proc/<pid>/smaps Rss), before any LUN and at the "
                "end of the many-LUN part:", "", "| mapping | before any LUN | at the end |", "|---|---|---|"]
        for kind, size in many["rss_by_mapping"].items():
            before = f"{start[kind] / (1 << 20):.1f} MiB" if kind in start else "-"
            out.append(f"| {kind} | {before} | {size / (1 << 20):.1f} MiB |")
        out.append("")
    idle = many.get("idle_profile")
    if idle and idle.get("samples"):
        out += [f"py-spy over the idle daemon ({idle['samples']} samples of the GIL's holder at 100 Hz over four times the "
                "idle window's length, after it):", "",
                "| innermost frame | samples | | on the stack | samples |", "|---|---|---|---|---|"]
        agent_frames = [kv for kv in idle["on_stack"] if "agent/" in kv[0] or "protocol/" in kv[0]]
        for (f1, n1), (f2, n2) in zip(idle["innermost"][:8], agent_frames[:8]):
            out.append(f"| `{f1}` | {n1} | | `{f2}` | {n2} |")
        out.append("")
    return "\n".join(out)


def profile_summary(text: str, keep: int = 18) -> str:
    """The header and the first rows of pstats' table, trimmed to the agent's and protocol's functions."""
    lines = text.splitlines()
    head = next((i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls")), None)
    if head is None:
        return ""
    body = [line for line in lines[head + 1:] if line.strip()]
    picked = [line for line in body if "/agent/" in line or "/protocol/" in line or "{" in line][:keep]
    return "\n".join([lines[head], *picked])


def host_part(results: Path, repeat: int) -> dict:
    """The encoder's goal row, measured here on the host; saved as bench-host.json for --from-json."""
    from tests.bench.dmswitch_encode import encoder_goal

    print(f"scale: timing the encoder on the host ({repeat} runs per core, one core)", flush=True)
    out = {"host_encoder": encoder_goal(repeat)}
    results.mkdir(parents=True, exist_ok=True)
    (results / "bench-host.json").write_text(json.dumps(out, indent=1))
    return out


def run_part(results: Path, rig_args: list[str], command: list[str], timeout: int, result_file: str) -> dict:
    """Boot the rig for one part; its JSON results, or {} (and why) when it wrote none."""
    results.mkdir(parents=True, exist_ok=True)
    rc = rig(results, rig_args, command, timeout)
    if (results / result_file).exists():
        return json.loads((results / result_file).read_text())
    print(f"scale: the {results.name} part wrote no results (rig exit {rc}); see {results}", flush=True)
    return {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.scale", description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--luns", type=int, default=128)
    p.add_argument("--idle-window", type=float, default=30.0,
                   help="seconds of idle polling measured after the storm (0: none, a shorter run)")
    p.add_argument("--compare", type=Path, nargs="*", default=[RECORDS / "luns64-2026-11-28.json"],
                   help="earlier many-LUN results shown beside this run's (default: the 64-LUN run of 2026-11-28)")
    p.add_argument("--lun-pages", type=int, default=100_000)
    p.add_argument("--skip-host", action="store_true", help="skip the host's encoder row")
    p.add_argument("--host-repeat", type=int, default=11, help="timed encodes per core for the host's encoder row")
    p.add_argument("--skip-seed", action="store_true")
    p.add_argument("--skip-luns", action="store_true")
    p.add_argument("--results", type=Path, default=None)
    p.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md alone")
    p.add_argument("--from-json", type=Path, nargs="*", default=None,
                   help="render these saved JSON files (bench-host.json, bench-scale.json, bench-luns.json) "
                        "instead of measuring")
    args = p.parse_args(argv)

    merged: dict = {}
    runs = {"seed": (seed_command(args.repeat), 1500, "bench-scale.json", args.skip_seed),
            "luns": (luns_command(args.luns, args.lun_pages, args.idle_window), 1200 + 20 * args.luns, "bench-luns.json", args.skip_luns)}
    reproduce = {key: shlex.join(["python", "-m", "tests.vm.run", *rig_args, "--", *command])
                 for key, ((rig_args, command), *_) in runs.items()}
    if args.from_json is not None:
        for path in args.from_json:
            merged.update(json.loads(path.read_text()))
        commands = list(reproduce.values())
    else:
        base = args.results or Path(tempfile.mkdtemp(prefix="switch-agent-bench-"))
        commands = []
        if not args.skip_host:
            merged.update(host_part(base / "host", args.host_repeat))
        for key, ((rig_args, command), timeout, result_file, skip) in runs.items():
            if not skip:
                merged.update(run_part(base / key, rig_args, command, timeout, result_file))
                commands.append(reproduce[key])
        print(f"scale: results in {base}", flush=True)
    if merged.get("encode", {}).get("profile"):
        merged["profile_summary"] = profile_summary(merged["encode"]["profile"])
    machine = (f"Guest: kernel {merged.get('kernel_release', '?')} under QEMU TCG (no KVM), "
               f"{merged.get('cpus', '?')} vCPUs, on the project's 2-core machine; measured "
               f"{time.strftime('%Y-%m-%d')}. Absolute times are TCG's; the ratios are the point.")
    compare = [json.loads(path.read_text()) for path in args.compare]
    options = "".join(f" --{name.replace('_', '-')} {value:g}" for name, value, default in
                      (("luns", args.luns, 128), ("idle_window", args.idle_window, 30.0)) if value != default)
    text = section(merged, commands, machine, compare, options)
    print(text)
    if not args.no_docs and merged:
        DOC.write_text(scale_lib.replace_section(DOC.read_text(), text))
        print(f"scale: wrote {DOC}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
