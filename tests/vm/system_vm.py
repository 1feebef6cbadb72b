"""The systemd-booted guest: a Debian 12 root on a disk image, booted by QEMU with systemd as init.

Next to the rig of tests/vm/run.py (virtme-ng over the host's own root), this
guest is a host as an administrator has one: its own root built from Debian's
packages (tests/vm/system/build-image.sh, cached under a hash of its inputs),
the project's .deb installed with apt, real units started by systemd, and
reboots. QEMU boots the image's own kernel and initramfs directly (TCG).

Disks: vda is a sparse copy of the cached root image (the image itself
stays clean), vdb the emulated array's backing store, both kept for the whole
run so that a reboot inside the guest finds them again. The host talks to the
guest through a 9p share (tag `swtest`, mounted at /mnt/swtest): the image's
swtest-runner.service runs the share's boot.sh after every boot, which writes
its results back into the share and reboots or powers off the guest. QEMU
exits when the guest powers off.

    python -m tests.vm.system_vm image                 # build (or find) the cached image
    python -m tests.vm.system_vm run [--timeout S] -- COMMAND   # boot, run COMMAND, power off
    python -m tests.vm.system_vm scenario [--workdir DIR]       # issue #16's reboot scenario
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.vm.run import take_vm_lock

REPO = Path(__file__).resolve().parents[2]
SYSTEM = Path(__file__).resolve().parent / "system"
IMAGE_INPUTS = ("packages.txt", "build-image.sh", "customize.sh")
CACHE = Path(os.environ.get("SWITCH_AGENT_VM_IMAGE_CACHE", "/var/lib/switch-agent-vm/system-image"))
SHARE_TAG = "swtest"
# Nehalem: SSE4.2 but no AVX. numpy's AVX2 kernels segfaulted under TCG in the
# rig (tests/vm/README.md); a CPU without AVX keeps numpy on code that works,
# with no environment variable in the product's unit.
CPU = "Nehalem"


def say(msg: str) -> None:
    print(f"system-vm: {msg}", flush=True)


def image_key() -> str:
    """Hash of what the image is made from: a change to any input rebuilds it."""
    h = hashlib.sha256()
    for name in IMAGE_INPUTS:
        h.update(name.encode() + b"\0" + (SYSTEM / name).read_bytes() + b"\0")
    return h.hexdigest()[:16]


@dataclass
class Image:
    directory: Path
    built_s: float | None = None  # None: found in the cache

    @property
    def root(self) -> Path:
        return self.directory / "root.img"

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"

    def kernel_release(self) -> str:
        first = (self.directory / "manifest.txt").read_text().splitlines()[0]
        return first.split()[1]


def ensure_image() -> Image:
    """The cached image for the current inputs, built first if missing (needs root, network for apt).

    One build at a time: tests/run.sh starts one in the background while the host tests run, and
    the guest test that needs the image waits for it here instead of building a second.
    """
    key = image_key()
    final = CACHE / key
    if (final / "complete").exists():
        return Image(final)
    CACHE.mkdir(parents=True, exist_ok=True)
    lock = os.open(CACHE / ".build.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "complete").exists():  # built by whoever held the lock
            return Image(final)
        return _build_image(key, final)
    finally:
        os.close(lock)


def _build_image(key: str, final: Path) -> Image:
    building = CACHE / f"{key}.building"
    shutil.rmtree(building, ignore_errors=True)
    say(f"building the image {key} (mmdebstrap, a few minutes) into {building}")
    started = time.monotonic()
    subprocess.run(["sh", str(SYSTEM / "build-image.sh"), str(building)], check=True)
    (building / "complete").write_text(f"{time.time()}\n")
    shutil.rmtree(final, ignore_errors=True)
    building.rename(final)
    # Older images (other keys) take gigabytes: keep only this one.
    for old in CACHE.iterdir():
        if old.name != key and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    built = time.monotonic() - started
    say(f"image {key} built in {built:.0f} s")
    return Image(final, built_s=built)


@dataclass
class Machine:
    """One QEMU process: the overlay, the array disk and the share live in `workdir`."""

    image: Image
    workdir: Path
    memory: str = "2G"
    cpus: int = 2
    array_disk_size: str = "2G"
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def share(self) -> Path:
        return self.workdir / "share"

    @property
    def out(self) -> Path:
        return self.share / "out"

    @property
    def console(self) -> Path:
        return self.workdir / "console.log"

    def prepare(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        # A copy of the cached image (sparse: ~1 GB, a few seconds): the cache stays clean.
        started = time.monotonic()
        subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(self.image.root),
                        str(self.workdir / "root.img")], check=True)
        self.timings["copy_root_s"] = round(time.monotonic() - started, 1)
        # The kernel too: a rebuilt image replaces the cache's files while this machine runs.
        shutil.copy(self.image.kernel, self.workdir / "vmlinuz")
        shutil.copy(self.image.initrd, self.workdir / "initrd.img")
        array = self.workdir / "array.img"
        subprocess.run(["truncate", "-s", self.array_disk_size, str(array)], check=True)
        subprocess.run(["mke2fs", "-q", "-t", "ext4", "-L", "swemu", str(array)], check=True)

    def qemu_argv(self) -> list[str]:
        append = ("root=/dev/vda rw console=ttyS0 init=/lib/systemd/systemd panic=-1 "
                  "systemd.show_status=1 net.ifnames=0")
        return ["qemu-system-x86_64", "-machine", "q35,accel=tcg", "-cpu", CPU, "-smp", str(self.cpus),
                "-m", self.memory, "-nodefaults", "-no-user-config", "-display", "none",
                "-serial", f"file:{self.console}", "-nic", "none",
                "-kernel", str(self.workdir / "vmlinuz"), "-initrd", str(self.workdir / "initrd.img"),
                "-append", append,
                "-drive", f"file={self.workdir / 'root.img'},if=virtio,format=raw,cache=unsafe",
                "-drive", f"file={self.workdir / 'array.img'},if=virtio,format=raw,cache=writeback",
                "-fsdev", f"local,id=swtest,path={self.share},security_model=none",
                "-device", f"virtio-9p-pci,fsdev=swtest,mount_tag={SHARE_TAG}",
                "-device", "virtio-rng-pci"]

    def run(self, timeout_s: float) -> int:
        """Boot and wait until the guest powers off (QEMU exits); kill it after `timeout_s`. QEMU's status."""
        lock = take_vm_lock(say)
        try:
            started = time.monotonic()
            # Closed when QEMU is done: pytest (filterwarnings = error) fails a test that leaks it.
            with open(self.workdir / "qemu.log", "wb") as log:
                proc = subprocess.Popen(self.qemu_argv(), stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT)
                try:
                    rc = proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    say(f"the guest did not power off within {timeout_s:.0f} s: killing QEMU")
                    proc.kill()
                    proc.wait()
                    rc = 124
            self.timings["qemu_s"] = round(time.monotonic() - started, 1)
            return rc
        finally:
            if lock is not None:
                os.close(lock)

    def tail_console(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.console.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# boot.sh for `run`: one boot, COMMAND, its output and status in the share, power off.
RUN_BOOT_SH = """#!/bin/sh
out=/mnt/swtest/out
systemctl is-system-running --wait > $out/system-state 2>&1
systemd-analyze time > $out/boot-time 2>&1
sh -c {command} > $out/command.log 2>&1
echo $? > $out/command.rc
systemctl poweroff
"""


def cmd_image(args: argparse.Namespace) -> int:
    image = ensure_image()
    say(f"image: {image.directory} (kernel {image.kernel_release()})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    image = ensure_image()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="switch-agent-sysvm."))
    workdir.mkdir(parents=True, exist_ok=True)
    machine = Machine(image, workdir)
    machine.prepare()
    (machine.share / "boot.sh").write_text(RUN_BOOT_SH.format(command=shlex.quote(" ".join(args.command))))
    say(f"booting {image.kernel_release()} from {image.root} (work: {workdir})")
    rc = machine.run(args.timeout)
    out = machine.out
    result = {name: (out / name).read_text().strip() for name in
              ("system-state", "boot-time", "command.log", "command.rc") if (out / name).exists()}
    say(f"QEMU exit {rc} after {machine.timings['qemu_s']} s (boot, command, power off)")
    for name, text in result.items():
        say(f"{name}: {text}")
    if "command.rc" not in result:
        say("the guest never ran the command; console tail:\n" + machine.tail_console())
        return 125
    (workdir / "timings.json").write_text(json.dumps(machine.timings) + "\n")
    return int(result["command.rc"])


# boot.sh for `scenario`: tests/vm/system/scenario.py reboots or powers off itself;
# if Python cannot even start, power off so the host is not left waiting.
SCENARIO_BOOT_SH = """#!/bin/sh
python3 /mnt/swtest/scenario.py >> /mnt/swtest/out/runner.log 2>&1 || systemctl poweroff
"""

# What the emulated array needs in the guest: tests/array imports protocol/ and agent.sizes.
EMULATOR_TREES = ("tests/__init__.py", "tests/array", "tests/bench", "protocol", "agent")


def package(say_=say) -> Path:
    """dist/switch-agent_<version>_<arch>.deb, built now (packaging/build-deb.sh, unit tests skipped: CI runs them)."""
    started = time.monotonic()
    env = dict(os.environ, DEB_BUILD_OPTIONS="nocheck")
    proc = subprocess.run(["sh", str(REPO / "packaging" / "build-deb.sh")], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"build-deb.sh failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    debs = sorted((REPO / "dist").glob("switch-agent_*_*.deb"), key=lambda p: p.stat().st_mtime)
    say_(f"built {debs[-1].name} in {time.monotonic() - started:.0f} s")
    return debs[-1]


def missing_dependencies(deb: Path, image: Image) -> list[str]:
    """The .deb's Depends that the image lacks: the guest has no network, so apt could not fetch them."""
    depends = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True, text=True,
                             check=True).stdout
    installed = {line.split()[0] for line in (image.directory / "manifest.txt").read_text().splitlines()[1:]}
    missing = []
    for clause in depends.split(","):
        names = {alt.split()[0].split(":")[0] for alt in clause.split("|") if alt.strip()}
        if names and not names & installed:
            missing.append(clause.strip())
    return missing


@dataclass
class ScenarioResult:
    rc: int
    results: dict
    timings: dict[str, float]
    workdir: Path

    def steps(self) -> list[dict]:
        return list(self.results.get("steps", []))

    @property
    def ok(self) -> bool:
        return bool(self.results.get("boot2_ok")) and all(s["ok"] for s in self.steps())


def run_scenario(workdir: Path, timeout_s: float = 1500.0, deb: Path | None = None) -> ScenarioResult:
    """Issue #16's reboot scenario: one QEMU run, two boots (the guest reboots itself), results read back."""
    timings: dict[str, float] = {}
    t = time.monotonic()
    image = ensure_image()
    timings["image_s"] = round(time.monotonic() - t, 1)
    if image.built_s is not None:
        timings["image_built_s"] = round(image.built_s, 1)
    t = time.monotonic()
    deb = deb or package()
    timings["package_s"] = round(time.monotonic() - t, 1)
    missing = missing_dependencies(deb, image)
    if missing:
        raise RuntimeError(f"{deb.name} depends on what the image lacks: {missing}; add them to "
                           f"{SYSTEM / 'packages.txt'} (the guest installs offline)")
    workdir.mkdir(parents=True, exist_ok=True)
    machine = Machine(image, workdir)
    machine.prepare()
    shutil.copy(deb, machine.share / deb.name)
    # The scenario follows the README's install steps as written (tests/vm/system/readme_steps.py).
    for name in ("scenario.py", "readme_steps.py"):
        shutil.copy(SYSTEM / name, machine.share / name)
    shutil.copy(REPO / "README.md", machine.share / "README.md")
    subprocess.run(["tar", "-cf", str(machine.share / "emu.tar"), "--exclude=__pycache__", "--exclude=*.pyc",
                    *EMULATOR_TREES], cwd=REPO, check=True)
    (machine.share / "boot.sh").write_text(SCENARIO_BOOT_SH)
    say(f"booting {image.kernel_release()} (image {image.directory.name}), work dir {workdir}")
    rc = machine.run(timeout_s)
    timings.update(machine.timings)
    path = machine.out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    (workdir / "timings.json").write_text(json.dumps(timings, indent=1) + "\n")
    return ScenarioResult(rc, results, timings, workdir)


def report(result: ScenarioResult) -> str:
    lines = [f"QEMU exit {result.rc}; timings {json.dumps(result.timings)}"]
    for s in result.steps():
        what = json.dumps(s.get("details") if s["ok"] else s.get("error"))
        lines.append(f"boot {s['boot']} {'ok  ' if s['ok'] else 'FAIL'} {s['seconds']:6.1f} s  {s['step']}: "
                     f"{what[:600]}")
    up2 = next((s for s in result.steps() if s["step"] == "system up (after the reboot)"), None)
    if up2 and "reboot_requested_at" in result.results:
        lines.append(f"reboot: {up2['ended_at'] - result.results['reboot_requested_at']:.1f} s from "
                     "`systemctl reboot` to the second boot's system up (shutdown included)")
    lines.append(f"boot1_ok={result.results.get('boot1_ok')} boot2_ok={result.results.get('boot2_ok')} "
                 f"(work dir {result.workdir})")
    return "\n".join(lines)


def cmd_scenario(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="switch-agent-sysvm."))
    result = run_scenario(workdir, args.timeout)
    print(report(result), flush=True)
    if not result.steps():
        say("no results; console tail:\n" + Machine(ensure_image(), workdir).tail_console())
    return 0 if result.ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.vm.system_vm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("image", help="build the cached image if missing, print where it is").set_defaults(
        func=cmd_image)
    run = sub.add_parser("run", help="boot, run COMMAND after multi-user, power off")
    run.add_argument("--timeout", type=float, default=600.0, help="seconds before QEMU is killed")
    run.add_argument("--workdir", help="keep the disks, console log and share here")
    run.add_argument("command", nargs=argparse.REMAINDER)
    run.set_defaults(func=cmd_run)
    scen = sub.add_parser("scenario", help="issue #16's install + reboot scenario (two boots of one guest)")
    scen.add_argument("--timeout", type=float, default=1500.0, help="seconds before QEMU is killed")
    scen.add_argument("--workdir", help="keep the disks, console log and share here")
    scen.set_defaults(func=cmd_scenario)
    args = parser.parse_args(argv)
    if args.action == "run":
        args.command = [c for c in args.command if c != "--"] or ["true"]
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
