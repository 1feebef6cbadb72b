"""Guest side of the VM rig: runs as root inside the virtme-ng guest.

Started by tests/vm/run.py (host side) as
    <venv python> tests/vm/guest_init.py <results dir>
where <results dir> is the host directory shared read-write with the guest
and already holds config.json.  Only the standard library is used here.

Sequence (every wait polls against a deadline):
  1. load the kernel modules, mount configfs, make sure udevd runs;
  2. loopback portal addresses 127.0.0.2..N, iscsid (tuned for tests),
     multipathd (find_multipaths no + tests/array/multipath.conf);
  3. `python -m tests.array up ...` and, unless --no-login, `... login`
     (`--member 0` with --login first), then wait until multipathd has built
     a map with N active paths (1 with --login first);
  4. run COMMAND from the repository root, streaming its output;
  5. tear down in the order that does not hang: non-multipath dm devices,
     multipath -F, `python -m tests.array down` (logout, portals), any
     leftover iSCSI session, then multipathd and iscsid;
  6. save dmesg and write status.json (COMMAND's exit status, timings, and
     on a rig failure the stage and message).

Nothing leaves the guest except through <results dir>.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

MODULES = [
    "configfs", "target_core_mod", "iscsi_target_mod", "target_core_user",
    "target_core_file", "dm-mod", "dm-switch", "dm-multipath",
    "dm-round-robin", "dm-queue-length", "iscsi_tcp", "sg", "uio",
]

# The emulator's run directory (its control socket and emulator.log); guest-only.
EMU_RUN_DIR = Path("/run/switch-agent-emu")

INITIATOR_IQN = "iqn.2026-11.org.example.switch-agent:vm-initiator"

# Tuned for tests: fail a dead path in seconds, not minutes.
ISCSID_CONF = """\
# written by switch-agent tests/vm/guest_init.py
iscsid.startup = /usr/sbin/iscsid
node.startup = manual
node.leading_login = No
node.session.timeo.replacement_timeout = 5
node.conn[0].timeo.login_timeout = 5
node.conn[0].timeo.logout_timeout = 5
node.conn[0].timeo.noop_out_interval = 2
node.conn[0].timeo.noop_out_timeout = 2
node.session.err_timeo.abort_timeout = 5
node.session.err_timeo.lu_reset_timeout = 5
node.session.err_timeo.tgt_reset_timeout = 5
node.session.initial_login_retry_max = 2
node.session.cmds_max = 128
node.session.queue_depth = 32
node.session.xmit_thread_priority = -20
node.session.iscsi.InitialR2T = No
node.session.iscsi.ImmediateData = Yes
node.session.iscsi.FirstBurstLength = 262144
node.session.iscsi.MaxBurstLength = 16776192
node.conn[0].iscsi.MaxRecvDataSegmentLength = 262144
node.conn[0].iscsi.MaxXmitDataSegmentLength = 0
discovery.sendtargets.iscsi.MaxRecvDataSegmentLength = 32768
node.session.nr_sessions = 1
node.session.auth.authmethod = None
discovery.sendtargets.auth.authmethod = None
node.session.scan = auto
"""

MULTIPATH_CONF_HEAD = """\
# written by switch-agent tests/vm/guest_init.py
defaults {
    find_multipaths no
    user_friendly_names no
    polling_interval 2
}
"""


class RigError(Exception):
    """The rig itself failed (not COMMAND)."""


class Rig:
    def __init__(self, results: Path):
        self.results = results
        self.cfg = json.loads((results / "config.json").read_text())
        self.repo = Path(self.cfg["repo"])
        self.venv_bin = Path(self.cfg["venv_bin"])
        self.python = str(self.venv_bin / "python")
        self.members = int(self.cfg["members"])
        # --login first: only member 0's portal (the group login); the map has that one path.
        self.login_first = self.cfg.get("login", "all") == "first"
        self.map_paths = 1 if self.login_first else self.members
        self.t0 = time.monotonic()
        self.timings: dict[str, float] = {}
        self.stage = "start"
        self.procs: dict[str, subprocess.Popen] = {}
        self.array_present = (self.repo / "tests" / "array" / "__main__.py").is_file()
        self.array_module = "tests.array"  # what `down` is run from (--array lio-referrals changes it)
        self.array_state = "absent" if not self.array_present else "not started"
        self.mpath: dict[str, str] = {}
        self.work = Path("/tmp/switch-agent-vm")  # guest-only (overlay on /tmp)
        self.work.mkdir(parents=True, exist_ok=True)
        self.home = self.work / "home"
        self.home.mkdir(exist_ok=True)
        self.rig_log = open(results / "rig.log", "a", buffering=1)

    # --- output -------------------------------------------------------------
    def say(self, msg: str) -> None:
        line = f"vm-rig: [{time.monotonic() - self.t0:6.1f}s] {msg}"
        print(line, flush=True)
        self.rig_log.write(line + "\n")

    def mark(self, name: str) -> None:
        self.timings[name] = round(time.monotonic() - self.t0, 2)

    # --- helpers ------------------------------------------------------------
    def env(self) -> dict[str, str]:
        env = {
            "PATH": f"{self.venv_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(self.home),
            "TARGETCLI_HOME": str(self.home / ".targetcli"),
            "TERM": os.environ.get("TERM", "dumb"),
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",  # the repository is read-only here
            "PYTHONUNBUFFERED": "1",
            # A crash prints every thread's Python stack to stderr, not just "segfault" in dmesg.
            "PYTHONFAULTHANDLER": "1",
            # Under QEMU TCG the agent (64 LUNs, 13:16 run) died in numpy's AVX2 code: a vpmaskmovq
            # faulted on the page after a buffer, where a real CPU suppresses faults of masked-off
            # lanes. The guest's numpy keeps to its SSE paths; hosts with real CPUs are not affected.
            "NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR",  # numpy 2.4: AVX2 and up
            "PYTEST_ADDOPTS": "-p no:cacheprovider",
            "HYPOTHESIS_STORAGE_DIRECTORY": str(self.work / "hypothesis"),
            "SWITCH_AGENT_VM": "1",
            "SWITCH_AGENT_RESULTS": str(self.results),
            "SWITCH_AGENT_LOG_DIR": str(self.results),
            "SWITCH_AGENT_MEMBERS": str(self.members),
            "SWITCH_AGENT_LOGIN": str(self.cfg.get("login", "all")),
            "SWITCH_AGENT_LUNS": str(self.cfg.get("luns", 1)),
            "SWITCH_AGENT_LAYOUT": str(self.cfg["layout"]),
            "SWITCH_AGENT_SIZE": str(self.cfg["size"]),
            "SWITCH_AGENT_PAGE_SIZE": str(self.cfg["page_size"]),
            "SWITCH_AGENT_ARRAY": self.array_state,
            "SWITCH_AGENT_ARRAY_KIND": str(self.cfg.get("array", "emulator")),
            "SWITCH_AGENT_LBA_MAP": str(self.cfg.get("lba_map", "")),
            "SWEMU_RUN_DIR": str(EMU_RUN_DIR),
        }
        for k, v in self.mpath.items():
            env[k] = v
        return env

    def run(self, argv: list[str], timeout: float, log: str | None = None,
            check: bool = True, what: str | None = None) -> subprocess.CompletedProcess:
        """Run argv with a deadline; output to results/<log> (appended) or captured."""
        what = what or " ".join(argv)
        out = open(self.results / log, "ab") if log else subprocess.PIPE
        try:
            if log:
                out.write(f"\n$ {' '.join(argv)}\n".encode())
                out.flush()
            p = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, timeout=timeout,
                               cwd=self.repo, env=self.env())
        except subprocess.TimeoutExpired:
            raise RigError(f"{what}: still running after {timeout:.0f} s") from None
        except OSError as e:
            raise RigError(f"{what}: {e}") from None
        finally:
            if log:
                out.close()
        if check and p.returncode != 0:
            tail = ""
            if p.stdout:
                tail = "\n" + p.stdout.decode(errors="replace")[-2000:]
            elif log:
                tail = f" (see {log})"
            raise RigError(f"{what}: exit status {p.returncode}{tail}")
        return p

    def wait_for(self, what: str, pred, timeout: float, interval: float = 0.2):
        deadline = time.monotonic() + timeout
        while True:
            v = pred()
            if v:
                return v
            if time.monotonic() >= deadline:
                raise RigError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(interval)  # polling interval, bounded by the deadline above

    def daemon(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.results / f"{name}.log", "ab")
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, env=self.env(),
                             start_new_session=True)
        log.close()
        self.procs[name] = p
        return p

    def check_alive(self, name: str) -> None:
        p = self.procs[name]
        if p.poll() is not None:
            raise RigError(f"{name} exited with status {p.returncode} (see {name}.log)")

    # --- stages ---------------------------------------------------------------
    def cached_view(self) -> None:
        """Mount the host's extra read-only share with cache=loose and bind it
        over the repository, the venv and Python's prefix (see run.py
        python_paths).  Optional: without it everything works, only slower."""
        tag = self.cfg.get("cached_tag")
        if not tag:
            return
        self.stage = "cached view"
        tags = []
        for t in Path("/sys/bus/virtio/drivers/9pnet_virtio").glob("virtio*/mount_tag"):
            with contextlib.suppress(OSError):
                tags.append(t.read_text().strip("\0\n "))
        if tag not in tags:
            self.say(f"no 9p share {tag!r} (tags {tags}): Python runs from the uncached root")
            return
        results = str(self.results)
        inside = [p for p in self.cfg["cached_paths"] if results == p or results.startswith(p + "/")]
        if inside:
            # A bind over it would hide the results share mounted inside it.
            self.say(f"results dir inside {inside[0]}: not using the cached view")
            return
        top = Path("/run/swagent-ro")
        top.mkdir(parents=True, exist_ok=True)
        try:
            self.run(["mount", "-t", "9p", "-o",
                      "ro,trans=virtio,version=9p2000.L,cache=loose,access=any,msize=524288",
                      tag, str(top)], timeout=30, what="mount the cached share")
            for path in self.cfg["cached_paths"]:
                self.run(["mount", "--bind", f"{top}{path}", path], timeout=10)
        except RigError as e:
            self.say(f"cached view not (fully) available ({e}): Python runs from the uncached root")
            return
        self.say("cached read-only view of " + ", ".join(self.cfg["cached_paths"]))
        self.mark("cached_view")

    def kernel(self) -> None:
        self.stage = "modules"
        self.run(["modprobe", "-a", *MODULES], timeout=60, log="rig-commands.log",
                 what="modprobe " + " ".join(MODULES))
        if not os.path.ismount("/sys/kernel/config"):
            self.run(["mount", "-t", "configfs", "none", "/sys/kernel/config"], timeout=10)
        self.wait_for("/sys/kernel/config/target", lambda: Path("/sys/kernel/config/target").is_dir(), 10)
        self.wait_for("/dev/mapper/control", lambda: Path("/dev/mapper/control").exists(), 10)

        self.stage = "udevd"
        if not pids_named("systemd-udevd"):
            self.say("udevd not running: starting systemd-udevd")
            udevd = shutil.which("systemd-udevd") or "/lib/systemd/systemd-udevd"
            self.run([udevd, "--daemon"], timeout=20)
            self.wait_for("udevd", lambda: pids_named("systemd-udevd"), 10)
            self.run(["udevadm", "trigger", "--action=add"], timeout=30)
        else:
            self.say("udevd already running")
        self.run(["udevadm", "settle", "-t", "30"], timeout=40, log="rig-commands.log")
        self.mark("modules_udev")

    def network(self) -> None:
        self.stage = "network"
        self.run(["ip", "link", "set", "lo", "up"], timeout=10)
        have = self.run(["ip", "-4", "-o", "addr", "show", "dev", "lo"], timeout=10).stdout.decode()
        for m in range(2, self.members + 1):
            addr = f"127.0.0.{m}"
            if f"inet {addr}/" not in have:
                self.run(["ip", "addr", "add", f"{addr}/8", "dev", "lo"], timeout=10)
        self.say(f"portal addresses 127.0.0.1..{self.members} on lo")

    def iscsid(self) -> None:
        self.stage = "iscsid"
        etc = Path("/etc/iscsi")
        etc.mkdir(exist_ok=True)
        (etc / "initiatorname.iscsi").write_text(f"InitiatorName={INITIATOR_IQN}\n")
        (etc / "iscsid.conf").write_text(ISCSID_CONF)
        Path("/run/lock/iscsi").mkdir(parents=True, exist_ok=True)
        Path("/etc/target").mkdir(exist_ok=True)  # rtslib-fb refuses to start without its dbroot
        self.daemon("iscsid", ["iscsid", "-f", "-n"])
        # iscsid listens on an abstract unix socket; poll for it.
        def listening():
            self.check_alive("iscsid")
            return "@ISCSIADM_ABSTRACT_NAMESPACE" in Path("/proc/net/unix").read_text()
        self.wait_for("iscsid's control socket", listening, 20)
        self.say("iscsid running")

    def multipathd(self) -> None:
        self.stage = "multipathd"
        conf = MULTIPATH_CONF_HEAD
        extra = self.repo / "tests" / "array" / "multipath.conf"
        if extra.is_file():
            conf += f"# from {extra}\n" + extra.read_text()
            self.say(f"multipath.conf: defaults + {extra.relative_to(self.repo)}")
        else:
            self.say("multipath.conf: defaults only (no tests/array/multipath.conf)")
        Path("/etc/multipath").mkdir(exist_ok=True)
        Path("/etc/multipath.conf").write_text(conf)
        (self.results / "multipath.conf").write_text(conf)
        self.daemon("multipathd", ["multipathd", "-d", "-s", "-v3"])

        def ready():
            self.check_alive("multipathd")
            p = subprocess.run(["multipathd", "show", "daemon"], capture_output=True,
                               timeout=10, stdin=subprocess.DEVNULL)
            # "pid 123 idle" / "pid 123 running" once it has configured itself
            return p.returncode == 0 and re.match(rb"pid \d+ (idle|running)", p.stdout)
        self.wait_for("multipathd to answer 'show daemon' with idle or running", ready, 30, 0.3)
        self.say("multipathd running")

    def array_up(self) -> None:
        self.stage = "array up"
        c = self.cfg
        if c.get("array", "emulator") == "lio-referrals":
            return self.lio_referrals_up()
        if not self.array_present:
            self.say("tests/array/__main__.py absent: SKIPPING array up/login/down "
                     "(the emulator is not in this tree yet)")
            return
        self.array_state = "starting"
        self.run([self.python, "-m", "tests.array", "up", "--members", str(self.members),
                  "--layout", str(c["layout"]), "--size", str(c["size"]),
                  "--page-size", str(c["page_size"]), *self.luns_args()],
                 timeout=c["array_timeout"], log="array.log", what="python -m tests.array up")
        self.array_state = "up"
        self.mark("array_up")
        self.say("array up")
        if c["no_login"]:
            self.say("--no-login: not logging in")
            return
        self.stage = "array login"
        first = ["--member", "0"] if self.login_first else []
        self.run([self.python, "-m", "tests.array", "login", *first], timeout=c["array_timeout"],
                 log="array.log", what="python -m tests.array login " + " ".join(first))
        self.array_state = "logged-in"
        self.mark("array_login")
        self.say("logged in; waiting for the multipath map")
        self.wait_for_map()

    def wait_for_map(self) -> None:
        """After the login: multipathd's map with a path to every member, and udev settled."""
        self.stage = "multipath map"
        m = self.wait_for(f"a multipath map (dm uuid mpath-*) with {self.map_paths} active paths",
                          self.find_map, self.cfg["map_timeout"], 0.5)
        self.run(["udevadm", "settle", "-t", "30"], timeout=40, log="rig-commands.log")
        self.mpath = m
        self.mark("map_ready")
        self.say(f"map ready: {m['SWITCH_AGENT_MPATH_NAME']} ({m['SWITCH_AGENT_MPATH_DEV']}) "
                 f"over {m['SWITCH_AGENT_MPATH_PATHS']}")

    def luns_args(self) -> list[str]:
        """`--luns N` for tests.array up, only when more than one (older emulators lack the flag)."""
        luns = int(self.cfg.get("luns", 1))
        return ["--luns", str(luns)] if luns > 1 else []

    def lio_referrals_up(self) -> None:
        """--array lio-referrals: LIO's own fileio LUN with an lba_map instead of the emulator."""
        c = self.cfg
        module = [self.python, "-m", "tests.array.lio_referrals"]
        self.array_module = "tests.array.lio_referrals"
        self.array_state = "starting"
        self.run([*module, "up", "--members", str(self.members), "--size", str(c["size"]),
                  "--lba-map", str(c["lba_map"])], timeout=c["array_timeout"], log="array.log",
                 what="python -m tests.array.lio_referrals up")
        self.array_state = "up"
        self.mark("array_up")
        self.say(f"LIO referrals array up (lba_map {c['lba_map']})")
        if c["no_login"]:
            self.say("--no-login: not logging in")
            return
        self.stage = "array login"
        first = ["--first"] if self.login_first else []
        self.run([*module, "login", *first], timeout=c["array_timeout"], log="array.log",
                 what="python -m tests.array.lio_referrals login " + " ".join(first))
        self.array_state = "logged-in"
        self.mark("array_login")
        self.wait_for_map()

    def find_map(self):
        self.check_alive("multipathd")
        for dm in sorted(Path("/sys/block").glob("dm-*")):
            try:
                uuid = (dm / "dm" / "uuid").read_text().strip()
                name = (dm / "dm" / "name").read_text().strip()
            except OSError:
                continue
            if not uuid.startswith("mpath-"):
                continue
            slaves = sorted(p.name for p in (dm / "slaves").iterdir())
            if len(slaves) != self.map_paths:
                continue
            st = subprocess.run(["dmsetup", "status", name], capture_output=True, text=True,
                                timeout=10, stdin=subprocess.DEVNULL).stdout
            if len(re.findall(r"\b\d+:\d+ A\b", st)) != self.map_paths:
                continue
            return {
                "SWITCH_AGENT_MPATH_NAME": name,
                "SWITCH_AGENT_MPATH_UUID": uuid,
                "SWITCH_AGENT_MPATH_DEV": f"/dev/{dm.name}",
                "SWITCH_AGENT_MPATH_PATHS": " ".join(f"/dev/{s}" for s in slaves),
            }
        return None

    def command(self) -> int:
        self.stage = "command"
        argv = self.cfg["command"]
        env = self.env()
        self.say(f"ready; running: {' '.join(argv)}")
        self.mark("ready")
        timeout = float(self.cfg["timeout"])
        log = open(self.results / "command.log", "wb")
        try:
            p = subprocess.Popen(argv, cwd=self.repo, env=env, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        except OSError as e:
            log.write(f"cannot run {argv}: {e}\n".encode())
            log.close()
            self.say(f"cannot run {argv[0]}: {e}")
            return 127
        deadline = time.monotonic() + timeout
        fd = p.stdout.fileno()
        timed_out = False
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            r, _, _ = select.select([fd], [], [], min(left, 5.0))
            if r:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                log.write(chunk)
        if timed_out:
            self.say(f"COMMAND still running after {timeout:.0f} s: killing it (status 124)")
            kill_group(p)
            p.wait()
            rc = 124
        else:
            rc = p.wait()
        log.close()
        self.mark("command_done")
        self.say(f"command exit status {rc}")
        return rc

    def teardown(self) -> list[str]:
        """Best effort, each step bounded; returns the problems met."""
        problems: list[str] = []

        def step(what, fn):
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - teardown goes on regardless
                problems.append(f"{what}: {e}")
                self.say(f"teardown: {what}: {e}")

        def sh(argv, timeout=60, check=True):
            return self.run(argv, timeout=timeout, log="teardown.log", check=check)

        self.say("teardown")
        have_dm = Path("/dev/mapper/control").exists()
        mpathd = self.procs.get("multipathd")
        if have_dm:
            # Make I/O on path-less maps fail instead of queueing forever.
            if mpathd and mpathd.poll() is None:
                step("multipathd disablequeueing", lambda: sh(["multipathd", "disablequeueing", "maps"], 20, False))

            def remove_others():
                # Devices COMMAND left behind (e.g. a dm-switch stacked on the map).
                for _ in range(3):
                    others = [n for n, u in dm_devices() if not u.startswith("mpath-")]
                    if not others:
                        return
                    for n in others:
                        sh(["dmsetup", "remove", "--retry", n], 30, False)
                others = [n for n, u in dm_devices() if not u.startswith("mpath-")]
                if others:
                    for n in others:
                        sh(["dmsetup", "remove", "--force", n], 30, False)
                    raise RigError(f"had to force-remove dm devices: {others}")
            step("remove non-multipath dm devices", remove_others)

            def flush():
                sh(["multipath", "-F"], 60, False)
                left = [n for n, u in dm_devices() if u.startswith("mpath-")]
                if left:
                    raise RigError(f"multipath maps still present: {left}")
            step("multipath -F", flush)

        if self.array_present and self.array_state not in ("absent", "not started"):
            def down():
                try:
                    self.run([self.python, "-m", self.array_module, "down"],
                             timeout=self.cfg["array_timeout"], log="array.log",
                             what=f"python -m {self.array_module} down")
                except RigError as e:
                    # e.g. the server died: delete what it left in LIO anyway.
                    self.run([self.python, "-m", self.array_module, "down", "--force"],
                             timeout=self.cfg["array_timeout"], log="array.log", check=False)
                    raise e
            step("python -m tests.array down", down)

        def sessions_left():
            if not (self.procs.get("iscsid") and self.procs["iscsid"].poll() is None):
                return
            p = self.run(["iscsiadm", "-m", "session"], timeout=20, check=False)
            if p.returncode == 0 and p.stdout.strip():
                sh(["iscsiadm", "-m", "node", "--logoutall=all"], 60, False)
                raise RigError("iSCSI sessions were still open after array down: logged them out")
        step("leftover iSCSI sessions", sessions_left)

        for name in ("multipathd", "iscsid"):
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            step(f"stop {name}", lambda p=p, name=name: stop(p, name))
        return problems

    def save_logs(self) -> None:
        try:
            out = subprocess.run(["dmesg"], capture_output=True, timeout=20).stdout
            (self.results / "dmesg.log").write_bytes(out)
        except Exception as e:  # noqa: BLE001
            self.say(f"could not save dmesg: {e}")
        emu_log = EMU_RUN_DIR / "emulator.log"
        if emu_log.is_file():
            try:
                shutil.copyfile(emu_log, self.results / "emulator.log")
            except OSError as e:
                self.say(f"could not copy {emu_log}: {e}")


def pids_named(comm: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "comm").read_text().strip() == comm:
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def dm_devices() -> list[tuple[str, str]]:
    devs = []
    for dm in Path("/sys/block").glob("dm-*"):
        try:
            devs.append(((dm / "dm" / "name").read_text().strip(),
                         (dm / "dm" / "uuid").read_text().strip()))
        except OSError:
            pass
    return devs


def kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop(p: subprocess.Popen, name: str) -> None:
    p.terminate()
    try:
        p.wait(timeout=15)
    except subprocess.TimeoutExpired:
        kill_group(p)
        p.wait(timeout=10)
        raise RigError(f"{name} ignored SIGTERM for 15 s: killed") from None


def write_status(results: Path, status: dict) -> None:
    tmp = results / "status.json.tmp"
    tmp.write_text(json.dumps(status, indent=2) + "\n")
    tmp.rename(results / "status.json")


def main() -> int:
    results = Path(sys.argv[1])
    rig = Rig(results)
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    rig.say(f"guest up: kernel {os.uname().release}, uptime {uptime:.1f} s")
    status: dict = {"rig_ok": False, "command_rc": None, "guest_uptime_at_start": uptime}
    rc = None
    try:
        rig.cached_view()
        rig.kernel()
        rig.network()
        rig.iscsid()
        rig.multipathd()
        rig.mark("services")
        rig.array_up()
        rc = rig.command()
        status["rig_ok"] = True
    except RigError as e:
        status["error"] = f"{rig.stage}: {e}"
        rig.say(f"RIG FAILURE in stage '{rig.stage}': {e}")
    except Exception:  # noqa: BLE001 - a bug in the rig is a rig failure too
        status["error"] = f"{rig.stage}: {traceback.format_exc()}"
        rig.say(f"RIG FAILURE in stage '{rig.stage}':\n{traceback.format_exc()}")
    finally:
        try:
            status["teardown_problems"] = rig.teardown()
        except Exception:  # noqa: BLE001
            status["teardown_problems"] = [traceback.format_exc()]
        rig.mark("teardown_done")
        rig.save_logs()
        status["command_rc"] = rc
        status["stage"] = rig.stage
        status["array"] = rig.array_state
        status["timings"] = rig.timings
        write_status(results, status)
        rig.say("done")
    return rc if status["rig_ok"] and rc is not None else 125


if __name__ == "__main__":
    sys.exit(main())
