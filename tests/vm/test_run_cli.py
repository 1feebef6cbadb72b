"""Host-only tests of the rig's host side (tests/vm/run.py): no VM is booted."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
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


@pytest.mark.parametrize("argv", [[], ["--members", "2"], ["true"], ["--members", "0", "--", "true"],
                                  ["--layout", "zigzag", "--", "true"]])
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


def test_newest_kernel_by_version(tmp_path: Path) -> None:
    names = ["vmlinuz-6.1.0-9-amd64", "vmlinuz-6.1.0-56-amd64", "vmlinuz-6.1.0-10-amd64"]
    paths = [tmp_path / n for n in names]
    assert max(paths, key=run.version_key).name == "vmlinuz-6.1.0-56-amd64"


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
