"""Pure parts of the scale benchmark (tests/bench/scale.py, guest_scale.py): no I/O, host-tested.

- the seed thread's plan as message text: ``idx:path`` at each run start
  plus ``R1,<len-1>`` for longer runs (today's syntax for the thread's
  ``7-8:1`` ranges), cut into messages of at most 4 KiB;
- rows: goal, measured, ratio, and the markdown table;
- replacing the benchmark's own section of docs/benchmarks.md between
  markers, leaving every other section as it was.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass

import numpy as np

from protocol.dmtable import MESSAGE_NAME

BEGIN_MARK = "<!-- scale-bench:begin (written by python -m tests.bench.scale; edit there) -->"
END_MARK = "<!-- scale-bench:end -->"
NAIVE_LIMIT = 4096


def run_starts(owners: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start index, length) of every run of equal allocated owners; holes (< 0) are skipped."""
    r = np.asarray(owners, dtype=np.int64)
    n = r.size
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    alloc = r >= 0
    brk = np.ones(n, dtype=bool)
    brk[1:] = (r[1:] != r[:-1]) | ~alloc[:-1]
    starts = np.flatnonzero(brk & alloc)
    # A run ends at the next break of any kind (a run start or the first hole).
    ends_at = np.flatnonzero(brk | ~alloc)
    nxt = np.searchsorted(ends_at, starts, side="right")
    ends = np.where(nxt < ends_at.size, ends_at[np.minimum(nxt, ends_at.size - 1)], n)
    return starts, ends - starts


def naive_messages(owners: np.ndarray, limit: int = NAIVE_LIMIT, max_messages: int | None = None) -> list[str]:
    """The seed thread's plan: per-run ``idx:path [R1,len-1]`` tokens in messages of <= `limit` bytes.

    A run's tokens stay in one message (R1 repeats the region before it).
    With `max_messages`, stop after that many (a timed sample).
    """
    starts, lengths = run_starts(owners)
    r = np.asarray(owners)
    head = len(MESSAGE_NAME)
    out: list[str] = []
    parts: list[str] = [MESSAGE_NAME]
    used = head
    for s, ln in zip(starts.tolist(), lengths.tolist()):
        unit = f"{s:x}:{int(r[s]):x}" + (f" R1,{ln - 1:x}" if ln > 1 else "")
        if used + 1 + len(unit) > limit and len(parts) > 1:
            out.append(" ".join(parts))
            if max_messages is not None and len(out) >= max_messages:
                return out
            parts, used = [MESSAGE_NAME], head
        parts.append(unit)
        used += 1 + len(unit)
    if len(parts) > 1:
        out.append(" ".join(parts))
    return out


def naive_message_count(owners: np.ndarray, limit: int = NAIVE_LIMIT) -> tuple[int, int]:
    """(messages, bytes) of naive_messages(owners, limit), without keeping the text."""
    msgs = naive_messages(owners, limit)
    return len(msgs), sum(len(m) for m in msgs)


def summary(samples: list[float]) -> dict[str, float]:
    """min / median / max of timing samples (seconds)."""
    return {"min": min(samples), "median": statistics.median(samples), "max": max(samples), "n": len(samples)}


@dataclass(frozen=True)
class Row:
    """One line of the results table."""

    what: str
    goal: str
    measured: str
    baseline: str
    ratio: str
    met: str
    note: str = ""


def ratio_text(value: float | None, base: float | None) -> str:
    """value / base as '1.23x', or '-' when either is missing or base is zero."""
    if value is None or base is None or base == 0 or math.isnan(value) or math.isnan(base):
        return "-"
    return f"{value / base:.2f}x"


def goal_met(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "no")


def render_table(rows: list[Row]) -> str:
    """Markdown table of the rows."""
    head = "| row | goal | measured | baseline | ratio | met | note |\n|---|---|---|---|---|---|---|"
    lines = [head]
    for r in rows:
        cells = [r.what, r.goal, r.measured, r.baseline, r.ratio, r.met, r.note]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines)


class DocSectionError(ValueError):
    """docs/benchmarks.md has one marker without the other, or them out of order."""


