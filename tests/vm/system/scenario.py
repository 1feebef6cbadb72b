"""Issue #16's host scenario, run inside the systemd guest by /mnt/swtest/boot.sh after each boot.

Boot 1 does what an administrator does on a new host: the emulated array
as a unit of its own (its disk survives reboots), `apt install` of the
project's .deb (offline: its dependencies are in the image), multipath.conf,
`systemctl enable --now switch-agent.socket switch-agent`, iSCSI node records
with node.startup=automatic, mkfs.ext4 on the routed device, an fstab line
(README "Install on a host", word for word), checksummed files; then reboots.

Boot 2 touches nothing before it checks: the filesystem is mounted through
the routed device, every file verifies, a window of I/O forwards nothing;
then `systemctl restart switch-agent` under fio verify=crc32c, `systemctl
stop switch-agent` with I/O going on, a page move whose unit attention makes
udev run `switch-agent trigger`, which starts the daemon through the socket,
which routes the moved pages; the journal's structured fields. Powers off.

Everything is written to /mnt/swtest/out (the host's share): results.json
(every step: ok, seconds, details), scenario.log, and on failure the
journal and dmesg. Debian's python3 runs this; only the standard library.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

SHARE = Path("/mnt/swtest")
OUT = SHARE / "out"
STATE = Path("/var/lib/swtest")  # on the root disk: survives the reboot
EMU = Path("/opt/swemu")  # the emulator's code (tests/array and what it imports)
MOUNTPOINT = Path("/srv/volume")
FILES = MOUNTPOINT / "files"
IQN = "iqn.2026-11.org.switch-agent:vol0"
MEMBERS = 3

from readme_steps import commands, fill, install_steps  # noqa: E402 (beside this file in the share)

# The README's "Install on a host", as the administrator copies it: step -> its fenced blocks.
README = install_steps((SHARE / "README.md").read_text())

SWEMU_UNIT = f"""[Unit]
Description=Emulated scale-out iSCSI array (switch-agent tests/array), {MEMBERS} members
# Its backing store is on its own disk, kept across reboots (--keep-data);
# the portals must serve before open-iscsi logs in to the node records.
RequiresMountsFor=/var/lib/swemu
Wants=sys-kernel-config.mount
After=sys-kernel-config.mount local-fs.target
Before=open-iscsi.service remote-fs-pre.target

[Service]
Type=exec
RuntimeDirectory=switch-agent-emu
Environment=PYTHONPATH={EMU} SWEMU_RUN_DIR=/run/switch-agent-emu SWEMU_DATA_DIR=/var/lib/swemu/data
WorkingDirectory={EMU}
{"".join(f"ExecStartPre=/sbin/ip addr replace 127.0.0.{k}/8 dev lo{chr(10)}" for k in range(2, MEMBERS + 1))}ExecStart=/usr/bin/python3 -m tests.array _serve --members {MEMBERS} --layout striped --size 1G --page-size 1M --keep-data
# Ready when the control socket answers (the server listens once every member serves).
ExecStartPost=/usr/bin/python3 {EMU}/swemu_ready.py $MAINPID
# Stopped after open-iscsi has logged out (the reverse of Before=): delete the LIO objects.
ExecStop=/usr/bin/python3 -c 'from tests.array import control; control.request(control.run_dir(), "shutdown", timeout=120)'
TimeoutStartSec=360
TimeoutStopSec=150

[Install]
WantedBy=multi-user.target
"""

SWEMU_READY = """import os, sys, time
from tests.array import control
server = int(sys.argv[1])  # $MAINPID: a server that died will never answer
directory, deadline = control.run_dir(), time.monotonic() + 300
while not control.server_running(directory):
    if not os.path.exists(f"/proc/{server}"):
        sys.exit("the emulated array's server exited (journalctl -u swemu)")
    if time.monotonic() > deadline:
        sys.exit("the emulated array did not come up within 300 s")
    time.sleep(0.2)  # polling the control socket, bounded by the deadline
