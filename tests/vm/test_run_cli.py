"""Host-only tests of the rig's host side (tests/vm/run.py): no VM is booted."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.vm import run

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("text,value", [("4096", 4096), ("1K", 1024), ("15M", 15 << 20),
                                        ("15MiB", 15 << 20), ("2g", 2 << 30), ("1T", 1 << 40)])
def test_parse_size(text: str, value: int) -> None:
    assert run.parse_size(text) == value


@pytest.mark.parametrize("text", ["", "x", "1.5G", "-1", "0", "1P"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        run.parse_size(text)


def test_parse_args_splits_at_double_dash() -> None:
    a = run.parse_args(["--members", "3", "--layout", "random", "--size", "1G", "--page-size", "1M",
                        "--no-login", "--timeout", "30", "--", "python", "-m", "pytest", "--members", "9"])
    assert (a.members, a.layout, a.size, a.page_size, a.no_login, a.timeout) == (
        3, "random", 1 << 30, 1 << 20, True, 30.0)
    assert a.command == ["python", "-m", "pytest", "--members", "9"]
    assert a.luns == 1
    assert run.parse_args(["--luns", "64", "--", "true"]).luns == 64


@pytest.mark.parametrize("argv", [[], ["--members", "2"], ["true"], ["--members", "0", "--", "true"],
                                  ["--layout", "zigzag", "--", "true"], ["--luns", "0", "--", "true"]])
def test_parse_args_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        run.parse_args(argv)
    assert exc.value.code == 2


def test_missing_kernel_is_a_rig_failure_with_a_hint() -> None:
    env = dict(os.environ, SWITCH_AGENT_VM_KERNEL="/nonexistent/vmlinuz-0")
    p = subprocess.run([sys.executable, "-m", "tests.vm.run", "--", "true"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == run.RIG_FAILURE
    assert "/nonexistent/vmlinuz-0 does not exist" in p.stdout
    assert "sh tests/vm/setup.sh" in p.stdout


def test_unknown_kernel_name_is_a_rig_failure_naming_the_known_ones() -> None:
    p = subprocess.run([sys.executable, "-m", "tests.vm.run", "--kernel", "4.19", "--", "true"], cwd=REPO,
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == run.RIG_FAILURE
    assert "no guest kernel '4.19'; known: 6.1" in p.stdout
    assert "sh tests/vm/setup.sh --kernels" in p.stdout


def test_vm_lock_free_then_held_by_ancestor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lock = tmp_path / "vm.lock"
    monkeypatch.setattr(run, "LOCK", str(lock))
    fd = run.take_vm_lock(lambda msg: None)
    assert fd is not None
    os.close(fd)
    # `flock LOCK python -m ...`: the rig must notice its caller holds the lock, not deadlock.
    code = ("import sys; from tests.vm import run; run.LOCK = sys.argv[1]; "
            "print('fd' if run.take_vm_lock(print) is not None else 'inherited')")
    p = subprocess.run(["flock", str(lock), sys.executable, "-c", code, str(lock)], cwd=REPO,
                       capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().endswith("inherited"), p.stdout
    assert "held by our caller" in p.stdout


# --- main() against a stand-in for vng (no VM) ------------------------------------------

FAKE_VNG = r"""#!/bin/sh
# Stand-in for vng: finds --rwdir, then behaves as $FAKE_MODE says.
while [ $# -gt 0 ]; do [ "$1" = --rwdir ] && results=$2; shift; done
case $FAKE_MODE in
  ok)    echo "vm-rig: [   0.0s] guest up: kernel fake"
         echo "vm-rig: [   1.0s] ready; running: x"
         printf '{"rig_ok": true, "command_rc": 7, "timings": {"ready": 1.0}}' > "$results/status.json" ;;
  crash) echo "kernel panic (pretend)"; exit 1 ;;
  rigfail) echo "vm-rig: [   0.0s] guest up: kernel fake"
         echo "multipathd: pretend log line" > "$results/multipathd.log"
         printf '{"rig_ok": false, "error": "multipathd: pretend failure"}' > "$results/status.json" ;;
  hang)  echo $$ > "$results/fake.pid"; exec sleep 600 ;;
  abort) # QEMU aborts at boot on the first try only (the count survives in results/).
         echo x >> "$results/tries"
         if [ "$(wc -l < "$results/tries")" -eq 1 ]; then
           echo "qemu-system-x86_64: ../../hw/pci/msix.c:218: msix_table_mmio_write: Assertion \`x' failed." >&2
           exit 255
         fi
         echo "vm-rig: [   0.0s] guest up: kernel fake"
         echo "vm-rig: [   1.0s] ready; running: x"
         printf '{"rig_ok": true, "command_rc": 0, "timings": {}}' > "$results/status.json" ;;
  abortalways) echo "qemu-system-x86_64: msix.c:218: f: Assertion \`x' failed." >&2; echo x >> "$results/tries"; exit 255 ;;
  abortlate) echo "vm-rig: [   0.0s] guest up: kernel fake"
         echo "vm-rig: [   1.0s] ready; running: x"
         echo x >> "$results/tries"
         echo "qemu-system-x86_64: msix.c:218: f: Assertion \`x' failed." >&2; exit 255 ;;