def replace_section(doc: str, section: str, begin: str = BEGIN_MARK, end: str = END_MARK,
                    where: str = "docs/benchmarks.md") -> str:
    """`doc` with the text between the markers replaced by `section` (appended with markers if absent).

    Another generated section (tests/vm/kernels.py) passes its own markers."""
    block = f"{begin}\n{section.rstrip()}\n{end}"
    b, e = doc.find(begin), doc.find(end)
    if b < 0 and e < 0:
        return doc.rstrip("\n") + "\n\n" + block + "\n"
    if b < 0 or e < 0 or e < b or doc.count(begin) != 1 or doc.count(end) != 1:
        raise DocSectionError(f"{where}: the markers {begin!r} and {end!r} are unbalanced; fix them by hand")
    return doc[:b] + block + doc[e + len(end):]


# -- rows from the guest's JSON ----------------------------------------------------------------

def _med(d: dict | None) -> float | None:
    return None if not d else d.get("median")


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f} s"


def lower_bound(kernel: dict) -> tuple[float | None, str]:
    """(seconds, how) of the fastest way the kernel took the seed map: the agent's messages or bigger ones."""
    best, how = _med(kernel.get("agent_messages_s")), "the agent's messages"
    for entry in kernel.get("bigger_messages", []):
        t = _med(entry.get("s"))
        if t is not None and (best is None or t < best):
            best, how = t, f"{entry['messages']} message(s) of <= {entry['limit'] >> 10} KiB"
    return best, how