"""

# -- running steps -----------------------------------------------------------------------------

class StepFailed(Exception):
    pass


class Run:
    """Steps with their timings and details, saved after every step (a hang still leaves a record)."""

    def __init__(self, boot: int) -> None:
        self.boot = boot
        self.path = OUT / "results.json"
        self.results: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {"steps": []}
        self.t0 = time.monotonic()

    def step(self, name: str, func: Callable[[], dict[str, Any] | None]) -> dict[str, Any]:
        log(f"--- boot {self.boot}: {name}")
        started = time.monotonic()
        record: dict[str, Any] = {"boot": self.boot, "step": name}
        try:
            record["details"] = func() or {}
            record["ok"] = True
        except Exception as exc:
            record["ok"] = False
            record["error"] = f"{type(exc).__name__}: {exc}"
            log(traceback.format_exc())
        record["seconds"] = round(time.monotonic() - started, 1)
        record["ended_at"] = round(time.time(), 1)  # the guest's clock runs on across the reboot
        log(f"    {'ok' if record['ok'] else 'FAILED'} in {record['seconds']} s: "
            f"{json.dumps(record.get('details', record.get('error')))[:2000]}")
        self.results["steps"].append(record)
        self.save()
        if not record["ok"]:
            raise StepFailed(name)
        return record["details"]

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1) + "\n")
        tmp.replace(self.path)


def log(msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    with open(OUT / "scenario.log", "a") as f:
        f.write(line + "\n")


def readme(step: int, block: int = 0, *, cwd: str = "/", **values: str) -> list[dict[str, Any]]:
    """Run README step `step`'s block `block` line by line, as written (no shell); what each printed."""
    ran = []
    for argv in commands(README[step][block], cwd=cwd, **values):
        if argv[0] == "editor":  # the administrator's look at the configuration: its default fits
            continue
        proc = sh(*argv, cwd=cwd, timeout=600)
        ran.append({"argv": " ".join(argv), "stdout": proc.stdout.strip()[-300:]})
    return ran


def sh(*argv: str, check: bool = True, timeout: float = 300, **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode:
        raise StepFailed(f"{' '.join(argv)} exited {proc.returncode}: {(proc.stderr or proc.stdout)[-1500:]}")
    return proc


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise StepFailed(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval)  # polling, bounded by the deadline


# -- the array and the agent -----------------------------------------------------------------------

def array(op: str, **args: Any) -> Any:
    # EMU joins the path only now that it exists: an import that looked there before would have
    # cached "nothing here" for it (sys.path_importer_cache), and `tests` would never be found.
    if str(EMU) not in sys.path:
        sys.path.insert(0, str(EMU))
    from tests.array import control
    return control.request(Path("/run/switch-agent-emu"), op, **args)


def agent_status() -> list[dict[str, Any]]:
    proc = sh("switch-agent", "status", "--json", check=False, timeout=60)
    if proc.returncode:
        return []
    data = json.loads(proc.stdout)
    return data if isinstance(data, list) else [data]


def routed(generation: int | None = None) -> dict[str, Any] | None:
    """The LUN's status record once routed over a path to every member (at `generation`, if given)."""
    for r in agent_status():
        if (r.get("state") == "routed" and len(r.get("members", [])) == MEMBERS
                and all(m.get("paths") for m in r["members"])
                and (generation is None or r.get("generation") == generation)):
            return r
    return None


def system_state() -> dict[str, Any]:
    state = sh("systemctl", "is-system-running", "--wait", check=False, timeout=600).stdout.strip()
    analyze = sh("systemd-analyze", "time", check=False).stdout.strip().splitlines()
    failed = sh("systemctl", "--failed", "--no-legend", "--plain", check=False).stdout.split("\n")
    return {"state": state, "systemd_analyze": analyze[0] if analyze else "",
            "failed_units": [line.split()[0] for line in failed if line.strip()],
            "uptime_s": float(Path("/proc/uptime").read_text().split()[0])}


def fio(name: str, *, size: str = "32M", loops: int = 1, background: bool = False):
    argv = ["fio", f"--name={name}", f"--filename={MOUNTPOINT}/{name}.fio", f"--size={size}", "--bs=64k",
            "--rw=randwrite", "--direct=1", "--ioengine=psync", "--verify=crc32c", "--verify_fatal=1",
            "--do_verify=1", f"--loops={loops}", "--randrepeat=0", "--output-format=json",
            f"--output={OUT}/fio-{name}.json"]
    if background:
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(OUT / f"fio-{name}.err", "w"))
    return sh(*argv, check=False, timeout=900)


