"""Host side of the real-kernel VM rig.

    python -m tests.vm.run [--members N] [--luns N] [--layout striped|random|seed]
        [--size BYTES] [--page-size BYTES] [--login all|first] [--no-login] [--timeout S]
        [--array emulator|lio-referrals] [--lba-map SPEC]
        [--memory 2G] [--results DIR] -- COMMAND [ARGS...]

Boots the newest /boot/vmlinuz-* (Debian's linux-image-amd64, not the host's
running kernel) with virtme-ng under TCG, runs tests/vm/guest_init.py in the
guest (kernel modules, udevd, iscsid, multipathd, the emulated array via
`python -m tests.array`, the multipath map), then COMMAND from the repository
root, and exits with COMMAND's exit status.  If the rig itself fails (missing
tools, boot, modules, daemons, array, map wait) it exits 125 and prints the
tails of the guest's logs.  Every boot holds /tmp/switch-agent-vm.lock, so
concurrent rigs on one machine take turns.  When QEMU itself aborts before
the guest started COMMAND (a QEMU 7.2 TCG assertion), it boots again, up to 3
tries, and records the aborts in timings.json (qemu_aborts_at_boot).

Installs nothing: `sh tests/vm/setup.sh` does.  Environment:
  SWITCH_AGENT_VM_KVM=1      try KVM instead of TCG (KVM fails on the
                             project's machines: "failed to set MSR 0x10a")
  SWITCH_AGENT_VM_KERNEL=P   boot this vmlinuz instead of the newest one
  SWITCH_AGENT_VM_LOCK=P     lock file (default /tmp/switch-agent-vm.lock)
  SWITCH_AGENT_VM_NO_CACHE=1 do not give the guest the cached view of the
                             repository and Python (see python_paths)
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agent.sizes import size_argument
from tests.vm import guest_kernels

REPO = Path(__file__).resolve().parents[2]
GUEST_INIT = Path(__file__).resolve().with_name("guest_init.py")
LOCK = os.environ.get("SWITCH_AGENT_VM_LOCK", "/tmp/switch-agent-vm.lock")
RIG_FAILURE = 125
LOG_TAILS = ["rig.log", "dmesg.log", "array.log", "emulator.log", "multipathd.log",
             "iscsid.log", "rig-commands.log", "teardown.log"]



class Terminated(Exception):
    """SIGTERM or SIGHUP while the VM runs."""


parse_size = size_argument(minimum=1, largest="T")
"""'1073741824', '1G', '15M', '15MiB' -> bytes (binary multiples)."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tests.vm.run",
        description="Boot the real-kernel VM rig and run COMMAND inside it.",
        epilog="Exit status: COMMAND's, or 125 when the rig itself failed.")
    p.add_argument("--members", type=int, default=2, help="array members = portals = paths (default 2)")
    p.add_argument("--layout", default="striped", choices=["striped", "random", "seed"],
                   help="page layout of the emulated volume (default striped)")
    p.add_argument("--size", type=parse_size, default=64 * 15 << 20,
                   help="volume size in bytes, K/M/G/T suffixes allowed (default 960M = 64 pages)")
    p.add_argument("--page-size", type=parse_size, default=15 << 20,
                   help="page size in bytes (default 15M)")
    p.add_argument("--luns", type=int, default=1,
                   help="volumes the array serves, each LUN i of every member (default 1); "
                        "the rig waits for LUN 0's map only")
    p.add_argument("--array", default="emulator", choices=["emulator", "lio-referrals"],
                   help="emulator: the TCMU emulated array (default); lio-referrals: LIO's own fileio "
                        "backstore, one ALUA port group per member port and an lba_map, so LIO itself "
                        "answers REPORT REFERRALS (tests/array/lio_referrals.py)")
    p.add_argument("--lba-map", default="striped:64M",
                   help="with --array lio-referrals: the segments, as tests/array/lio_referrals.py "
                        "explains (default striped:64M)")
    p.add_argument("--login", default="all", choices=["all", "first"],
                   help="all: log in to every member's portal (default); first: only to member 0's, "
                        "the group login a host starts from (the map waited for has one path)")
    p.add_argument("--no-login", action="store_true",
                   help="bring the array up but do not log in (no multipath map is waited for)")
    p.add_argument("--timeout", type=float, default=900,
                   help="COMMAND's time limit in seconds; it is killed with status 124 (default 900)")
    # Upper bounds only (the waits poll); generous because a loaded 2-core
    # host makes TCG twice as slow, and tests.array's own `up` limit is 180 s.
    p.add_argument("--map-timeout", type=float, default=90,
                   help="seconds to wait for the multipath map after login (default 90)")
    p.add_argument("--array-timeout", type=float, default=240,
                   help="time limit of each `python -m tests.array` call (default 240)")
    p.add_argument("--memory", default="2G", help="guest memory (default 2G)")
    p.add_argument("--cpus", type=int, default=2, help="guest CPUs (default 2)")
    p.add_argument("--kernel", default=None,
                   help="guest kernel: a name (5.10, 6.1, 6.12, 6.1-rt; fetched by sh tests/vm/setup.sh "
                        "--kernels), a release (6.1.0-57-amd64) or a vmlinuz path "
                        "(default: Debian 12's 6.1 in /boot, pinned to linux-image-amd64's)")
    p.add_argument("--results", type=Path, default=None,
                   help="results directory shared read-write with the guest "
                        "(default: a new /tmp/switch-agent-vm-*); kept afterwards")
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="-- COMMAND [ARGS...] run in the guest from the repository root")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    if "--" in argv:
        i = argv.index("--")
        opts, command = argv[:i], argv[i + 1:]
    else:
        opts, command = argv, []
    p = parser()
    args = p.parse_args(opts)
    if args.command:
        p.error(f"put COMMAND after '--' (got {args.command!r} before it)")
    if not command:
        p.error("no COMMAND: use  python -m tests.vm.run [options] -- COMMAND [ARGS...]")
    if args.members < 1 or args.members > 250:
        p.error("--members must be 1..250")
    if args.luns < 1 or args.luns > 256:
        p.error("--luns must be 1..256")
    args.command = command
    return args