esac
"""

DRIVER = """
import os, sys
from pathlib import Path
from tests.vm import run
fake, lock, results = sys.argv[1:4]
run.check_prerequisites = lambda wanted=None: ({"vng": fake, "qemu": "qemu", "kernel": Path("/boot/vmlinuz-fake"),
                                    "PATH": os.environ["PATH"]}, [])
run.LOCK = lock
sys.exit(run.main(["--results", results, "--", "true"]))
"""


def start_fake(tmp_path: Path, mode: str) -> tuple[subprocess.Popen, Path]:
    fake = tmp_path / "vng"
    fake.write_text(FAKE_VNG)
    fake.chmod(0o755)
    results = tmp_path / "results"
    env = dict(os.environ, FAKE_MODE=mode, SWITCH_AGENT_VM_NO_CACHE="1")
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(fake), str(tmp_path / "lock"), str(results)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL)
    return proc, results


def test_main_returns_the_guest_commands_status(tmp_path: Path) -> None:
    proc, results = start_fake(tmp_path, "ok")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 7, out
    assert "vm-run: command exit status 7" in out
    assert "boot-to-ready" in out
    assert (results / "timings.json").exists()


def test_main_without_status_is_a_rig_failure(tmp_path: Path) -> None:
    proc, _ = start_fake(tmp_path, "crash")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == run.RIG_FAILURE, out
    assert "RIG FAILURE: the guest wrote no status.json (vng exit status 1)" in out


def test_main_rig_failure_prints_log_tails(tmp_path: Path) -> None:
    proc, results = start_fake(tmp_path, "rigfail")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == run.RIG_FAILURE, out
    assert "RIG FAILURE: multipathd: pretend failure" in out
    assert f"tail of {results / 'multipathd.log'}" in out and "pretend log line" in out


def test_sigterm_takes_the_vm_down(tmp_path: Path) -> None:
    proc, results = start_fake(tmp_path, "hang")
    pidfile = results / "fake.pid"
    deadline = time.monotonic() + 30
    while not pidfile.exists() or not pidfile.read_text().strip():
        assert time.monotonic() < deadline, "the stand-in VM never started"
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)  # polling with a deadline
    vm_pid = int(pidfile.read_text())
    proc.terminate()
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130, out
    assert "interrupted (SIGTERM): killing the VM" in out
    with pytest.raises(ProcessLookupError):
        os.kill(vm_pid, 0)


# --- QEMU aborting at boot: retried only before the guest started COMMAND -------------

MSIX = ("qemu-system-x86_64: ../../hw/pci/msix.c:218: msix_table_mmio_write: Assertion "
        "`dev->msix_table + addr + 4 <= dev->msix_table + dev->msix_entries_nr * PCI_MSIX_ENTRY_SIZE' failed.")


def test_a_qemu_assertion_before_the_guest_started_is_retried() -> None:
    why = run.qemu_abort_before_start(255, f"SeaBIOS ...\n{MSIX}\n", started=False)
    assert why is not None and "msix_table_mmio_write: Assertion" in why


def test_sigabrt_without_a_message_is_retried() -> None:
    assert run.qemu_abort_before_start(-6, "", started=False) == "QEMU exited on SIGABRT (status -6)"
    assert run.qemu_abort_before_start(134, "", started=False) is not None


@pytest.mark.parametrize("rc,output,started", [
    (255, MSIX, True),                          # the guest had started COMMAND: a failure stays one
    (-6, "", True),
    (0, MSIX, False),                           # exited cleanly
    (255, "Kernel panic - not syncing", False),  # not QEMU's abort
    (1, "vm-rig: pytest: Assertion x failed", False),  # a guest's assertion is not QEMU's
])
def test_no_retry(rc: int, output: str, started: bool) -> None:
    assert run.qemu_abort_before_start(rc, output, started) is None


def test_main_boots_again_after_a_qemu_abort_and_records_it(tmp_path: Path) -> None:
    proc, results = start_fake(tmp_path, "abort")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "QEMU aborted at boot (TCG bug" in out and "try 2 of 3" in out
    assert (results / "tries").read_text().count("x") == 2
    aborts = json.loads((results / "timings.json").read_text())["qemu_aborts_at_boot"]
    assert len(aborts) == 1 and "msix_table_mmio_write: Assertion" in aborts[0]


def test_main_gives_up_after_three_qemu_aborts(tmp_path: Path) -> None:
    proc, results = start_fake(tmp_path, "abortalways")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == run.RIG_FAILURE, out
    assert "try 3 of 3" in out and "try 4" not in out and "on all 3 tries" in out
    assert (results / "tries").read_text().count("x") == run.BOOT_TRIES
    assert len(json.loads((results / "timings.json").read_text())["qemu_aborts_at_boot"]) == run.BOOT_TRIES


def test_main_never_retries_once_the_command_started(tmp_path: Path) -> None:
    proc, results = start_fake(tmp_path, "abortlate")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == run.RIG_FAILURE, out
    assert "retrying" not in out
    assert (results / "tries").read_text().count("x") == 1
    assert json.loads((results / "timings.json").read_text())["qemu_aborts_at_boot"] == []


def test_login_option_defaults_to_all() -> None:
    assert run.parse_args(["--", "true"]).login == "all"
    assert run.parse_args(["--login", "first", "--members", "3", "--", "true"]).login == "first"
    with pytest.raises(SystemExit):
        run.parse_args(["--login", "some", "--", "true"])