def fio_result(name: str, rc: int) -> dict[str, Any]:
    text = (OUT / f"fio-{name}.json").read_text()
    job = json.loads(text[text.index("{"):])["jobs"][0]  # fio may print notes before its JSON
    result = {"rc": rc, "error": job["error"], "written_mib": round(job["write"]["io_bytes"] / 2**20, 1),
              "verified_mib": round(job["read"]["io_bytes"] / 2**20, 1)}
    if rc != 0 or job["error"] != 0 or job["read"]["io_bytes"] == 0:
        raise StepFailed(f"fio {name}: {result}; {(OUT / f'fio-{name}.err').read_text()[-800:] if (OUT / f'fio-{name}.err').exists() else ''}")
    return result


def quiet_window(seconds: float = 2.0, deadline_s: float = 120.0) -> dict[str, Any]:
    """Verified writes in windows of `seconds` or more until one forwards nothing (before `deadline_s`).

    As in the rig's session tests: while the agent completes the sessions and gives their paths to
    the legs (after a boot or a change), some I/O is forwarded; the goal is a window with none.
    """
    started = time.monotonic()
    earlier: list[int] = []
    while True:
        array("stats", reset=True)
        window_started = time.monotonic()
        fio("quiet", size="16M")
        elapsed = time.monotonic() - window_started
        while elapsed < seconds:  # at least `seconds` of I/O in the window
            fio("quiet", size="16M")
            elapsed = time.monotonic() - window_started
        members = array("stats")["members"].values()
        direct = sum(m["direct_cmds"] for m in members)
        forwarded = sum(m["forwarded_cmds"] for m in members)
        details = {"window_s": round(elapsed, 1), "direct_cmds": direct, "forwarded_cmds": forwarded,
                   "quiet_after_s": round(time.monotonic() - started, 1), "earlier_windows_forwarded": earlier}
        if not direct:
            raise StepFailed(f"no I/O reached the array in the window: {details}")
        if not forwarded:
            return details
        if time.monotonic() - started > deadline_s:
            raise StepFailed(f"I/O still forwarded after {deadline_s:.0f} s: {details}")
        earlier.append(forwarded)


# -- boot 1 --------------------------------------------------------------------------------------

