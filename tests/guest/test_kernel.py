"""Smoke tests of the VM rig: the kernel pieces and daemons the project needs.

Runs only inside the rig's guest (tests/guest/conftest.py skips it elsewhere):

    python -m tests.vm.run --no-login -- python -m pytest tests/guest/test_kernel.py

Every dm device made here is named ``swagent-rig-<pid>-*`` and removed in a
finally, so a failing test leaves nothing behind for the rig's teardown.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

PREFIX = f"swagent-rig-{os.getpid()}"
REGION_SECTORS = 2048  # 1 MiB regions
REGIONS = 8
SECTORS = REGION_SECTORS * REGIONS


def sh(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: exit {p.returncode}\n{p.stdout}{p.stderr}")
    return p


def pids_named(comm: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if (d / "comm").read_text().strip() == comm:
                    pids.append(int(d.name))
    return pids


@contextlib.contextmanager
def dm_device(name: str, table: str) -> Iterator[str]:
    """Create a dm device (waiting for udev's /dev/mapper node); remove it afterwards."""
    sh("dmsetup", "create", name, "--table", table)
    try:
        yield name
    finally:
        sh("dmsetup", "remove", "--retry", name, check=False)


def devnum(name: str) -> str:
    out = sh("dmsetup", "info", "-c", "--noheadings", "-o", "major,minor", name).stdout.strip()
    major, minor = out.split(":")
    return f"{int(major)}:{int(minor)}"


def read_region(dev: str, region: int) -> bool:
    """O_DIRECT read of 4 KiB at the start of a region: True if it worked, False on EIO."""
    buf = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT wants
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    try:
        n = os.preadv(fd, [buf], region * REGION_SECTORS * 512)
        assert n == 4096
        return True
    except OSError as e:
        if e.errno != errno.EIO:
            raise
        return False
    finally:
        os.close(fd)
        buf.close()


# --- kernel modules and configfs --------------------------------------------------

@pytest.mark.parametrize("module", ["dm_mod", "dm_switch", "dm_multipath", "dm_round_robin",
                                    "target_core_mod", "target_core_user", "target_core_file",
                                    "iscsi_target_mod", "iscsi_tcp", "uio", "sg", "configfs"])
def test_module_loaded(module: str) -> None:
    assert Path("/sys/module", module).is_dir(), f"kernel module {module} is not loaded"


def test_configfs_target_dir() -> None:
    assert os.path.ismount("/sys/kernel/config"), "configfs is not mounted on /sys/kernel/config"
    assert Path("/sys/kernel/config/target/core").is_dir(), "no LIO core in configfs (target_core_mod)"


def test_dmsetup_targets_lists_switch_and_multipath() -> None:
    targets = {line.split()[0] for line in sh("dmsetup", "targets").stdout.splitlines() if line.strip()}
    assert "switch" in targets, f"dm-switch target missing from `dmsetup targets`: {sorted(targets)}"
    assert "multipath" in targets, f"dm-multipath target missing: {sorted(targets)}"


# --- dm-switch ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def legs() -> Iterator[tuple[str, str]]:
    """Two legs told apart by reads: path 0 = dm-zero (reads work), path 1 = dm-error (EIO)."""
    with dm_device(f"{PREFIX}-zero", f"0 {SECTORS} zero") as zero, \
         dm_device(f"{PREFIX}-error", f"0 {SECTORS} error") as error:
        yield devnum(zero), devnum(error)


def switch_table(legs: tuple[str, str]) -> str:
    return f"0 {SECTORS} switch 2 {REGION_SECTORS} 0 {legs[0]} 0 {legs[1]} 0"


@pytest.fixture(scope="module")
def switch(legs: tuple[str, str]) -> Iterator[str]:
    """A dm-switch of 8 one-MiB regions over the two legs, shared by the module's tests."""
    with dm_device(f"{PREFIX}-sw", switch_table(legs)) as sw:
        yield sw


def test_dm_switch_table_round_trips(switch: str, legs: tuple[str, str]) -> None:
    table = sh("dmsetup", "table", switch).stdout.split()
    assert table == ["0", str(SECTORS), "switch", "2", str(REGION_SECTORS), "0",
                     legs[0], "0", legs[1], "0"], table


def test_dm_switch_routes_regions_by_set_region_mappings(legs: tuple[str, str]) -> None:
    with dm_device(f"{PREFIX}-sw-fresh", switch_table(legs)) as sw:
        dev = f"/dev/mapper/{sw}"
        assert Path(dev).exists(), f"udev made no {dev}"
        # A new switch maps region r -> path r % 2: even regions read zeros, odd ones fail.
        assert [read_region(dev, r) for r in range(REGIONS)] == [True, False] * (REGIONS // 2)

        # Swap: region 0 -> path 1, region 1 -> path 0, then repeat those two over regions 2..7.
        sh("dmsetup", "message", sw, "0", "set_region_mappings", "0:1", ":0", "R2,6")
        assert [read_region(dev, r) for r in range(REGIONS)] == [False, True] * (REGIONS // 2)

        # Single entries: regions 6 and 7 -> path 0.
        sh("dmsetup", "message", sw, "0", "set_region_mappings", "6:0", "7:0")
        assert [read_region(dev, r) for r in range(REGIONS)] == [False, True, False, True, False, True,
                                                                  True, True]


@pytest.mark.parametrize("bad", [["8:0"], ["0:2"], ["0:0", "R3,1"], ["0:0", "R1,8"], ["bogus"]],
                         ids=["region-out-of-range", "path-out-of-range", "repeat-more-than-written",
                              "repeat-past-the-end", "garbage"])
def test_dm_switch_rejects_bad_mappings(switch: str, bad: list[str]) -> None:
    p = sh("dmsetup", "message", switch, "0", "set_region_mappings", *bad, check=False)
    assert p.returncode != 0, f"set_region_mappings {' '.join(bad)} was accepted"


@pytest.mark.skipif(not os.environ.get("SWITCH_AGENT_MPATH_NAME"),
                    reason="no multipath map (rig ran with --no-login, or no array)")
def test_dm_switch_stacks_on_the_multipath_map() -> None:
    mpath = os.environ["SWITCH_AGENT_MPATH_NAME"]
    sectors = int(sh("blockdev", "--getsz", f"/dev/mapper/{mpath}").stdout)
    regions = min(REGIONS, sectors // REGION_SECTORS)
    assert regions >= 2, f"the multipath map is too small ({sectors} sectors)"
    leg = devnum(mpath)
    table = f"0 {regions * REGION_SECTORS} switch 2 {REGION_SECTORS} 0 {leg} 0 {leg} 0"
    with dm_device(f"{PREFIX}-on-mpath", table) as sw:
        sh("dmsetup", "message", sw, "0", "set_region_mappings", "0:1", ":0")
        assert all(read_region(f"/dev/mapper/{sw}", r) for r in range(regions))


# --- daemons ------------------------------------------------------------------------

def test_udevd_running() -> None:
    assert pids_named("systemd-udevd"), "systemd-udevd is not running"


def test_iscsid_running_and_answering() -> None:
    assert pids_named("iscsid"), "iscsid is not running"
    p = sh("iscsiadm", "-m", "session", check=False)
    # 0: sessions listed; 21 (ISCSI_ERR_NO_OBJS_FOUND): none. Anything else: iscsid unreachable.
    assert p.returncode in (0, 21), f"iscsiadm -m session: exit {p.returncode}\n{p.stdout}{p.stderr}"


def test_multipathd_running_and_answering() -> None:
    assert pids_named("multipathd"), "multipathd is not running"
    out = sh("multipathd", "show", "daemon").stdout
    assert out.startswith("pid "), out


def test_portal_addresses_on_lo() -> None:
    members = int(os.environ.get("SWITCH_AGENT_MEMBERS", "1"))
    addrs = sh("ip", "-4", "-o", "addr", "show", "dev", "lo").stdout
    for m in range(2, members + 1):
        assert f"inet 127.0.0.{m}/" in addrs, f"127.0.0.{m} (member {m}'s portal) not on lo:\n{addrs}"
