"""Guest part of the many-LUN benchmark: the daemon meets every LUN of the array at once.

    python -m tests.bench.guest_many_luns [--idle-window S] [--poll-interval S] [--timeout S]

Run by tests/bench/scale.py in the VM rig started with `--luns N --no-login`
(the array up, nobody logged in). Starts `switch-agent daemon`, logs in to
every member at once (all LUNs appear together), and records: the time until every
LUN is routed with a path to every member, the most LUNs seen being built at
once (a switch exists, the LUN not routed yet) against max_parallel_luns, the
daemon's VmHWM/VmRSS, and its CPU over an idle window of polling
(/proc/<pid>/stat). Writes <results>/bench-luns.json. Asserts nothing.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from agent.config import Config
from tests.array import cli, initiator
from tests.bench import scale_lib
from tests.guest import agentlib


def proc_status(pid: int) -> dict[str, int]:
    """VmHWM and VmRSS in bytes, and Threads."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0]) * 1024
            elif key == "Threads":
                out[key] = int(value)
    return out


def cpu_ticks(pid: int) -> int:
    """utime + stime of the process alone (fields 14, 15), in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def memory_by_mapping(pid: int, top: int = 6) -> dict[str, int]:
    """The process's Rss by kind of mapping (bytes), from /proc/<pid>/smaps.

    "[heap]" is the main malloc arena; "anonymous" holds the other arenas,
    numpy's and Python's large blocks and the threads' stacks; files are
    Python, its extensions and the libraries they load (the `top` largest by
    name, the rest together).
    """
    kinds: dict[str, int] = {}
    kind = "anonymous"
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(None, 5)
            if "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's first line
                path = head[5].strip() if len(head) > 5 else ""
                kind = path if path.startswith("[") else os.path.basename(path) if path else "anonymous"
            elif head[0] == "Rss:":
                kinds[kind] = kinds.get(kind, 0) + int(head[1]) * 1024
    special = {k: kinds.pop(k) for k in ("[heap]", "anonymous", "[stack]") if k in kinds}
    files = sorted(kinds.items(), key=lambda kv: -kv[1])
    out = dict(special, **dict(files[:top]))
    out["other files"] = sum(v for _, v in files[top:])
    return out


def cpu_split(pid: int) -> tuple[int, int]:
    """(utime, stime) of the process in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def switch_wwids() -> set[str]:
    """LUNs that have one of our switches now (dmsetup: an independent reader)."""
    return {uuid.split("-", 3)[3] for uuid in agentlib.our_uuids().values() if uuid.startswith("SWAGENT-sw-")}


class Sampler(threading.Thread):
    """Every 0.5 s: LUNs routed (a path to every member) and LUNs being built (a switch, not routed)."""

    def __init__(self, members: int, luns: int, t0: float) -> None:
        super().__init__(daemon=True)
        self.members, self.luns, self.t0 = members, luns, t0
        self.routed = self.max_concurrent = 0
        self.all_routed_at: float | None = None
        self.finished = threading.Event()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            records = agentlib.status()
            done = {r["wwid"] for r in records if r["state"] == "routed" and len(r["members"]) == self.members
                    and all(m["paths"] for m in r["members"])}
            self.max_concurrent = max(self.max_concurrent, len(switch_wwids() - done))
            self.routed = len(done)
            if self.routed >= self.luns:
                self.all_routed_at = time.monotonic()
                self.finished.set()
                return
            self.stop.wait(0.5)  # sampling interval


class DmUevents(threading.Thread):
    """The kernel's own uevents for dm devices (not udev's: no rule delays them), stamped on arrival."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        import pyudev

        self.monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="kernel")
        self.monitor.filter_by("block")
        self.monitor.set_receive_buffer_size(64 << 20)  # hundreds of disks and maps at once
        self.monitor.start()
        self.events: list[scale_lib.DmEvent] = []
        self.lost = 0

    def run(self) -> None:
        while True:
            device = self.monitor.poll()
            t = time.monotonic()
            if device is None or not device.sys_name.startswith("dm-") or device.action not in ("add", "change"):
                continue
            try:
                uuid = Path(f"/sys/block/{device.sys_name}/dm/uuid").read_text().strip()
            except OSError:
                self.lost += 1  # removed before we looked: not one of the maps or tops that stay
                continue
            self.events.append(scale_lib.DmEvent(t, device.action, uuid))


def wait_quiet(pid: int, hz: int, fraction: float, timeout: float, window: float = 5.0) -> float:
    """Seconds until one `window` of the daemon's CPU stays under `fraction` of a core (or `timeout`)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        ticks = cpu_ticks(pid)
        time.sleep(window)  # a measurement window, bounded by the timeout above
        if (cpu_ticks(pid) - ticks) / hz / window < fraction:
            break
    return time.monotonic() - t0