def build_rows(res: dict) -> list[Row]:
    """The table rows from guest_scale's JSON (missing parts are left out)."""
    rows: list[Row] = []
    if "install" in res and res["install"]:
        agent = statistics.median(r["map_to_routed_s"] for r in res["install"])
        send = statistics.median(r["send_s"] for r in res["install"])
        kernel = res.get("kernel", {})
        lb, lb_how = lower_bound(kernel)
        am = res.get("agent_messages", {})
        limit = install_limit(res)
        met = None if lb is None else agent <= 1.3 * lb
        rows.append(Row(
            "install seed map: map in memory -> routed (agent, 3 legs + switch + top + upload)",
            "<= 1.3x (a)", _s(agent), f"(a) {_s(lb)}", ratio_text(agent, lb), goal_met(met),
            f"{am.get('count', '?')} messages, {am.get('bytes', 0):,} bytes; of it the upload {_s(send)}; "
            f"median of {len(res['install'])}" + (f"; limited by {limit}" if limit and met is False else "")))
        rows.append(Row("(a) kernel alone: the agent's messages by raw DM_TARGET_MSG ioctl", "-",
                        _s(_med(kernel.get("agent_messages_s"))), "-", "-", "-",
                        "dm-switch over 3 dm-zero legs, same geometry; ioctls only"))
        for e in kernel.get("bigger_messages", []):
            cap = f", <= {e['tokens']:,} tokens" if "tokens" in e else ""
            rows.append(Row(f"(a) kernel alone: same map in messages of <= {e['limit'] >> 10} KiB{cap}", "-",
                            _s(_med(e.get("s"))) if "s" in e else "rejected", "-", "-", "-",
                            f"{e['messages']} messages, {e['bytes']:,} bytes"
                            + (f", at most {e['max_tokens']:,} tokens in one" if "max_tokens" in e else "")
                            + (f"; {e['error']}" if "error" in e else "")))
        enc = res.get("encode")
        if enc:
            for label, what in (("agent", "the agent's encoder alone (match search + runs)"),
                                ("runs_only", "the Python core's runs-only plan alone (no match search)")):
                e = enc[label]
                rows.append(Row(f"install: {what}", "-", _s(_med(e["s"])), "-", "-", "-",
                                f"{e['messages']} messages, {e['bytes']:,} bytes"
                            + (f", at most {e['max_tokens']:,} tokens in one" if "max_tokens" in e else "")))
        d = res.get("dmsetup")
        if d:
            b = d["extrapolated_s"]
            rows.append(Row(
                "(b) seed thread's plan: `dmsetup message` per 4 KiB of per-run text", ">= 100x slower than agent",
                f"{b:.1f} s (extrapolated)", f"agent {_s(agent)}", f"{b / agent:.0f}x" if agent else "-",
                goal_met(b >= 100 * agent),
                f"{d['messages']:,} messages, {d['bytes']:,} bytes; timed {d['sample']} calls "
                f"({d['sample_s']:.2f} s; raw ioctls of the same {d['sample_raw_ioctl_s']:.3f} s) and extrapolated"
                + (f"; limited by {limit}" if limit and b < 100 * agent else "")))
        if lb_how:
            rows[0] = Row(rows[0].what, rows[0].goal, rows[0].measured, f"(a) {_s(lb)} ({lb_how})",
                          rows[0].ratio, rows[0].met, rows[0].note)
        fl = res.get("floor")
        if fl and fl.get("kernel"):
            rows.insert(0, floor_row(agent, fl, limit))
    f = res.get("fetch")
    if f:
        agent, raw = _med(f["agent_s"]), _med(f["sg_raw_s"])
        rows.append(Row(
            "fetch seed map over iSCSI (GET PAGE MAP, decode + CRCs)", "<= 1.5x sg_raw", _s(agent),
            f"sg_raw {_s(raw)}", ratio_text(agent, raw), goal_met(None if raw is None else agent <= 1.5 * raw),
            f"{f['commands']} command(s) of <= {f['allocation']:,} bytes, {f['bytes']:,} bytes in; "
            f"SG_IO alone (no decode) {_s(_med(f['sgio_no_decode_s']))}"))
    for key, goal in (("diff", 0.25), ("diff_one_page", 0.1)):
        diffs = res.get(key)
        if not diffs:
            continue
        t = statistics.median(r["change_to_routed_s"] for r in diffs)
        rec = statistics.median(r["reconcile_s"] for r in diffs)
        k = res.get("kernel", {})
        dm = k.get(f"{key}_messages", {})
        parts = [r["reconcile_parts_s"] for r in diffs if r.get("reconcile_parts_s")]
        split = ", ".join(f"{name.removesuffix('_s')} {_s(statistics.median(p[name] for p in parts))}"
                          for name in (parts[0] if parts else {}))
        how = "changes since (1.2)" if all(r.get("changes_since") for r in diffs) else "whole map"
        rows.append(Row(
            f"diff: {diffs[0]['moved_pages']:,} page(s) moved, array change -> routed", f"<= {goal} s", _s(t),
            f"kernel alone {_s(_med(k.get(f'{key}_messages_s')))}", ratio_text(t, _med(k.get(f"{key}_messages_s"))),
            goal_met(t <= goal),
            f"{dm.get('count', '?')} message(s), {dm.get('bytes', 0):,} bytes; fetched as {how}; of it the agent's "
            f"reconcile {_s(rec)}" + (f" ({split})" if split else "")
            + f" (no detection delay: reconcile starts at once)"
            + (f"; from the move request {_s(statistics.median(r['request_to_routed_s'] for r in diffs))}"
               if all("request_to_routed_s" in r for r in diffs) else "")
            + f"; median of {len(diffs)}"
            + (f"; limited by {limit}" if t > goal and (limit := move_limit(parts)) else "")))
    if res.get("host_encoder"):
        rows.append(encoder_row(res["host_encoder"]))
    many = res.get("many_luns")
    if many:
        rows.extend(many_rows(many))
    return rows


#: Issue #19 item 1: the seed map encoded on one core of the host.
ENCODER_GOAL_S = 0.030