# --- prerequisites ---------------------------------------------------------------

def venv_bin() -> Path:
    """The virtualenv whose python runs in the guest (and whose bin/ holds vng)."""
    if sys.prefix != sys.base_prefix:
        return Path(sys.prefix) / "bin"
    return REPO / ".venv" / "bin"


def find_kernel(wanted: str | None = None) -> Path:
    """--kernel (or SWITCH_AGENT_VM_KERNEL), else the pinned default (tests/vm/guest_kernels.py).

    Raises guest_kernels.KernelNotFound."""
    return guest_kernels.resolve(wanted or os.environ.get("SWITCH_AGENT_VM_KERNEL"))


# virtme-ng shares the host's root over 9p without caching: under TCG every
# stat and read is a round trip, and a Python process that imports numpy,
# rtslib and pytest takes ~17 s to start.  The rig adds a second read-only
# share of / that the guest mounts with cache=loose and binds over the paths
# Python reads (the repository, the venv, the interpreter's prefix): ~7 s.
CACHED_TAG = "swagent-ro"
OVERLAID = ("/etc", "/lib", "/home", "/opt", "/srv", "/usr", "/var", "/tmp")  # virtme-ng's rw overlays


def python_paths(vbin: Path) -> list[str]:
    """Directories the guest should see through the cached share."""
    paths = {str(REPO), str(vbin.parent)}
    try:
        out = subprocess.run([str(vbin / "python"), "-I", "-c",
                              "import sys, sysconfig; print(sys.base_prefix); print(sysconfig.get_path('stdlib'))"],
                             capture_output=True, text=True, timeout=30, check=True).stdout.split("\n")
        base, stdlib = out[0].strip(), out[1].strip()
    except (OSError, subprocess.SubprocessError, IndexError):
        return sorted(paths)
    # A prefix inside one of virtme-ng's overlays (Debian's /usr) is not bound
    # whole: only its standard library is.
    paths.add(stdlib if base.startswith(OVERLAID) or base == "/" else base)
    # Drop paths inside other listed paths.
    return sorted(p for p in paths if not any(p != q and p.startswith(q + "/") for q in paths))


