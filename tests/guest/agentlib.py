"""What the agent's guest tests and the demo share: the daemon, the array, dm devices, I/O.

Only for use inside the VM rig (root, real kernel, the emulated array up).
"""

from __future__ import annotations

import json
import mmap
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from agent import control as agent_control
from tests.array import control as array_control

MIB = 1 << 20
RESULTS = Path(os.environ.get("SWITCH_AGENT_RESULTS", "/tmp"))


def skip_unless_emulated_array_rig() -> None:
    """Skip (for host runs of the guest suite) unless root, device-mapper and the emulated array are here."""
    import pytest

    if os.geteuid() != 0 or not Path("/dev/mapper/control").exists():
        pytest.skip("needs root and device-mapper (runs in the VM rig)")
    if not array_control.server_running(array_control.run_dir()):
        pytest.skip("no emulated array is up (runs in the VM rig)")


def array(op: str, **args):
    """The emulator's control socket, in-process (100 subprocesses cost minutes under TCG)."""
    return array_control.request(array_control.run_dir(), op, **args)


def array_info() -> dict:
    """`python -m tests.array info --json`: the server's view plus paths and the multipath map."""
    out = subprocess.run([sys.executable, "-m", "tests.array", "info", "--json"], check=True,
                         capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout)


def agent_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.cli", "--config", str(CONFIG), *args],
                          capture_output=True, text=True, timeout=300, check=check)


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


CONFIG = Path("/tmp/switch-agent-test/switch-agent.toml")
SOCKET = Path("/tmp/switch-agent-test/run/control.sock")


def status() -> list[dict]:
    try:
        return agent_control.request(SOCKET, {"command": "status"}, timeout_s=30)
    except agent_control.ControlError:
        return []


def our_uuids() -> dict[str, str]:
    """name -> uuid of every dm device with our uuid prefix (dmsetup: an independent reader)."""
    out = subprocess.run(["dmsetup", "info", "-c", "--noheadings", "-o", "name,uuid", "--separator", " "],
                         capture_output=True, text=True, check=True).stdout
    pairs = (line.split() for line in out.splitlines())
    return {p[0]: p[1] for p in pairs if len(p) == 2 and p[1].startswith("SWAGENT-")}


def our_devices() -> dict[str, str]:
    """name -> table of every dm device with our uuid prefix."""
    return {n: subprocess.run(["dmsetup", "table", n], capture_output=True, text=True, check=True).stdout
            for n in our_uuids()}


def remove_our_devices() -> None:
    """Top first, then switches, then legs: each is held by the one above."""
    order = {"top": 0, "sw": 1, "leg": 2}
    for name, uuid in sorted(our_uuids().items(), key=lambda kv: order[kv[1].split("-")[1]]):
        subprocess.run(["dmsetup", "remove", "--retry", name], check=False)


def install_udev_rule() -> None:
    """Our udev rule, its RUN commands made harmless: the guest has no /usr/bin/switch-agent."""
    rule = (Path(__file__).resolve().parents[2] / "packaging" / "90-switch-agent.rules").read_text()
    Path("/etc/udev/rules.d/90-switch-agent.rules").write_text(rule.replace("/usr/bin/switch-agent", "/bin/true"))
    subprocess.run(["udevadm", "control", "--reload"], check=True)



class AgentDaemon:
    """`switch-agent daemon` as a child process with a test config and its log in the results."""

    def __init__(self, *, poll_interval_s: float = 600.0, log_level: str = "debug",
                 extra_config: str = "") -> None:
        CONFIG.parent.mkdir(parents=True, exist_ok=True)
        # Tests that log in to members by hand keep the daemon's session keeping off; the
        # session scenarios say manage_sessions = true in their extra_config.
        sessions = "" if "manage_sessions" in extra_config else "manage_sessions = false\n"
        CONFIG.write_text(f'socket_path = "{SOCKET}"\npoll_interval_s = {poll_interval_s}\ndebounce_s = 0.3\n'
                          f'retry_initial_s = 0.5\nretry_max_s = 2.0\nlog_level = "{log_level}"\n' + sessions
                          + extra_config)
        self.log_path = RESULTS / "switch-agent.log"
        self._log = open(self.log_path, "a")
        self.proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "--config", str(CONFIG), "daemon"],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        # The socket answering, not merely existing: a daemon killed with -9 leaves its file behind.
        wait_for(lambda: self._answers() or self.proc.poll() is not None, 60, "the control socket")
        if self.proc.poll() is not None:
            raise RuntimeError(f"the daemon exited: {self.log_path.read_text()[-3000:]}")

    @staticmethod
    def _answers() -> bool:
        try:
            agent_control.request(SOCKET, {"command": "status"}, timeout_s=5)
        except (agent_control.ControlError, OSError):
            return False
        return True

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind, as after a crash or the OOM killer."""
        self.proc.kill()
        self.proc.wait(timeout=60)
        self._log.close()

    def stop(self) -> int:
        """SIGTERM, and the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        status = self.proc.wait(timeout=60)
        self._log.close()
        return status


def login_and_wait_routed(timeout_s: float = 60.0) -> tuple[dict, float]:
    """Log in to every member; return the routed LUN's status and the seconds it took after login."""
    subprocess.run([sys.executable, "-m", "tests.array", "login"], check=True, timeout=300)
    logged_in = time.monotonic()
    members = len(array("info")["members"])

    def fully_routed():
        return next((s for s in status() if s["state"] == "routed" and len(s["members"]) == members
                     and all(m["paths"] for m in s["members"])), None)

    record = wait_for(fully_routed, timeout_s, "the LUN to be routed with a path to every member")
    return record, time.monotonic() - logged_in


def random_io(device: str, page_bytes: int, pages: int, *, total_bytes: int = 64 * MIB, seed: int = 1) -> None:
    """Write `total_bytes` in 1 MiB pieces at random page starts with O_DIRECT, read back, compare."""
    rng = random.Random(seed)
    count = total_bytes // MIB
    starts = rng.sample(range(pages), count) if pages >= count else [rng.randrange(pages) for _ in range(count)]
    fd = os.open(device, os.O_RDWR | os.O_DIRECT)
    try:
        buf, back = mmap.mmap(-1, MIB), mmap.mmap(-1, MIB)
        written = {}
        for page in starts:
            data = rng.randbytes(MIB)
            buf[:] = data
            assert os.pwritev(fd, [buf], page * page_bytes) == MIB
            written[page] = data
        for page, data in written.items():
            assert os.preadv(fd, [back], page * page_bytes) == MIB
            assert back[:] == data, f"page {page} read back different data"
    finally:
        os.close(fd)
    # Closing a device opened for writing makes udev probe it (blkid): let that finish
    # before anyone reads the array's counters.
    subprocess.run(["udevadm", "settle", "--timeout=60"], check=False)


def forwarded_share(stats: dict) -> tuple[int, int]:
    """(direct bytes, forwarded bytes) over every member."""
    members = stats["members"].values()
    return sum(m["direct_bytes"] for m in members), sum(m["forwarded_bytes"] for m in members)


def quiesce() -> None:
    """Let the array's pending unit attentions and udev's reactions to them finish.

    A unit attention makes the kernel rescan the path and udev probe the
    disks, multipathd's map among them, whose reads the array forwards: do
    that before counters are reset, not in the middle of a measurement.
    """
    for member in array_info()["members"]:
        for path in member["paths"]:
            for _ in range(3):  # one unit attention per change may be queued
                subprocess.run(["sg_turs", path], capture_output=True, check=False)
    subprocess.run(["udevadm", "settle", "--timeout=60"], check=False)