def encoder_row(e: dict) -> Row:
    """The encoder's goal row from tests.bench.dmswitch_encode.encoder_goal: compiled core against the Python one."""
    c, p = e["compiled"], e["python"]
    t, base = c["s"]["median"], p["s"]["median"]
    small_enough = c["bytes"] <= p["bytes"]
    met = t <= ENCODER_GOAL_S and small_enough and e["identical"] and e["oracle_ok"]
    where = f"pinned to CPU {e['cpu']}" if e.get("cpu") is not None else "one thread"
    load = ", ".join(f"{x:.1f}" for x in e.get("load_avg", []))
    return Row(
        f"encoder (host, one core): seed map, {e['regions']:,} regions -> messages, compiled core",
        f"<= {ENCODER_GOAL_S * 1e3:.0f} ms, no more bytes than the Python core",
        f"{t * 1e3:.1f} ms", f"Python core {base * 1e3:.1f} ms", ratio_text(t, base), goal_met(met),
        f"median of {e['repeat']} (min {c['s']['min'] * 1e3:.1f} ms"
        + (f"; the thread's CPU time {c['cpu_s']['median'] * 1e3:.1f} ms" if "cpu_s" in c else "")
        + f"), {where}, load avg {load}; "
        f"{c['bytes']:,} bytes in {c['messages']} messages = {c['bytes'] / e['per_run_bytes']:.4f}x per-run; "
        + ("byte-identical to the Python core" if e["identical"] else "NOT the Python core's bytes")
        + ("; the oracle decodes it to the map" if e["oracle_ok"] else "; the oracle finds it WRONG"))


def floor_row(agent: float, fl: dict, limit: str | None) -> Row:
    """The agent's install against the floor: its devices and messages by bare ioctls, prepared beforehand."""
    floor = fl["kernel"]["s"]["median"]
    with_udev = _med((fl.get("top_udev") or {}).get("s"))
    met = agent <= 1.5 * floor
    return Row("install seed map vs the floor: the same 3 legs + switch + top and messages by bare ioctls",
               "<= 1.5x floor", _s(agent), f"floor {_s(floor)}", ratio_text(agent, floor), goal_met(met),
               f"floor: {fl['messages']} prepared messages, {fl['bytes']:,} bytes, no Python encoding, no udev wait; "
               f"with the top's udev wait (as the agent's) {_s(with_udev)} ({ratio_text(agent, with_udev)}); "
               f"median of {fl['kernel']['s']['n']}" + floor_steps(fl["kernel"].get("runs", []))
               + (f"; limited by {limit}" if limit and not met else ""))


def floor_steps(runs: list[dict]) -> str:
    """'; of it legs 0.1 s, switch ...': the floor's steps, medians over its runs."""
    if not runs:
        return ""
    names = [k for k in runs[0] if k != "total_s"]
    return "; of it " + ", ".join(f"{k.removesuffix('_s')} {statistics.median(r[k] for r in runs):.3f} s"
                                  for k in names)


MOVE_PARTS = {
    "discover_s": "discover (the multipath map read from sysfs, and the member of any path on a new session)",
    "fetch_s": "the fetch: one GET PAGE MAP changes-since round trip through the emulator's TCMU handler "
               "under TCG, and its decode",
    "kernel_s": "the kernel part: the message ioctl on a worker thread, and the bookkeeping around it",
}


def move_limit(parts: list[dict]) -> str | None:
    """The largest part of a move's reconcile (medians), said as what it is."""
    if not parts:
        return None
    medians = {k: statistics.median(p[k] for p in parts) for k in MOVE_PARTS if all(k in p for p in parts)}
    if not medians:
        return None
    name = max(medians, key=lambda k: medians[k])
    return f"{MOVE_PARTS[name]}, {_s(medians[name])} of it"


def install_limit(res: dict) -> str | None:
    """What keeps the install above its floor: the top device's udev wait where the floor shows it
    (its top step with and without the wait), else the encoder; and py-spy's busiest frames."""
    fl = res.get("floor") or {}
    bare = [r["top_s"] for r in (fl.get("kernel") or {}).get("runs", []) if "top_s" in r]
    waited = [r["top_s"] for r in (fl.get("top_udev") or {}).get("runs", []) if "top_s" in r]
    enc = res.get("encode", {}).get("agent")
    if bare and waited:
        with_udev = _med((fl.get("top_udev") or {}).get("s"))
        text = (f"the top device's udev wait, which users need (they open it by name): the floor's top step takes "
                f"{_s(statistics.median(waited))} with it, {_s(statistics.median(bare))} without; the floor "
                f"that waits as the agent must is {_s(with_udev)}")
    elif enc:
        text = f"the agent's encoder, {_s(_med(enc['s']))} alone under TCG"
    else:
        return None
    spy = res.get("install_pyspy") or {}
    hits = next((n for f, n in spy.get("on_stack", []) if f.startswith("encode_region_mappings")), None)
    if not (bare and waited) and hits is not None and spy.get("samples"):
        text += f", on the stack in {hits} of {spy['samples']} py-spy samples of the install"
    elif spy.get("samples") and spy.get("innermost"):
        busiest = ", ".join(f"`{frame}` {n}" for frame, n in spy["innermost"][:3])
        text += f"; py-spy over one install ({spy['samples']} samples, all threads): innermost {busiest}"
    return text