def sample_idle(pid: int, seconds: float) -> dict | None:
    """py-spy (non-blocking, 100 Hz, the GIL holder only) over the idle daemon: collapsed stacks, summarised.

    A sample is kept only when a thread holds the GIL, i.e. rarely in an idle
    daemon: 30 s at 20 Hz gave 16 samples.
    """
    spy = scale_lib.py_spy()
    if spy is None:
        return None
    out = agentlib.RESULTS / "daemon-idle.pyspy.txt"
    try:
        # --gil: only the thread holding the GIL is unwound per sample. Sampling all of a 64-LUN
        # daemon's 207 threads at 50 Hz did not finish a 30 s recording within 150 s under TCG (twice).
        p = subprocess.run([spy, "record", "--nonblocking", "--gil", "-r", "100", "-d", str(int(seconds)),
                            "-f", "raw", "-o", str(out), "--pid", str(pid)],
                           capture_output=True, text=True, timeout=4 * seconds + 120)
    except subprocess.TimeoutExpired:
        return {"error": f"py-spy did not finish within {4 * seconds + 120:.0f} s"}
    if p.returncode != 0 or not out.exists():
        return {"error": (p.stdout + p.stderr)[-500:]}
    return scale_lib.summarise_collapsed(out.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.guest_many_luns")
    p.add_argument("--idle-window", type=float, default=30.0, help="0: no idle part (memory read once routed)")
    p.add_argument("--poll-interval", type=float, default=Config().poll_interval_s)
    p.add_argument("--timeout", type=float, default=1200.0)
    p.add_argument("--quiet-fraction", type=float, default=0.05,
                   help="the idle window starts once 5 s of the daemon's CPU stay under this (default 0.05)")
    p.add_argument("--settle-timeout", type=float, default=300.0)
    args = p.parse_args(argv)
    info = agentlib.array("info")
    luns = len(info.get("luns", [])) or 1
    members = len(info["members"])
    pages = info["total_pages"]
    bits = max(1, (members - 1).bit_length())  # the map's entry width for this many members
    result: dict = {"luns": luns, "members": members, "pages": pages,
                    "max_parallel_luns": Config().max_parallel_luns, "poll_interval_s": args.poll_interval,
                    "packed_map_bytes": luns * -(-pages * bits // 8)}
    # info, as a deployed daemon logs: debug lines for every SCSI command of 64 LUNs would be measured too.
    daemon = agentlib.AgentDaemon(poll_interval_s=args.poll_interval, log_level="info")
    try:
        # What Python, numpy and the daemon's own threads cost before any LUN: the floor of the memory row.
        start = proc_status(daemon.proc.pid)
        result.update(start_rss_bytes=start["VmRSS"], start_threads=start["Threads"],
                      start_rss_by_mapping=memory_by_mapping(daemon.proc.pid))
        uevents = DmUevents()
        uevents.start()
        hz = os.sysconf("SC_CLK_TCK")
        stat = Path(f"/proc/{daemon.proc.pid}/stat")
        cpu0 = scale_lib.cpu_seconds(stat.read_text(), hz)
        t0 = time.monotonic()
        # The daemon routes LUNs while later ones are still being scanned: sample from the start.
        sampler = Sampler(members, luns, t0)
        sampler.start()
        # Discovery once, then every member at once: each login waits for its session's LUN scan
        # (seconds per LUN under TCG), and the LUNs should appear together, as after a host boot.
        # (Parallel `tests.array login --member K` calls each run discovery, and those time out.)
        portals = {m["number"]: m["portal"].split(":")[0] for m in info["members"]}
        initiator.discover(portals[min(portals)])
        limit = 120.0 + cli.LOGIN_S_PER_LUN * (luns - 1)
        with concurrent.futures.ThreadPoolExecutor(len(portals)) as pool:
            for done in [pool.submit(initiator.login, info["iqn"], ip, limit) for ip in portals.values()]:
                done.result()
        initiator.wait_for_devices(info["iqn"], sorted(portals), timeout=limit)
        result["login_s"] = time.monotonic() - t0
        sampler.finished.wait(timeout=args.timeout)
        sampler.stop.set()
        sampler.join(timeout=60)
        cpu1 = scale_lib.cpu_seconds(stat.read_text(), hz)
        routed, max_concurrent = sampler.routed, sampler.max_concurrent
        wwids = sorted({r["wwid"] for r in agentlib.status()}
                       | {e.uuid.removeprefix(scale_lib.MPATH_PREFIX) for e in list(uevents.events)
                          if e.uuid.startswith(scale_lib.MPATH_PREFIX)})
        result.update(cpu_s=cpu1 - cpu0, uevents=len(uevents.events), uevents_lost=uevents.lost,
                      storm=scale_lib.storm_stats(list(uevents.events), t0, wwids))
        (agentlib.RESULTS / "storm-uevents.json").write_text(json.dumps(
            [[e.t - t0, e.action, e.uuid] for e in uevents.events]) + "\n")
        st = result["storm"]
        if st.get("agent_s"):
            print(f"guest-luns: STORM per LUN map -> routed p50 {st['agent_s']['p50']:.1f} s, p95 "
                  f"{st['agent_s']['p95']:.1f} s; CPU {result['cpu_s'] / max(routed, 1):.2f} s per LUN; last map "
                  f"{st['last_map_s']:.1f} s -> last routed {st['last_routed_s']:.1f} s: tail "
                  f"{100 * st['tail_fraction']:.1f} % (goal <= 20 %)", flush=True)
        result.update(all_routed_s=(sampler.all_routed_at or time.monotonic()) - t0, routed=routed,
                      max_concurrent=max_concurrent,
                      reconcile_profile=scale_lib.reconcile_profile(daemon.log_path.read_text(errors="replace")))
        print(f"guest-luns: {routed}/{luns} routed after {result['all_routed_s']:.1f} s "
              f"(login {result['login_s']:.1f} s), at most {max_concurrent} built at once", flush=True)
        # Idle: every LUN routed, the daemon only polls. The logins' last udev events and unit
        # attentions still cause reconciles for a while: wait for them to end first.
        subprocess.run(["udevadm", "settle", "--timeout=120"], check=False)
        pid = daemon.proc.pid
        if args.idle_window <= 0:
            mem = proc_status(pid)
            result.update(vm_hwm_bytes=mem["VmHWM"], vm_rss_bytes=mem["VmRSS"], threads=mem["Threads"],
                          rss_by_mapping=memory_by_mapping(pid))
            return 0
        result["settle_s"] = wait_quiet(pid, hz, args.quiet_fraction, args.settle_timeout)
        (user0, sys0), w0 = cpu_split(pid), time.monotonic()
        time.sleep(args.idle_window)  # the measurement window itself
        (user1, sys1), w1 = cpu_split(pid), time.monotonic()
        ticks = (user1 - user0) + (sys1 - sys0)
        result.update(idle_window_s=w1 - w0, idle_cpu_fraction=ticks / hz / (w1 - w0),
                      idle_cpu_user_fraction=(user1 - user0) / hz / (w1 - w0),
                      idle_cpu_system_fraction=(sys1 - sys0) / hz / (w1 - w0))
        mem = proc_status(pid)
        result.update(vm_hwm_bytes=mem["VmHWM"], vm_rss_bytes=mem["VmRSS"], threads=mem["Threads"],
                      rss_by_mapping=memory_by_mapping(pid))
        print(f"guest-luns: idle CPU {100 * result['idle_cpu_fraction']:.2f} % over {w1 - w0:.0f} s, "
              f"VmHWM {mem['VmHWM'] >> 20} MiB, VmRSS {mem['VmRSS'] >> 20} MiB", flush=True)
        # After the measurement, so the sampler's own CPU does not count: where idle time goes.
        result["idle_profile"] = sample_idle(pid, 4 * args.idle_window)
    finally:
        # The numbers first: removing 5 dm devices per LUN waits on udev and may outlast the rig.
        out = agentlib.RESULTS / "bench-luns.json"
        out.write_text(json.dumps({"many_luns": result}, indent=2) + "\n")
        print(json.dumps(result, indent=2), flush=True)
        daemon.stop()
        agentlib.remove_our_devices()
    return 0


if __name__ == "__main__":
    sys.exit(main())
