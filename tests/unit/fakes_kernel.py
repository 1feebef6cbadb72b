"""Fake kernel layers for the pipeline's host tests: they behave like the real ones.

- FakeArrayPath speaks SCSI to the emulator's own LogicalUnit (tests/array/lu.py),
  so the agent reads real GET PAGE MAP bytes through protocol/pagemap.py.
- FakeDeviceMapper keeps tables per device, resets a switch to round-robin on
  every table swap, and applies set_region_mappings with protocol.dmswitch_oracle's
  kernel-faithful decoder — so a test can follow a sector down the stack and
  see which member's path it reaches.
"""

from __future__ import annotations

import itertools

import errno
import threading
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np

from agent.config import UUID_PREFIX
from agent.kernel.dm_abi import DmCommand
from agent.kernel.dm_errors import DmIoctlError, NotOwnedError
from agent.kernel.sgio import ScsiCommandError
from agent.topology import MpathMap, NewPath
from protocol import scsi
from protocol.dmswitch_encoder import round_robin
from protocol.dmswitch_oracle import apply_region_mappings
from protocol.dmtable import LinearParams, SwitchParams
from protocol.errors import DmSwitchMessageError
from protocol.multipath import MultipathParams
from tests.array.lu import LogicalUnit, LuIdentity
from tests.array.store import SparseStore
from tests.array.volume import ArrayVolume

MiB = 1024 * 1024


_SESSION_IDS = itertools.count(1)
"""Session numbers, never reused while the kernel runs (as iscsi_session_nr)."""


class FakeArrayPath:
    """One sd path to one member of the emulated array, shaped like agent.kernel.sgio.ScsiDevice."""

    def __init__(self, lu: LogicalUnit, member_number: int, name: str, *, max_transfer: int = 256 * 1024):
        self.lu = lu
        self.member_number = member_number
        self.name = name
        self.max_transfer = max_transfer
        self.broken = False
        self.commands = 0
        self.session = next(_SESSION_IDS)
        """The iSCSI session the path hangs under (a new FakeArrayPath is a new session)."""

    async def max_transfer_bytes(self) -> int:
        return self.max_transfer

    def blocking(self):
        """As ScsiDevice.blocking(): execute() never leaves this thread anyway."""
        return self

    async def execute(self, cdb: bytes, *, data_in_length: int = 0, data_out: bytes | None = None):
        self.commands += 1
        if self.broken:
            raise ScsiCommandError(self.name, cdb[0], 0, 0x01, 0, None, cdb=cdb)  # DID_NO_CONNECT
        if data_in_length > self.max_transfer:
            raise ValueError(f"{self.name}: transfer of {data_in_length} bytes exceeds the device's limit")
        result = self.lu.handle(self.member_number, cdb, data_out or b"")
        if result.status != scsi.ScsiStatus.GOOD:
            raise ScsiCommandError(self.name, cdb[0], result.status, 0, 0,
                                   scsi.decode_sense(result.sense) if result.sense else None, cdb=cdb)
        return SimpleNamespace(data_in=bytes(result.data_in)[:data_in_length])


@dataclass
class FakeDmDevice:
    name: str
    uuid: str
    minor: int
    live: list | None = None
    inactive: list | None = None
    suspended: bool = True
    udev_flags: int = 0
    regions: np.ndarray | None = None
    """A live switch's region table: path number per region."""
    failed: set[str] = field(default_factory=set)
    """A live multipath table's failed paths (major:minor)."""
    event_nr: int = 0
    """dm's per-device event counter: dm-mpath bumps it on every path failure and reinstatement."""

    @property
    def dev(self) -> str:
        return f"253:{self.minor}"