def many_rows(m: dict) -> list[Row]:
    """Rows of the many-LUN part."""
    rows = [Row(f"many LUNs: {m['luns']} LUNs x {m['members']} members x {m['pages']:,} pages appear at once",
                "all routed", f"{m['routed']}/{m['luns']} routed in {m['all_routed_s']:.1f} s", "-", "-",
                goal_met(m["routed"] == m["luns"]),
                f"from the logins' start; max_parallel_luns {m['max_parallel_luns']}, "
                f"most LUNs seen mid-build at once (a switch, not yet routed; sampled every 0.5 s) {m.get('max_concurrent', '?')}")]
    budget = 100 * (1 << 20) + 1.2 * m["packed_map_bytes"]
    rows.append(Row("many LUNs: daemon memory (VmHWM)", "<= 100 MB + 1.2x packed maps",
                    f"{m['vm_hwm_bytes'] / (1 << 20):.1f} MiB", f"budget {budget / (1 << 20):.1f} MiB",
                    ratio_text(m["vm_hwm_bytes"], budget), goal_met(m["vm_hwm_bytes"] <= budget),
                    f"VmRSS {m['vm_rss_bytes'] / (1 << 20):.1f} MiB; packed maps {m['packed_map_bytes']:,} bytes"
                    + (f"; before any LUN (Python, numpy, the daemon's threads) VmRSS "
                       f"{m['start_rss_bytes'] / (1 << 20):.1f} MiB with {m['start_threads']} threads, "
                       f"{m.get('threads', '?')} threads at the end" if "start_rss_bytes" in m else "")))
    if "idle_cpu_fraction" in m:
        rows.append(Row(f"many LUNs: idle CPU while polling (poll_interval_s {m['poll_interval_s']})",
                        "<= 1% of a core", f"{100 * m['idle_cpu_fraction']:.2f} %", "-", "-",
                        goal_met(m["idle_cpu_fraction"] <= 0.01),
                        (f"user {100 * m['idle_cpu_user_fraction']:.2f} %, system "
                         f"{100 * m['idle_cpu_system_fraction']:.2f} %; " if "idle_cpu_user_fraction" in m else "")
                        + f"over {m['idle_window_s']:.0f} s, from /proc/<pid>/stat; the window starts once 5 s "
                        f"stayed under 5 %" + (f" ({m['settle_s']:.0f} s after all routed)" if "settle_s" in m else "")
                        + (f"; limited by {idle_limit(m)}" if m["idle_cpu_fraction"] > 0.01 and idle_limit(m) else "")))
    rows[1:1] = storm_rows(m)
    if m.get("source"):
        rows = [Row(r.what, r.goal, r.measured, r.baseline, r.ratio, r.met, f"{r.note}; {m['source']}") for r in rows]
    return rows


def idle_limit(m: dict) -> str | None:
    """What the idle profile shows the daemon doing: the agent's busiest frames on the stack, by py-spy samples."""
    spy = m.get("idle_profile") or {}
    if not spy.get("samples"):
        return None
    skip = ("<module>", "main (", "run_daemon (", "Daemon.run (", "_run (")
    frames = [(f, n) for f, n in spy.get("on_stack", [])
              if ("agent/" in f or "protocol/" in f) and not f.startswith(skip)][:3]
    if not frames:
        return None
    return (f"what the idle daemon's py-spy samples ({spy['samples']}) hold on the stack: "
            + ", ".join(f"`{f}` {n}" for f, n in frames))


