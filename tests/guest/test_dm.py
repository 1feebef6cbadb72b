"""agent.kernel.dm against the real device-mapper, inside the VM rig (needs root and udevd).

    python -m tests.vm.run --no-login -- python -m pytest -p no:cacheprovider tests/guest/test_dm.py

Every device made here is named ``swtest-<pid>-...`` with uuid
``SWAGENT-swtest-<pid>-...`` (or ``FOREIGN-...`` for the ones dmsetup makes
to play "somebody else's device"), and teardown removes only those. Results
are cross-checked against ``dmsetup`` (table, info, deps, targets) and
``udevadm info``.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from agent.kernel import dm, dm_abi, dm_errors, dm_udev_sync
from protocol.dmtable import DmUdevFlags, Target

SUFFIX = f"swtest-{os.getpid()}"
PREFIX = "SWAGENT-"
HIDDEN = DmUdevFlags.DISABLE_DISK_RULES | DmUdevFlags.DISABLE_OTHER_RULES
SECTORS = 64 * 1024 * 2  # 64 MiB legs
REGION = 2048  # 1 MiB regions


def sh(*cmd: str, check: bool = True) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if check and r.returncode:
        raise AssertionError(f"{' '.join(cmd)}: rc {r.returncode}: {r.stderr.strip()}")
    return r.stdout


@pytest.fixture(scope="module", autouse=True)
def kernel_ready():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    subprocess.run(["modprobe", "-a", "dm-mod", "dm-switch", "dm-zero", "loop"],
                   capture_output=True)
    try:
        dm.DeviceMapper(PREFIX).close()
    except dm_errors.DmUnavailableError as exc:
        pytest.skip(f"no device-mapper here ({exc}): run inside the VM rig")


@pytest.fixture
def dmc():
    """The real control device; removes what the test created (our suffix only)."""
    with dm.DeviceMapper(PREFIX) as ctl:
        yield ctl
        leftovers = [e.name for e in ctl.list_devices() if SUFFIX in e.name]
        # stacked devices first: the switch devices sit on the legs
        for name in sorted(leftovers, key=lambda n: ("leg" in n, n)):
            r = subprocess.run(["dmsetup", "remove", "--retry", name], capture_output=True)
            assert r.returncode == 0, f"cleanup of {name}: {r.stderr!r}"


@pytest.fixture
def loops(tmp_path):
    """Two 64 MiB loop devices over files, filled with b'A' and b'B'."""
    devs = []
    for fill in (b"A", b"B"):
        f = tmp_path / f"{SUFFIX}-{fill.decode()}.img"
        f.write_bytes(fill * (SECTORS * 512))
        devs.append(sh("losetup", "--find", "--show", str(f)).strip())
    yield devs
    for d in devs:
        sh("losetup", "-d", d, check=False)


def majmin(path: str) -> str:
    st = os.stat(path)
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def uuid(tag: str) -> str:
    return f"{PREFIX}{SUFFIX}-{tag}"


def name(tag: str) -> str:
    return f"{SUFFIX}-{tag}"


def make(dmc: dm.DeviceMapper, tag: str, targets, udev_flags: int = 0) -> dm_abi.DeviceInfo:
    dmc.device_create(name(tag), uuid(tag))
    dmc.table_load(name(tag), targets)
    return dmc.device_resume(name(tag), udev_flags=udev_flags)


def udev_props(devname: str) -> dict[str, str]:
    out = sh("udevadm", "info", "--query=property", f"--name={devname}")
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def dmsetup_info(n: str) -> dict[str, str]:
    fields = "name,uuid,major,minor,attr,open,segments,events"
    out = sh("dmsetup", "info", "-c", "--noheadings", "--separator", "|", "-o", fields, n)
    return dict(zip(fields.split(","), out.strip().split("|")))


def our_cookie_semaphores() -> list[str]:
    """Keys of live dm cookie semaphores (DM_COOKIE_MAGIC << 16 | base) in /proc/sysvipc/sem."""
    lines = Path("/proc/sysvipc/sem").read_text().splitlines()[1:]
    return [ln.split()[0] for ln in lines if (int(ln.split()[0]) >> 16) == dm_udev_sync.DM_COOKIE_MAGIC]


def read_direct(path: str, offset: int, length: int = 4096) -> bytes:
    buf = mmap.mmap(-1, length)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        assert os.preadv(fd, [buf], offset) == length
    finally:
        os.close(fd)
    return bytes(buf)


# --- tests ------------------------------------------------------------------


def test_version_targets_and_udev(dmc):
    major, minor, _ = dmc.version()
    assert major == 4 and minor >= 27
    versions = dmc.list_versions()
    for line in sh("dmsetup", "targets").splitlines():
        tname, ver = line.split()
        assert versions[tname] == tuple(int(x) for x in ver.lstrip("v").split("."))
    assert {"switch", "linear", "zero"} <= versions.keys()
    assert isinstance(dmc.udev, dm_udev_sync.UdevSync) and dmc.udev.udev_running(), "udevd must run"


def test_zero_device_lifecycle_matches_dmsetup_and_udev_is_waited_for(dmc):
    n = name("zero")
    node = Path("/dev/mapper") / n
    for _ in range(3):  # a race would show up as a missing/lingering node sooner or later
        created = dmc.device_create(n, uuid("zero"))
        # no table yet (dm-ioctl.h calls it "suspended", but DM_SUSPEND_FLAG is not set)
        assert not created.active_present and not created.inactive_present
        assert created.uuid == uuid("zero") and created.target_count == 0
        assert not node.exists()
        loaded = dmc.table_load(n, [(0, 8192, "zero", "")])
        assert loaded.inactive_present and not loaded.active_present
        assert dmc.table_status(n, table=True, inactive=True) == [Target(0, 8192, "zero", "")]
        resumed = dmc.device_resume(n)
        assert node.exists(), "resume returned before udev made /dev/mapper/<name>"
        assert not resumed.suspended and resumed.active_present and not resumed.inactive_present
        props = udev_props(str(node))
        assert props["DM_NAME"] == n and props["DM_UUID"] == uuid("zero")
        assert props.get("DM_UDEV_PRIMARY_SOURCE_FLAG") == "1"
        assert "DM_UDEV_DISABLE_OTHER_RULES_FLAG" not in props

        info = dmc.device_info(n)
        ds = dmsetup_info(n)
        assert (ds["name"], ds["uuid"]) == (info.name, info.uuid)
        assert (int(ds["major"]), int(ds["minor"])) == (info.major, info.minor)
        assert int(ds["open"]) == info.open_count and int(ds["segments"]) == info.target_count == 1
        assert int(ds["events"]) == info.event_nr
        assert ds["attr"].startswith("L--w")
        assert [e for e in dmc.list_devices() if e.name == n] == [
            dm_abi.DeviceEntry(n, uuid("zero"), info.major, info.minor, info.event_nr)]
        assert sh("dmsetup", "table", n).strip() == "0 8192 zero"
        assert dmc.table_status(n) == [Target(0, 8192, "zero", "")]

        assert dmc.device_suspend(n).suspended
        assert dmsetup_info(n)["attr"][2] == "s"
        assert not dmc.device_resume(n).suspended
        assert dmsetup_info(n)["attr"][2] == "-"

        dmc.table_load(n, [(0, 16384, "zero", "")])
        assert dmc.table_clear(n).inactive_present is False
        assert dmc.table_status(n, table=True, inactive=True) == []

        dmc.device_remove(n)
        assert not node.exists(), "remove returned before udev removed /dev/mapper/<name>"
        assert all(e.name != n for e in dmc.list_devices())
    assert our_cookie_semaphores() == [], "a cookie semaphore was left behind"


def test_errors_carry_command_device_and_errno(dmc):
    with pytest.raises(dm_errors.DmIoctlError) as ei:
        dmc.device_info(name("absent"))
    assert (ei.value.command, ei.value.errno) == (dm_abi.DmCommand.DEV_STATUS, errno.ENXIO)
    dmc.device_create(name("bad"), uuid("bad"))
    with pytest.raises(dm_errors.DmIoctlError) as ei:
        dmc.table_load(name("bad"), [(0, 8, "no-such-target", "")])
    assert (ei.value.command, ei.value.name, ei.value.errno) == (
        dm_abi.DmCommand.TABLE_LOAD, name("bad"), errno.EINVAL)
    with pytest.raises(dm_errors.DmIoctlError) as ei:
        dmc.device_create(name("bad"), uuid("bad2"))
    assert ei.value.errno == errno.EBUSY
    dmc.device_remove(name("bad"))


def test_switch_over_hidden_linear_legs(dmc, loops):
    legs = []
    for i, loop in enumerate(loops):
        info = make(dmc, f"leg{i}", [(0, SECTORS, "linear", f"{majmin(loop)} 0")], HIDDEN)
        legs.append(f"{info.major}:{info.minor}")
        props = udev_props(f"/dev/mapper/{name(f'leg{i}')}")
        assert props.get("DM_UDEV_DISABLE_OTHER_RULES_FLAG") == "1"
        assert props.get("DM_UDEV_DISABLE_DISK_RULES_FLAG") == "1"
    sw = name("sw")
    params = f"2 {REGION} 0 {legs[0]} 0 {legs[1]} 0"
    info = make(dmc, "sw", [(0, SECTORS, "switch", params)])
    assert "DM_UDEV_DISABLE_OTHER_RULES_FLAG" not in udev_props(f"/dev/mapper/{sw}")

    # table, status and deps as dmsetup sees them
    table = dmc.table_status(sw, table=True)
    assert table == [Target(0, SECTORS, "switch", params)]
    assert sh("dmsetup", "table", sw).strip() == f"0 {SECTORS} switch {params}"
    assert sh("dmsetup", "status", sw).strip() == f"0 {SECTORS} switch"
    assert dmc.table_status(sw) == [Target(0, SECTORS, "switch", "")]
    deps = sh("dmsetup", "deps", "-o", "devno", sw)
    want = {(int(a), int(b)) for a, b in re.findall(r"\((\d+), (\d+)\)", deps)}
    assert set(dmc.table_deps(sw)) == want == {tuple(map(int, x.split(":"))) for x in legs}
    assert {e.name for e in dmc.list_devices() if SUFFIX in e.name} == {
        sw, name("leg0"), name("leg1")}
    assert dmc.device_info(name("leg0")).open_count == 1  # held by the switch
    assert info.target_count == 1

    # round robin after the load: region 0 -> leg0 (A), region 1 -> leg1 (B)
    node = f"/dev/mapper/{sw}"
    assert read_direct(node, 0)[:1] == b"A" and read_direct(node, REGION * 512)[:1] == b"B"
    assert dmc.target_message(sw, 0, "set_region_mappings 0:1 :0 R2,4") is None
    # R2,4 repeats the last two mappings over regions 2-5; region 6 keeps round robin
    for region, fill in [(0, b"B"), (1, b"A"), (2, b"B"), (3, b"A"), (4, b"B"), (5, b"A"),
                         (6, b"A"), (7, b"B")]:
        assert read_direct(node, region * REGION * 512)[:1] == fill, region
    # a bad token: -EINVAL, the tokens before it are applied (not atomic)
    with pytest.raises(dm_errors.DmIoctlError) as ei:
        dmc.target_message(sw, 0, "set_region_mappings a:1 b:5")
    assert (ei.value.command, ei.value.errno) == (dm_abi.DmCommand.TARGET_MSG, errno.EINVAL)
    assert read_direct(node, 10 * REGION * 512)[:1] == b"B"  # was A (round robin)

    # a reload resets the region table to round robin
    dmc.table_load(sw, [(0, SECTORS, "switch", params)])
    assert read_direct(node, 0)[:1] == b"B"  # the live table still has our map
    dmc.device_resume(sw)
    assert read_direct(node, 0)[:1] == b"A"

    # tear down in order; legs are busy while the switch holds them
    with pytest.raises(dm_errors.DmIoctlError) as ei:
        dmc.device_remove(name("leg0"))
    assert ei.value.errno == errno.EBUSY
    assert dmc.device_remove(name("leg0"), deferred=True) is False
    assert dmc.device_info(name("leg0")).deferred_remove
    assert dmc.device_remove(sw) is True
    deadline = time.monotonic() + 10  # the kernel removes leg0 from a workqueue on last close
    while any(e.name == name("leg0") for e in dmc.list_devices()):
        assert time.monotonic() < deadline, "deferred removal of leg0 did not happen"
        time.sleep(0.1)
    assert dmc.device_remove(name("leg1")) is True
    assert not Path(f"/dev/mapper/{name('leg1')}").exists()
    assert our_cookie_semaphores() == []


@pytest.mark.parametrize("foreign_uuid", ["FOREIGN-{}", None])
def test_foreign_devices_are_refused(dmc, foreign_uuid):
    n = name("foreign")
    cmd = ["dmsetup", "create", n, "--table", "0 8192 zero"]
    if foreign_uuid:
        cmd += ["--uuid", foreign_uuid.format(SUFFIX)]
    sh(*cmd)
    before = dmc.device_info(n)
    for call in (
        lambda: dmc.table_load(n, [(0, 16, "zero", "")]),
        lambda: dmc.table_clear(n),
        lambda: dmc.device_suspend(n),
        lambda: dmc.device_resume(n),
        lambda: dmc.device_remove(n),
        lambda: dmc.target_message(n, 0, "@cancel_deferred_remove"),
    ):
        with pytest.raises(dm_errors.NotOwnedError):
            call()
    after = dmc.device_info(n)
    assert after == before and not after.inactive_present and not after.suspended
    assert sh("dmsetup", "table", n).strip() == "0 8192 zero"
    if foreign_uuid:
        with pytest.raises(dm_errors.NotOwnedError):
            dmc.device_remove(uuid=foreign_uuid.format(SUFFIX))
    sh("dmsetup", "remove", n)


def _region_map_text(nr_regions: int, nr_paths: int) -> list[str]:
    """Every region's path as explicit tokens (`idx:path` then `:path`), a pseudo-random layout."""
    tokens = []
    x = 12345
    for r in range(nr_regions):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        p = (x >> 16) % nr_paths
        tokens.append(f"{r:x}:{p:x}" if r == 0 else f":{p:x}")
    return tokens