@dataclass
class FakeDeviceMapper:
    """device-mapper as the agent sees it through agent.kernel.dm.DeviceMapper."""

    devices: dict[str, FakeDmDevice] = field(default_factory=dict)
    log: list[tuple[str, str]] = field(default_factory=list)
    fail: dict[tuple[str, str], int | list[int]] = field(default_factory=dict)
    """(operation, device name prefix, or exact name + "$") -> errno to fail with, once (or a list: one per call)."""
    hold: dict[str, threading.Event] = field(default_factory=dict)
    """Device name -> event: a call that suspends that device waits for the event, the device suspended."""
    holding: threading.Event = field(default_factory=threading.Event)
    """Set while a call waits in `hold`."""
    opened: dict[str, int] = field(default_factory=dict)
    """Device name -> open count a test sets (a routed device in use)."""
    _next_minor: int = 10

    def _check_fail(self, op: str, name: str) -> None:
        for (fop, prefix), code in list(self.fail.items()):
            if fop == op and (name == prefix[:-1] if prefix.endswith("$") else name.startswith(prefix)):
                codes = code if isinstance(code, list) else [code]
                code = codes.pop(0)
                if not codes:
                    del self.fail[(fop, prefix)]
                command = {"load": DmCommand.TABLE_LOAD, "suspend": DmCommand.DEV_SUSPEND,
                           "resume": DmCommand.DEV_SUSPEND}.get(op, DmCommand.DEV_CREATE)
                raise DmIoctlError(command, name, code, f"injected {errno.errorcode[code]}")

    def _find(self, name: str | None, uuid: str | None, command: DmCommand) -> FakeDmDevice:
        """By name or by uuid, as the dm ioctls address a device (exactly one of them)."""
        assert (name is None) != (uuid is None), "give exactly one of name or uuid"
        device = self.devices.get(name) if name is not None else next(
            (d for d in list(self.devices.values()) if d.uuid == uuid), None)
        if device is None:
            raise DmIoctlError(command, name or uuid, errno.ENXIO, "No such device or address")
        return device

    def _owned(self, name: str | None, command: DmCommand, uuid: str | None = None) -> FakeDmDevice:
        device = self._find(name, uuid, command)
        name = device.name
        if not device.uuid.startswith(UUID_PREFIX):
            raise NotOwnedError(command, name, device.uuid, UUID_PREFIX)
        return device

    def add_foreign(self, name: str, uuid: str, dev_minor: int) -> None:
        """A device someone else made (e.g. multipathd's map)."""
        self.devices[name] = FakeDmDevice(name, uuid, dev_minor, suspended=False)

    def device_create(self, name: str, uuid: str):
        self.log.append(("create", name))
        self._check_fail("create", name)
        if not uuid.startswith(UUID_PREFIX):
            raise NotOwnedError(DmCommand.DEV_CREATE, name, uuid, UUID_PREFIX)
        if name in self.devices or any(d.uuid == uuid for d in list(self.devices.values())):
            raise DmIoctlError(DmCommand.DEV_CREATE, name, errno.EBUSY, "Device or resource busy")
        self.devices[name] = FakeDmDevice(name, uuid, self._next_minor)
        self._next_minor += 1
        return self.device_info(name)

    def table_load(self, name: str | None, targets, *, uuid: str | None = None):
        device = self._owned(name, DmCommand.TABLE_LOAD, uuid)
        name = device.name
        self.log.append(("load", name))
        self._check_fail("load", name)
        for _start, _length, kind, params in targets:
            for dev in _devices_in(kind, params):
                if dev.startswith("253:") and not any(d.dev == dev for d in list(self.devices.values())):
                    raise DmIoctlError(DmCommand.TABLE_LOAD, name, errno.ENXIO, f"no device {dev}")
            if kind == "switch":
                SwitchParams.parse(f"{_start} {_length} switch {params}")
        device.inactive = [tuple(t) for t in targets]
        return self.device_info(name)

    def device_suspend(self, name: str | None = None, *, uuid: str | None = None, **_):
        device = self._owned(name, DmCommand.DEV_SUSPEND, uuid)
        self.log.append(("suspend", device.name))
        self._check_fail("suspend", device.name)
        device.suspended = True
        self._held(device)

    def device_resume(self, name: str | None = None, *, uuid: str | None = None, udev_flags: int = 0,
                      wait_for_udev: bool = True, **_):
        device = self._owned(name, DmCommand.DEV_SUSPEND, uuid)
        self.log.append(("resume", device.name))
        if device.inactive is not None:
            # dm-ioctl.c do_resume: the device is suspended before the swap, and a failed
            # swap leaves it suspended, its new table dropped.
            device.suspended = True
            self._held(device)
            try:
                self._check_fail("resume", device.name)
            except DmIoctlError:
                device.inactive = None
                raise
        else:
            self._check_fail("resume", device.name)
        if device.inactive is not None:
            device.live, device.inactive = device.inactive, None
            device.failed = set()
            _start, length, kind, params = device.live[0]
            if kind == "switch":
                # drivers/md/dm-switch.c: every constructor starts round-robin.
                table = SwitchParams.parse(params)
                # int16 (paths <= 254): many-LUN benchmarks trace this process's memory, fakes included.
                device.regions = round_robin(-(-length // table.region_size), table.nr_paths).astype(np.int16)
            else:
                device.regions = None
        device.suspended = False
        device.udev_flags = udev_flags

    def _held(self, device: FakeDmDevice) -> None:
        release = self.hold.get(device.name)
        if release is not None:
            self.holding.set()
            assert release.wait(timeout=30), f"{device.name}: held suspended for 30 s"

    def table_clear(self, name: str | None = None, *, uuid: str | None = None):
        device = self._owned(name, DmCommand.TABLE_CLEAR, uuid)
        self.log.append(("clear", device.name))
        device.inactive = None
        return self.device_info(device.name)

    def device_remove(self, name: str | None = None, *, uuid: str | None = None, **_):
        device = self._owned(name, DmCommand.DEV_REMOVE, uuid)
        name = device.name
        self.log.append(("remove", name))
        for other in list(self.devices.values()):
            if other.live and any(device.dev in _devices_in(t[2], t[3]) for t in other.live):
                raise DmIoctlError(DmCommand.DEV_REMOVE, name, errno.EBUSY, f"held by {other.name}")
        del self.devices[name]

    def device_info(self, name: str | None = None, *, uuid: str | None = None):
        device = self._find(name, uuid, DmCommand.DEV_STATUS)
        return SimpleNamespace(name=device.name, uuid=device.uuid, major=253, minor=device.minor,
                               suspended=device.suspended, open_count=self.opened.get(device.name, 0))

    def list_devices(self):
        self.log.append(("list", ""))
        # list(): the daemon calls dm from several threads, and a create may land meanwhile.
        return [SimpleNamespace(name=d.name, uuid=d.uuid, major=253, minor=d.minor, event_nr=d.event_nr)
                for d in list(self.devices.values())]

    def table_status(self, name: str | None = None, *, uuid: str | None = None):
        """STATUSTYPE_INFO of a multipath leg, as dm-mpath.c prints it (round-robin: no per-path args)."""
        device = self._find(name, uuid, DmCommand.TABLE_STATUS)
        self.log.append(("status", device.name))
        start, length, kind, params = device.live[0]
        assert kind == "multipath"
        groups = _mpath_groups(params)
        words = ["2", "0", "0", "0", str(len(groups)), "1"]
        for g, paths in enumerate(groups):
            words += ["A" if g == 0 else "E", "0", str(len(paths)), "0"]
            for dev in paths:
                words += [dev, "F" if dev in device.failed else "A", "1" if dev in device.failed else "0"]
        return [SimpleNamespace(start_sector=start, length_sectors=length, target_type=kind,
                                params=" ".join(words))]

    def target_message(self, name: str | None, sector: int, message: str, *, uuid: str | None = None):
        device = self._owned(name, DmCommand.TARGET_MSG, uuid)
        name = device.name
        self.log.append(("message", name))
        verb, _, dev = message.partition(" ")
        if verb in ("fail_path", "reinstate_path") and device.live and device.live[0][2] == "multipath":
            if dev not in _devices_in("multipath", device.live[0][3]):
                raise DmIoctlError(DmCommand.TARGET_MSG, name, errno.EINVAL, f"no path {dev}")
            (device.failed.add if verb == "fail_path" else device.failed.discard)(dev)
            device.event_nr += 1  # dm-mpath.c: trigger_event -> dm_table_event
            return None
        if device.regions is None:
            raise DmIoctlError(DmCommand.TARGET_MSG, name, errno.EINVAL, "target does not take messages")
        nr_paths = int(device.live[0][3].split()[0])
        try:
            apply_region_mappings(device.regions, message, nr_paths)
        except DmSwitchMessageError as exc:
            raise DmIoctlError(DmCommand.TARGET_MSG, name, errno.EINVAL, str(exc)) from exc

    # -- following I/O down the stack ------------------------------------------------

    def by_dev(self, dev: str) -> FakeDmDevice:
        return next(d for d in list(self.devices.values()) if d.dev == dev)

    def route_region(self, top: str, region: int) -> tuple[str, ...]:
        """The preferred paths (major:minor) that a region of the top device reaches."""
        top_dev = self.devices[top]
        (_s, _l, kind, params) = top_dev.live[0]
        assert kind == "linear"
        switch = self.by_dev(LinearParams.parse(params).device)
        assert switch.live[0][2] == "switch" and not switch.suspended
        legs = SwitchParams.parse(switch.live[0][3]).devices
        leg = self.by_dev(legs[int(switch.regions[region])])
        return _first_group_paths(leg.live[0][3])


def _devices_in(kind: str, params: str) -> list[str]:
    if kind == "linear":
        return [LinearParams.parse(params).device]
    if kind == "switch":
        return list(SwitchParams.parse(params).devices)
    if kind == "multipath":
        return [dev for group in _mpath_groups(params) for dev in group]
    return []


def _mpath_groups(params: str) -> list[tuple[str, ...]]:
    """Each priority group's paths, from a multipath table line's parameters."""
    return [tuple(group.paths) for group in MultipathParams.parse(params).groups]


def _sd_name(index: int) -> str:
    """The kernel's sd naming: sda..sdz, sdaa..sdzz, ..."""
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = "abcdefghijklmnopqrstuvwxyz"[rest] + letters
    return "sd" + letters


def _first_group_paths(params: str) -> tuple[str, ...]:
    """Paths of a multipath table's first priority group (the kernel's initial group is 1)."""
    return _mpath_groups(params)[0]


class FakeSystem:
    """An emulated array LUN behind multipathd's map, with paths_per_member paths to each member."""

    def __init__(self, *, size_bytes: int = 3 * 1024 * MiB, page_size_bytes: int = 16 * MiB, members: int = 3,
                 layout: str = "striped", paths_per_member: int = 2, tmp_path=None, seed: int = 0,
                 volume_name: str = "vol0", dm: FakeDeviceMapper | None = None, first_path: int = 0):
        self.volume = ArrayVolume(size_bytes=size_bytes, page_size_bytes=page_size_bytes, members=members,
                                  layout=layout, seed=seed)
        self.store = SparseStore(tmp_path, size_bytes)
        self.lu = LogicalUnit(self.volume, self.store, LuIdentity.for_volume(volume_name))
        self.dm = dm if dm is not None else FakeDeviceMapper()
        self.first_path = first_path
        """Paths are numbered from here: LUNs sharing one dm (ManyLunSystem) get distinct sd names."""
        self.paths: dict[str, FakeArrayPath] = {}
        self.devs: dict[str, str] = {}
        for k in range(members):
            for j in range(paths_per_member):
                self.add_path(k)
        self.wwid = self.lu.identity.wwid
        self.mpath_present = True
        self.alias = self.wwid
        """multipathd's name for the map (user_friendly_names or an alias in multipath.conf)."""
        self.rescans: list[str] = []
        self.rescan_follows_array = True
        self.map_size_bytes: int | None = None
        """multipathd's map's own size, when a test sets it (None: not reported)."""
        """False: a path whose capacity a rescan does not change (a stale or broken path)."""
        self.mpath_size_bytes = size_bytes
        """What the paths' sizes say; follows the array after a rescan (or resize())."""
        self.not_in_mpath: set[str] = set()
        """Paths the kernel has but multipathd's map does not hold yet."""
        self.dm.add_foreign(self.wwid, f"mpath-{self.wwid}", 0)

    def add_path(self, member_number: int) -> str:
        index = self.first_path + len(self.paths)
        name = _sd_name(index + 1)
        self.paths[name] = FakeArrayPath(self.lu, member_number, name)
        self.devs[name] = f"8:{16 * (index + 1)}"
        return name

    def resize(self, size_bytes: int) -> None:
        """The array grows or shrinks the volume and the paths' sizes follow (as after a rescan)."""
        self.volume.resize(size_bytes)
        self.store.resize(size_bytes)
        self.mpath_size_bytes = size_bytes

    async def rescan_path(self, device: str) -> None:
        self.rescans.append(device)
        if self.rescan_follows_array:
            self.mpath_size_bytes = self.volume.size_bytes

    def member_of_dev(self, dev: str) -> int:
        name = next(n for n, d in self.devs.items() if d == dev)
        return self.paths[name].member_number

    async def find_mpath_maps(self, wwid: str | None = None) -> list[MpathMap]:
        if not self.mpath_present:
            return []
        return [MpathMap(self.wwid, self.alias, "dm-0", self.mpath_size_bytes // 512,
                         tuple((n, self.devs[n]) for n in self.paths if n not in self.not_in_mpath),
                         None if self.map_size_bytes is None else self.map_size_bytes // 512)]

    def open_path(self, device: str) -> FakeArrayPath:
        return self.paths[device]

    async def path_identities(self, devices: list[str]) -> dict[str, str]:
        """Running paths by their session (a broken path is not running)."""
        return {d: f"host{self.paths[d].session}/session{self.paths[d].session}" for d in devices
                if d in self.paths and not self.paths[d].broken}

    async def describe_path(self, device: str, luns=None) -> NewPath | None:
        if device not in self.paths or (luns is not None and self.wwid not in luns):
            return None
        return NewPath(device, self.devs[device], self.wwid, self.mpath_size_bytes // 512)

    def hctl_of(self, device: str) -> str:
        """The scsi_device name of a path: one iSCSI session (host) per path."""
        return f"{list(self.paths).index(device) + 2}:0:0:0"

    async def block_devices_of_scsi(self, scsi_sys_path: str) -> list[str]:
        hctl = scsi_sys_path.rstrip("/").rsplit("/", 1)[-1]
        return [name for name in self.paths if self.hctl_of(name) == hctl]

    # -- what the tests assert --------------------------------------------------------

    def misrouted_pages(self, top: str) -> int:
        """Pages whose I/O would reach a path of another member than the page's owner."""
        bad = 0
        owners = self.volume.owners
        for page in range(self.volume.total_pages):
            if owners[page] < 0:
                continue
            owner_number = self.volume.members[owners[page]].number
            reached = {self.member_of_dev(d) for d in self.dm.route_region(top, page)}
            bad += reached != {owner_number}
        return bad


class ManyLunSystem:
    """Many emulated LUNs (one FakeSystem each) behind one FakeDeviceMapper, as one host sees them."""

    def __init__(self, luns: int, *, tmp_path, **kwargs):
        self.dm = FakeDeviceMapper()
        self.systems: list[FakeSystem] = []
        first_path = 0
        for i in range(luns):
            system = FakeSystem(tmp_path=tmp_path / f"store{i}", volume_name=f"vol{i}", seed=i, dm=self.dm,
                                first_path=first_path, **kwargs)
            first_path += len(system.paths)
            self.systems.append(system)
        self._owner = {name: s for s in self.systems for name in s.paths}

    async def find_mpath_maps(self, wwid: str | None = None) -> list[MpathMap]:
        return [m for s in self.systems if wwid in (None, s.wwid) for m in await s.find_mpath_maps(wwid)]

    def open_path(self, device: str) -> FakeArrayPath:
        return self._owner[device].open_path(device)

    async def path_identities(self, devices: list[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        for system in self.systems:
            found.update(await system.path_identities([d for d in devices if d in system.paths]))
        return found

    async def describe_path(self, device: str, luns=None) -> NewPath | None:
        system = self._owner.get(device)
        return await system.describe_path(device, luns) if system else None

    async def rescan_path(self, device: str) -> None:
        await self._owner[device].rescan_path(device)

    async def block_devices_of_scsi(self, scsi_sys_path: str) -> list[str]:
        return []