def py_spy() -> str | None:
    """The py-spy next to this interpreter (the venv's bench extra; the guest's PATH may not have it), else PATH's."""
    import os
    import shutil
    import sys

    return shutil.which("py-spy", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))


def summarise_collapsed(text: str, top: int = 40) -> dict:
    """py-spy's raw (collapsed) stacks: samples, and the most frequent innermost frames and functions on stack.

    Each line is ``frame;frame;...;frame count``; a frame is ``function (file:line)``.
    """
    total = 0
    leaf: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f.split(":")[0] if "(" not in f else f.rsplit(":", 1)[0] + ")" for f in stack.split(";")]
        leaf[frames[-1]] = leaf.get(frames[-1], 0) + n
        for f in set(frames):
            inclusive[f] = inclusive.get(f, 0) + n
    def best(d: dict[str, int]) -> list[tuple[str, int]]:
        return sorted(d.items(), key=lambda kv: -kv[1])[:top]
    return {"samples": total, "innermost": best(leaf), "on_stack": best(inclusive)}


# -- the boot storm (guest_many_luns): per-LUN times from the kernel's dm uevents ------------------

def percentile(samples: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the closest ranks (numpy's default); NaN if empty."""
    if not samples:
        return math.nan
    s = sorted(samples)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def cpu_seconds(stat_line: str, hz: int) -> float:
    """utime + stime of one /proc/<pid>/stat line, in seconds (fields 14 and 15; comm may hold spaces)."""
    fields = stat_line.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / hz


@dataclass(frozen=True)
class DmEvent:
    """A kernel uevent of a dm device: when it arrived (monotonic s), its action, the device's dm uuid."""

    t: float
    action: str
    uuid: str


MPATH_PREFIX = "mpath-"
TOP_PREFIX = "SWAGENT-top-"


def storm_stats(events: list[DmEvent], t_login: float, wwids: list[str]) -> dict:
    """The storm's numbers from the dm uevents, all seconds from `t_login` (the first login's start).

    - a LUN is routed at its top device's last event (create or table swap): the routing that stuck;
    - its map is multipathd's last event on mpath-<wwid> at or before that: the map it was routed from;
    - the agent's time per LUN is routed minus map (p50, p95 over the LUNs routed);
    - multipathd's last map is its last event on any of the LUNs' maps, at or before the last routing;
    - tail fraction: (last routed - last map) / (last map - t_login). Goal <= 0.2.

    LUNs with no top event are counted as not routed; events after the last routing are ignored.
    """
    routed: dict[str, float] = {}
    for e in events:
        if e.uuid.startswith(TOP_PREFIX) and e.action in ("add", "change"):
            routed[e.uuid[len(TOP_PREFIX):]] = e.t
    routed = {w: t for w, t in routed.items() if w in wwids}
    out: dict = {"luns": len(wwids), "routed_by_uevent": len(routed)}
    if not routed:
        return out
    last_routed = max(routed.values())
    maps: dict[str, list[float]] = {}
    for e in events:
        if e.uuid.startswith(MPATH_PREFIX) and e.action in ("add", "change") and e.t <= last_routed:
            maps.setdefault(e.uuid[len(MPATH_PREFIX):], []).append(e.t)
    agent = []
    for wwid, t in routed.items():
        before = [m for m in maps.get(wwid, []) if m <= t]
        if before:
            agent.append(t - max(before))
    mapped = [t for w, ts in maps.items() if w in wwids for t in ts]
    last_map = max(mapped) if mapped else math.nan
    out.update(
        agent_s={"p50": percentile(agent, 50), "p95": percentile(agent, 95), "max": max(agent, default=math.nan),
                 "n": len(agent)},
        first_map_s=(min(mapped) if mapped else math.nan) - t_login,
        last_map_s=last_map - t_login, last_routed_s=last_routed - t_login,
        tail_s=last_routed - last_map,
        tail_fraction=(last_routed - last_map) / (last_map - t_login) if mapped and last_map > t_login else math.nan)
    return out


_RECONCILED = re.compile(r" INFO agent\.orchestrator: (?P<wwid>[0-9a-f]+): reconciled in (?P<total>[0-9.]+) s "
                         r"\(discover (?P<discover>[0-9.]+), fetch (?P<fetch>[0-9.]+), kernel (?P<kernel>[0-9.]+)\)")
_UDEV_TIMEOUT = re.compile(r"udev cookie \S+: udev did not complete within")


def reconcile_profile(log_text: str) -> dict:
    """Where the daemon's reconciles went, from its own log lines ("reconciled in ... (discover, fetch,
    kernel)"): how many per LUN, and the medians and sums of each part."""
    found = [m for m in map(_RECONCILED.search, log_text.splitlines()) if m]
    if not found:
        return {}
    parts = ("total", "discover", "fetch", "kernel")
    values = {k: [float(m[k]) for m in found] for k in parts}
    luns = {m["wwid"] for m in found}
    return {"reconciles": len(found), "luns": len(luns),
            "median_s": {k: statistics.median(v) for k, v in values.items()},
            "sum_s": {k: sum(v) for k, v in values.items()},
            "udev_timeouts": sum(1 for line in log_text.splitlines() if _UDEV_TIMEOUT.search(line))}


def storm_limit(m: dict) -> str | None:
    """What the storm's tail waited on, from the daemon's reconcile profile."""
    p = m.get("reconcile_profile") or {}
    if not p or not p["sum_s"]["total"]:
        return None
    med, total = p["median_s"], p["sum_s"]
    shares = ", ".join(f"{k} {100 * total[k] / total['total']:.0f} %"
                       for k in sorted(("discover", "fetch", "kernel"), key=lambda k: -total[k]))
    return (f"the reconciles themselves: {p['reconciles']} for {p['luns']} LUNs (multipathd adds a LUN's paths "
            f"one reload at a time, each a reconcile), {total['total']:.0f} s in all ({m.get('max_parallel_luns', '?')} "
            f"at once); median reconcile {med['total']:.1f} s (discover {med['discover']:.1f}, fetch "
            f"{med['fetch']:.1f}, kernel {med['kernel']:.1f}); of their sum {shares}. Discover and fetch are SCSI "
            f"round trips to the emulated array (one TCMU handler for every path, under TCG); the kernel part is "
            f"mostly udev's queue: {p['udev_timeouts']} waits of 30 s for a new top device ran out")


def storm_rows(m: dict) -> list[Row]:
    """Rows of the storm's per-LUN figures (from storm_stats plus the daemon's CPU)."""
    s = m.get("storm") or {}
    if not s.get("agent_s"):
        return []
    a = s["agent_s"]
    n = m["luns"]
    rows = [Row(f"storm ({n} LUNs): the agent's time per LUN, its multipath map -> routed", "-",
                f"p50 {a['p50']:.1f} s, p95 {a['p95']:.1f} s", "-", "-", "-",
                f"max {a['max']:.1f} s over {a['n']} LUNs; from the kernel's uevents (mpath-<wwid>'s last change "
                f"before the top device's last); includes waiting for a max_parallel_luns slot")]
    if "cpu_s" in m and m.get("routed"):
        rows.append(Row(f"storm ({n} LUNs): daemon CPU per LUN routed", "-",
                        f"{m['cpu_s'] / m['routed']:.2f} s", "-", "-", "-",
                        f"{m['cpu_s']:.1f} s of user + system (/proc/<pid>/stat) from the logins' start to all "
                        f"routed, over {m['routed']} LUNs"))
    f = s["tail_fraction"]
    rows.append(Row(f"storm ({n} LUNs): multipathd's last map -> last LUN routed", "<= 20 % of first login -> last map",
                    f"{s['tail_s']:.1f} s", f"first login -> last map {s['last_map_s']:.1f} s",
                    "-" if math.isnan(f) else f"{100 * f:.1f} %", goal_met(None if math.isnan(f) else f <= 0.2),
                    f"first map {s['first_map_s']:.1f} s, last routed {s['last_routed_s']:.1f} s after the first login"
                    + (f"; limited by {limit}" if (limit := storm_limit(m)) and not f <= 0.2 else "")))
    return rows