def _chunks(tokens: list[str], limit: int) -> list[str]:
    """set_region_mappings messages of at most ``limit`` bytes, each opening with `idx:path`."""
    head = "set_region_mappings"
    out: list[str] = []
    cur: list[str] = []
    size = len(head)
    for i, tok in enumerate(tokens):
        if cur and size + 1 + len(tok) + 6 > limit:
            out.append(" ".join([head, *cur]))
            cur, size = [], len(head)
        if not cur and tok.startswith(":"):
            tok = f"{i:x}{tok}"
        cur.append(tok)
        size += 1 + len(tok)
    if cur:
        out.append(" ".join([head, *cur]))
    return out


def test_big_region_map_in_64k_messages_and_one_huge_message_fails(dmc):
    # three dm-zero legs of 48,318,382,080 sectors at 30,720-sector regions: 1,572,864 regions
    # (the reference's 22.5 TiB volume at 15 MiB pages)
    length, region = 48_318_382_080, 30_720
    nr_regions = -(-length // region)
    legs = [make(dmc, f"leg{i}", [(0, length, "zero", "")], HIDDEN) for i in range(3)]
    paths = " ".join(f"{i.major}:{i.minor} 0" for i in legs)
    make(dmc, "big", [(0, length, "switch", f"3 {region} 0 {paths}")])
    tokens = _region_map_text(nr_regions, 3)
    messages = _chunks(tokens, 64 * 1024)
    total = sum(len(m) for m in messages)
    assert total > 3_000_000 and all(len(m) <= 64 * 1024 for m in messages)
    t0 = time.monotonic()
    for m in messages:
        assert dmc.target_message(name("big"), 0, m) is None
    took = time.monotonic() - t0
    print(f"{len(messages)} messages, {total} bytes, {nr_regions} regions: {took:.2f} s")

    huge = "set_region_mappings " + " ".join(tokens)
    with pytest.raises(dm_errors.DmIoctlError) as ei:
        dmc.target_message(name("big"), 0, huge)
    assert (ei.value.command, ei.value.errno) == (dm_abi.DmCommand.TARGET_MSG, errno.ENOMEM)
    print(f"one message of {len(huge)} bytes: {ei.value}")

    dmc.device_remove(name("big"))
    for i in range(3):
        dmc.device_remove(name(f"leg{i}"))