def compile_bytecode(vbin: Path, say) -> None:
    """Write the repository's .pyc files on the host (native speed, gitignored):
    the guest sees the tree read-only and would otherwise compile every module
    in every process, under TCG."""
    dirs = [str(d) for d in (REPO / "agent", REPO / "protocol", REPO / "tests") if d.is_dir()]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
    t = time.monotonic()
    p = subprocess.run([str(vbin / "python"), "-m", "compileall", "-q", "-j", "0", *dirs], env=env,
                       capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        say(f"compileall found problems (the guest will compile those modules itself):\n"
            f"{(p.stdout + p.stderr)[-1500:]}")
    else:
        say(f"bytecode compiled on the host in {time.monotonic() - t:.1f} s")


def check_prerequisites(kernel_wanted: str | None = None) -> tuple[dict, list[str]]:
    found: dict = {}
    missing: list[str] = []
    vbin = venv_bin()
    path = f"{vbin}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    found["PATH"] = path
    if not (vbin / "python").exists():
        missing.append(f"virtualenv python {vbin / 'python'}")
    vng = shutil.which("vng", path=path)
    if vng:
        found["vng"] = vng
    else:
        missing.append("vng (virtme-ng; pip install -e '.[vm]' into the venv)")
    qemu = shutil.which("qemu-system-x86_64", path=path)
    if qemu:
        found["qemu"] = qemu
    else:
        missing.append("qemu-system-x86_64 (Debian package qemu-system-x86)")
    try:
        kernel = find_kernel(kernel_wanted)
    except guest_kernels.KernelNotFound as e:
        missing.append(f"a guest kernel: {e}")
        return found, missing
    if not kernel.is_file():
        missing.append(f"a guest kernel: {kernel} does not exist (Debian package linux-image-amd64)")
        return found, missing
    found["kernel"] = kernel
    moddir = guest_kernels.image_modules(kernel)
    if moddir is None:
        missing.append(f"the modules of {kernel} (/lib/modules/<release>, or lib/modules next to a cached image)")
    else:
        found["modules"] = moddir
    return found, missing


# --- the VM lock -------------------------------------------------------------------

def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def _lock_holders(path: str) -> list[int]:
    try:
        ino = os.stat(path).st_ino
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    holders = []
    for line in lines:
        f = line.split()
        if "->" in f or len(f) < 6 or f[1] != "FLOCK":
            continue
        if f[5].rsplit(":", 1)[-1] == str(ino):
            holders.append(int(f[4]))
    return holders


def take_vm_lock(say) -> object | None:
    """flock(LOCK), unless an ancestor (e.g. `flock LOCK python -m tests.vm.run`) holds it."""
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        pass
    holders = _lock_holders(LOCK)
    if set(holders) & _ancestors():
        say(f"{LOCK} is held by our caller (pid {holders}): booting under that lock")
        os.close(fd)
        return None
    say(f"waiting for {LOCK} (another VM is running, pid {holders or '?'})")
    t = time.monotonic()
    fcntl.flock(fd, fcntl.LOCK_EX)
    say(f"got {LOCK} after {time.monotonic() - t:.0f} s")
    return fd


# --- running -------------------------------------------------------------------------

def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


# QEMU 7.2 under TCG sometimes aborts while the guest boots (seen on the rt
# kernel: "hw/pci/msix.c:218: msix_table_mmio_write: Assertion ... failed").
# The rig boots again then, but only before the guest started COMMAND: once it
# has, a failure is the test's and must stay one.
BOOT_TRIES = 3
_QEMU_ASSERTION = re.compile(r"qemu-system-\S*: [^\n]*Assertion [^\n]* failed\.?")


def qemu_abort_before_start(rc: int, output: str, started: bool) -> str | None:
    """Why this boot is worth retrying (QEMU itself aborted before COMMAND ran), else None.

    rc is vng's exit status, output the tail of its merged stdout and stderr,
    started whether the guest had begun COMMAND (or written status.json)."""
    if started or rc == 0:
        return None
    m = _QEMU_ASSERTION.search(output)
    if m:
        return m.group(0).strip()
    if rc in (-signal.SIGABRT, 128 + signal.SIGABRT):
        return f"QEMU exited on SIGABRT (status {rc})"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)

    def say(msg: str) -> None:
        print(f"vm-run: {msg}", flush=True)

    found, missing = check_prerequisites(args.kernel)
    if missing:
        say("cannot boot the VM rig; missing:")
        for m in missing:
            say(f"  - {m}")
        say("install them with:  sh tests/vm/setup.sh   (as root)")
        return RIG_FAILURE

    results = args.results or Path(tempfile.mkdtemp(prefix="switch-agent-vm-"))
    results = results.resolve()
    results.mkdir(parents=True, exist_ok=True)
    for stale in ["status.json", *LOG_TAILS, "command.log"]:
        (results / stale).unlink(missing_ok=True)
    cache = os.environ.get("SWITCH_AGENT_VM_NO_CACHE") != "1"
    config = {
        "repo": str(REPO),
        "venv_bin": str(venv_bin()),
        "cached_tag": CACHED_TAG if cache else None,
        "cached_paths": python_paths(venv_bin()) if cache else [],
        "members": args.members,
        "luns": args.luns,
        "layout": args.layout,
        "size": args.size,
        "page_size": args.page_size,
        "no_login": args.no_login,
        "login": args.login,
        "array": args.array,
        "lba_map": args.lba_map,
        "timeout": args.timeout,
        "map_timeout": args.map_timeout,
        "array_timeout": args.array_timeout,
        "command": args.command,
        "kernel": str(found["kernel"]),
        "kernel_name": args.kernel or os.environ.get("SWITCH_AGENT_VM_KERNEL") or guest_kernels.DEFAULT,
    }
    (results / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    kvm = os.environ.get("SWITCH_AGENT_VM_KVM") == "1"
    # -I -S: the guest init needs only the standard library, and skipping
    # site-packages saves seconds of 9p look-ups under TCG.
    guest = shlex.join([str(venv_bin() / "python"), "-I", "-S", str(GUEST_INIT), str(results)])
    # --force-9p: virtme-ng would first try virtiofsd, which Debian 12 lacks
    # (qemu's old C one fails), and spend ~3 s per share before falling back.
    vng = [found["vng"], "--run", str(found["kernel"]), "--name", "switch-agent-vm", "--force-9p",
           "--memory", args.memory, "--cpus", str(args.cpus),
           "--rwdir", str(results), "--cwd", str(REPO), "--exec", guest]
    if not kvm:
        vng.insert(3, "--disable-kvm")
    if cache:
        vng.insert(3, f"--qemu-opts=-fsdev local,id=swagentro,path=/,security_model=none,readonly=on,"
                      f"multidevs=remap -device virtio-9p-pci,fsdev=swagentro,mount_tag={CACHED_TAG}")
        compile_bytecode(venv_bin(), say)
    say(f"kernel {found['kernel']}, {'KVM' if kvm else 'TCG (SWITCH_AGENT_VM_KVM=1 tries KVM)'}, "
        f"{args.memory}, {args.cpus} CPUs, {args.members} members, layout {args.layout}")
    say(f"results: {results}")
    say(f"command: {shlex.join(args.command)}")

    hard_limit = args.timeout + 2 * args.array_timeout + args.map_timeout + 300
    env = dict(os.environ, PATH=found["PATH"])
    lock = take_vm_lock(say)
    t_first = time.monotonic()
    aborts: list[str] = []
    proc = None

    def terminated(signum, frame):
        raise Terminated(signal.Signals(signum).name)

    # Killed ourselves (e.g. by a test's timeout): take the VM down with us.
    signal.signal(signal.SIGTERM, terminated)
    signal.signal(signal.SIGHUP, terminated)
    try:
        while True:
            t0 = time.monotonic()
            marks: dict[str, float] = {}
            killed = False
            out_tail = b""
            proc = subprocess.Popen(vng, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                    start_new_session=True)
            fd = proc.stdout.fileno()
            buf = b""
            while True:
                left = t0 + hard_limit - time.monotonic()
                if left <= 0:
                    killed = True
                    break
                r, _, _ = select.select([fd], [], [], min(left, 5.0))
                if not r:
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                out_tail = (out_tail + chunk)[-16384:]
                buf = (buf + chunk)[-8192:]
                now = time.monotonic() - t0
                if "boot" not in marks and b"vm-rig: [" in buf and b"guest up:" in buf:
                    marks["boot"] = now
                if "ready" not in marks and b"] ready; running:" in buf:
                    marks["ready"] = now
                if b"\n" in buf:
                    buf = buf.rsplit(b"\n", 1)[1]
            if killed:
                say(f"the VM ran longer than {hard_limit:.0f} s: killing it")
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            vng_rc = proc.wait()
            started = "ready" in marks or (results / "status.json").exists()
            abort = None if killed else qemu_abort_before_start(
                vng_rc, out_tail.decode(errors="replace"), started)
            if abort is None:
                break
            aborts.append(abort)
            if len(aborts) >= BOOT_TRIES:
                say(f"QEMU aborted at boot on all {BOOT_TRIES} tries (TCG bug, not the guest's: {abort}): "
                    "giving up")
                break
            say(f"QEMU aborted at boot (TCG bug, not the guest's: {abort}): retrying, "
                f"try {len(aborts) + 1} of {BOOT_TRIES}")
            for stale in ["status.json", *LOG_TAILS, "command.log"]:
                (results / stale).unlink(missing_ok=True)
    except (KeyboardInterrupt, Terminated) as e:
        say(f"interrupted ({e or 'SIGINT'}): killing the VM")
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        return 130
    finally:
        if lock is not None:
            os.close(lock)
    if aborts and abort is None:
        say(f"QEMU aborted at boot {len(aborts)} time(s) before this boot; recorded in timings.json "
            "(qemu_aborts_at_boot)")
    total = time.monotonic() - t_first  # every try

    status = None
    try:
        status = json.loads((results / "status.json").read_text())
    except (OSError, ValueError):
        pass

    timings = (status or {}).get("timings", {})
    parts = [f"total {total:.1f} s"]
    if "boot" in marks:
        parts.append(f"boot {marks['boot']:.1f} s (host launch -> guest init)")
    for key, label in [("modules_udev", "modules+udev"), ("services", "services"),
                       ("array_up", "array up"), ("array_login", "login"),
                       ("map_ready", "map ready"), ("ready", "ready"),
                       ("command_done", "command done"), ("teardown_done", "teardown done")]:
        if key in timings:
            parts.append(f"{label} +{timings[key]:.1f} s")
    if "ready" in marks:
        parts.append(f"boot-to-ready {marks['ready']:.1f} s")
    say("timings: " + ", ".join(parts))
    (results / "timings.json").write_text(json.dumps(
        {"host": {k: round(v, 2) for k, v in marks.items()} | {"total": round(total, 2)},
         "guest": timings, "qemu_aborts_at_boot": aborts}, indent=2) + "\n")

    failure = None
    if killed:
        failure = f"the VM was killed after {hard_limit:.0f} s"
    elif status is None:
        failure = (f"the guest wrote no status.json (vng exit status {vng_rc}): the VM did not "
                   "boot, or the guest init crashed")
    elif not status.get("rig_ok"):
        failure = status.get("error", "unknown rig error")
    if failure:
        say(f"RIG FAILURE: {failure}")
        for name in LOG_TAILS:
            t = tail(results / name)
            if t:
                print(f"----- tail of {results / name} -----\n{t}", flush=True)
        say(f"logs in {results}")
        return RIG_FAILURE
    if status.get("teardown_problems"):
        say("teardown problems: " + "; ".join(status["teardown_problems"]))
    rc = status["command_rc"]
    say(f"command exit status {rc}; logs in {results}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