def boot1(run: Run) -> None:
    run.step("system up (first boot)", system_state)

    def emulator() -> dict[str, Any]:
        EMU.mkdir(parents=True, exist_ok=True)
        sh("tar", "-xf", str(SHARE / "emu.tar"), "-C", str(EMU))
        (EMU / "swemu_ready.py").write_text(SWEMU_READY)
        Path("/etc/systemd/system/swemu.service").write_text(SWEMU_UNIT)
        sh("systemctl", "daemon-reload")
        sh("systemctl", "enable", "--now", "swemu.service", timeout=420)
        info = array("info")
        return {"wwid": info["wwid"], "members": len(info["members"])}
    run.step("the array: swemu.service", emulator)

    def install() -> dict[str, Any]:
        # README step 1's apt line, run from a directory laid out as the clone it assumes (the host
        # built the package with the step's build-deb.sh). The guest has no network: every dependency
        # must already be installed. apt's "Do you want to continue?" is answered yes by configuration.
        deb = next(SHARE.glob("switch-agent_*_*.deb"))
        (Path("/root/dist") / deb.name).parent.mkdir(exist_ok=True)
        (Path("/root/dist") / deb.name).write_bytes(deb.read_bytes())
        Path("/etc/apt/apt.conf.d/90swtest-yes").write_text('APT::Get::Assume-Yes "true";\n')
        apt = [argv for argv in commands(README[1][0], cwd="/root") if argv[0] == "apt"]
        if len(apt) != 1:
            raise StepFailed(f"README step 1 has no single apt line: {README[1][0]!r}")
        proc = sh(*apt[0], cwd="/root", env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"), timeout=600)
        version = sh("dpkg-query", "-W", "-f=${Version} ${Status}", "switch-agent").stdout
        new = [line for line in proc.stdout.splitlines() if "newly installed" in line]
        return {"ran": " ".join(apt[0]), "package": version, "apt": new}
    run.step("README step 1: apt install ./dist/switch-agent_*.deb", install)

    def multipath() -> dict[str, Any]:
        # The README's defaults block, then this array's devices block, as step 2 says.
        device = (EMU / "tests/array/multipath.conf").read_text()
        Path("/etc/multipath.conf").write_text(README[2][0] + "\n" + device)
        sh("systemctl", "restart", "multipathd")
        return {"defaults": README[2][0].splitlines()}
    run.step("README step 2: /etc/multipath.conf, restart multipathd", multipath)

    def enable() -> dict[str, Any]:
        ran = readme(3)
        units = ["switch-agent.socket", "switch-agent"]
        return {"ran": [r["argv"] for r in ran],
                "active": {u: sh("systemctl", "is-active", u, check=False).stdout.strip() for u in units}}
    run.step("README step 3: systemctl enable --now switch-agent.socket switch-agent", enable)

    def login() -> dict[str, Any]:
        ran = readme(4, 0, portal="127.0.0.1", iqn=IQN)
        startup = sh("iscsiadm", "-m", "node", "-T", IQN, "-o", "show").stdout
        return {"ran": [r["argv"] for r in ran],
                "node.startup": sorted({line.split("=")[1].strip() for line in startup.splitlines()
                                        if line.startswith("node.startup")})}
    run.step("README step 4: node records (node.startup = automatic) and login", login)

    def wait_routed() -> dict[str, Any]:
        record = wait_for(routed, 300, "the volume to be routed over every member")
        ls = readme(4, 1)
        return {"wwid": record["wwid"], "device": record["device"], "generation": record["generation"],
                "ls": ls[0]["stdout"]}
    lun = run.step("routed", wait_routed)
    STATE.mkdir(parents=True, exist_ok=True)
    (STATE / "lun.json").write_text(json.dumps(lun))

    def filesystem() -> dict[str, Any]:
        dev = f"/dev/switch-agent/switch-{lun['wwid']}"
        wait_for(lambda: Path(dev).exists(), 60, dev)
        line = fill(README[5][0], wwid=lun["wwid"])
        if f" {MOUNTPOINT} " not in line:
            raise StepFailed(f"README step 5's fstab line does not mount {MOUNTPOINT}: {line!r}")
        with open("/etc/fstab", "a") as f:
            f.write(line)
        ran = readme(5, 1, wwid=lun["wwid"])
        source = sh("findmnt", "-n", "-o", "SOURCE", str(MOUNTPOINT)).stdout.strip()
        return {"fstab": line.strip(), "ran": [r["argv"] for r in ran], "source": source}
    run.step("README step 5: mkfs.ext4, fstab (_netdev), mount", filesystem)

    def files() -> dict[str, Any]:
        FILES.mkdir(parents=True, exist_ok=True)
        rng = random.Random(16)
        manifest = {}
        for i in range(24):
            data = rng.randbytes(rng.randrange(64 << 10, 4 << 20))
            (FILES / f"f{i:02d}").write_bytes(data)
            manifest[f"f{i:02d}"] = hashlib.sha256(data).hexdigest()
        sh("sync")
        (STATE / "manifest.json").write_text(json.dumps(manifest))
        return {"files": len(manifest), "mib": round(sum((FILES / n).stat().st_size for n in manifest) / 2**20, 1)}
    run.step("checksummed files", files)
    run.results["reboot_requested_uptime_s"] = float(Path("/proc/uptime").read_text().split()[0])
    run.results["reboot_requested_at"] = round(time.time(), 1)
    run.save()


# -- boot 2 --------------------------------------------------------------------------------------

def boot2(run: Run) -> None:
    lun = json.loads((STATE / "lun.json").read_text())
    wwid = lun["wwid"]
    run.step("system up (after the reboot)", system_state)

    def mounted() -> dict[str, Any]:
        # Nothing was done by hand: this is the first thing the runner does after the boot.
        found = json.loads(sh("findmnt", "-J", "-o", "SOURCE,FSTYPE,OPTIONS", str(MOUNTPOINT), check=False).stdout
                           or '{"filesystems": []}')["filesystems"]
        if not found:
            raise StepFailed(f"{MOUNTPOINT} is not mounted after the reboot")
        source = found[0]["source"]
        rdev = os.stat(source).st_rdev
        uuid = sh("dmsetup", "info", "-c", "--noheadings", "-o", "uuid", "-j", str(os.major(rdev)),
                  "-m", str(os.minor(rdev))).stdout.strip()
        if not uuid.startswith("SWAGENT-top-"):
            raise StepFailed(f"{MOUNTPOINT} is mounted from {source} (dm uuid {uuid!r}), not the routed device")
        mount_unit = sh("systemctl", "show", "-p", "ActiveState,ActiveEnterTimestampMonotonic",
                        "srv-volume.mount").stdout.split()
        record = wait_for(routed, 120, "the agent to report the volume routed")
        return {"source": source, "dm_uuid": uuid, "mount_unit": mount_unit, "generation": record["generation"],
                "uptime_s": float(Path("/proc/uptime").read_text().split()[0])}
    run.step("mounted through the routed device, no human action", mounted)

    def verify() -> dict[str, Any]:
        manifest = json.loads((STATE / "manifest.json").read_text())
        bad = [n for n, digest in manifest.items()
               if hashlib.sha256((FILES / n).read_bytes()).hexdigest() != digest]
        if bad:
            raise StepFailed(f"files differ after the reboot: {bad}")
        return {"verified": len(manifest)}
    run.step("every file verifies", verify)

    run.step("a window of I/O forwards nothing (after the reboot)", quiet_window)

    def restart_under_fio() -> dict[str, Any]:
        proc = fio("restart", size="48M", loops=3, background=True)
        target = MOUNTPOINT / "restart.fio"
        wait_for(lambda: target.exists() and target.stat().st_size > 0, 120, "fio to start writing")
        time.sleep(1.0)  # let fio write for a moment before the restart (not synchronisation)
        t = time.monotonic()
        sh("systemctl", "restart", "switch-agent", timeout=180)
        restarted = time.monotonic() - t
        still_running = proc.poll() is None
        wait_for(routed, 180, "the volume routed again after the restart")
        rc = proc.wait(timeout=900)
        result = fio_result("restart", rc)
        if not still_running:
            raise StepFailed(f"fio ended before the restart finished: the restart was not under I/O {result}")
        return {**result, "restart_s": round(restarted, 1), "fio_running_after_restart": still_running}
    run.step("systemctl restart switch-agent under fio verify=crc32c", restart_under_fio)

    def stop() -> dict[str, Any]:
        sh("systemctl", "stop", "switch-agent", timeout=120)
        active = sh("systemctl", "is-active", "switch-agent", check=False).stdout.strip()
        socket = sh("systemctl", "is-active", "switch-agent.socket", check=False).stdout.strip()
        if active == "active":
            raise StepFailed("switch-agent still active after stop")
        result = fio_result("stopped", fio("stopped", size="16M").returncode)
        still = sh("systemctl", "is-active", "switch-agent", check=False).stdout.strip()
        return {**result, "service": active, "socket": socket, "service_after_io": still}
    run.step("systemctl stop switch-agent: I/O goes on", stop)

    def trigger() -> dict[str, Any]:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() - 1))
        sh("udevadm", "control", "--log-level=debug")
        before = array("info")["generation"]
        moved = array("move", fraction=0.25)
        generation = array("info")["generation"]
        t = time.monotonic()
        # The unit attention reaches udev on each path's next command (multipathd's checker, 2 s).
        wait_for(lambda: sh("systemctl", "is-active", "switch-agent", check=False).stdout.strip() == "active",
                 180, "udev's trigger to start switch-agent through its socket")
        started_s = time.monotonic() - t
        record = wait_for(lambda: routed(generation), 300, f"the moved pages routed (generation {generation})")
        routed_s = time.monotonic() - t
        sh("udevadm", "control", "--log-level=info")
        args = ["journalctl", "--no-pager", "-o", "cat", f"--since={since}"]
        udev_lines = [line for line in sh(*args, "-u", "systemd-udevd").stdout.splitlines()
                      if "switch-agent trigger" in line]
        starts = [line for line in sh(*args, "-u", "switch-agent.service", "-u", "switch-agent.socket").stdout
                  .splitlines() if "Start" in line]
        # The daemon's own line for each trigger it received (one per udev RUN that reached it).
        daemon_lines = [line for line in sh(*args, "-u", "switch-agent.service").stdout.splitlines()
                        if "udev rule: trigger" in line]
        if not udev_lines:
            raise StepFailed("udev's log shows no `switch-agent trigger` after the move")
        details = {"generation_before": before, "generation": generation, "moved": moved,
                   "daemon_started_s": round(started_s, 1), "routed_s": round(routed_s, 1),
                   "record_generation": record["generation"],
                   "udev_trigger_lines": udev_lines[:6], "udev_trigger_count": len(udev_lines),
                   "service_starts": starts[:6], "daemon_trigger_lines": daemon_lines[:6]}
        details["quiet_after_move"] = quiet_window()
        return details
    run.step("a move's unit attention: udev's trigger starts the daemon, moved pages routed", trigger)

    def journal() -> dict[str, Any]:
        entries = [json.loads(line) for line in
                   sh("journalctl", "-u", "switch-agent", "-o", "json", "--no-pager").stdout.splitlines() if line]
        with_wwid = [e for e in entries if e.get("WWID") == wwid]
        fields = sorted({k for e in with_wwid for k in e if k.isupper() and not k.startswith("_")
                         and k not in ("MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER", "SYSLOG_FACILITY",
                                       "CODE_FILE", "CODE_LINE", "CODE_FUNC", "SYSLOG_PID")})
        by_wwid = sh("journalctl", "-u", "switch-agent", f"WWID={wwid}", "-o", "cat", "--no-pager").stdout
        boots = sorted({e.get("_BOOT_ID") for e in with_wwid})
        if not with_wwid:
            seen = sorted({str(e["WWID"]) for e in entries if "WWID" in e})
            raise StepFailed(f"no journal entry of switch-agent carries WWID={wwid} ({len(entries)} entries; "
                             f"WWIDs seen: {seen})")
        return {"entries": len(entries), "with_wwid": len(with_wwid), "fields": fields, "boots": len(boots),
                "example": with_wwid[-1].get("MESSAGE"), "members": sorted({e["MEMBER"] for e in with_wwid
                                                                             if "MEMBER" in e}),
                "journalctl_WWID_lines": len(by_wwid.splitlines())}
    run.step("journalctl -u switch-agent -o json: structured fields", journal)


def collect() -> None:
    """The guest's own records, for whoever reads the results."""
    for name, argv in {"journal.txt": ["journalctl", "-b", "--no-pager", "-o", "short-monotonic"],
                       "journal-all-switch-agent.json": ["journalctl", "-u", "switch-agent", "-o", "json",
                                                         "--no-pager"],
                       "dmesg.txt": ["dmesg"],
                       "dmsetup.txt": ["dmsetup", "table"],
                       "devices.txt": ["sh", "-c", "cat /proc/devices; systemctl show switch-agent "
                                       "-p DevicePolicy -p DeviceAllow -p ActiveState -p NRestarts"],
                       "emulator.log": ["journalctl", "-b", "-u", "swemu", "--no-pager"]}.items():
        try:
            (OUT / f"boot{boot_number()}-{name}").write_text(sh(*argv, check=False, timeout=120).stdout)
        except Exception as exc:  # a record we could not take is not a reason to hang the guest
            log(f"collect {name}: {exc}")


def boot_number() -> int:
    path = STATE / "boot"
    return int(path.read_text()) if path.exists() else 0


def main() -> int:
    STATE.mkdir(parents=True, exist_ok=True)
    boot = boot_number() + 1
    (STATE / "boot").write_text(str(boot))
    run = Run(boot)
    ok = False
    try:
        if boot == 1:
            boot1(run)
        elif boot == 2:
            boot2(run)
        ok = True
    except StepFailed as exc:
        log(f"boot {boot}: stopped at {exc}")
    except Exception:
        log(traceback.format_exc())
    finally:
        collect()
        run.results[f"boot{boot}_ok"] = ok
        run.save()
    if ok and boot == 1:
        log("rebooting")
        subprocess.run(["systemctl", "reboot"])
    else:
        log("powering off")
        subprocess.run(["systemctl", "poweroff"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
