"""The real kernel, shaped as the orchestrator's System: sysfs, SG_IO and device-mapper together."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
from typing import Container

from agent.config import UUID_PREFIX, Config
from agent.events import MPATH_UUID_PREFIX
from agent.kernel.dm import DeviceMapper
from agent.kernel.dm_abi import DeviceEntry
from agent.kernel.sgio import ScsiDevice
from agent.kernel.sysfs import BlockStack, IscsiSession, Sysfs, SysfsError
from agent.kernel.udev import PyudevSource, UdevMonitor
from agent.portals import read_member_portals
from agent.topology import MpathMap, NewPath
from protocol.portals import MemberPortals

LOG = logging.getLogger(__name__)

SGIO_THREADS = 32
"""Worker threads for every path's SG_IO, made as commands need them. A device
runs one command at a time, so a path stuck in SCSI error handling holds one;
a thread per path (192 for 64 LUNs of 3 members) cost memory and made the
idle daemon hard to profile. 32 covers max_parallel_luns reconciles
identifying their paths side by side, with room for stuck paths."""


class RealSystem:
    """What the daemon runs on: one dm control fd, one open sd node per path and a pool for their SG_IO, sysfs."""

    def __init__(self, config: Config, *, sysfs_root: str = "/sys", dev_root: str = "/dev") -> None:
        self.config = config
        self.sysfs = Sysfs(sysfs_root)
        self.dev_root = dev_root
        self.dm = DeviceMapper(UUID_PREFIX)
        self._paths: dict[str, ScsiDevice] = {}
        self._sgio = concurrent.futures.ThreadPoolExecutor(max_workers=SGIO_THREADS, thread_name_prefix="sgio")

    async def find_mpath_maps(self, wwid: str | None = None) -> list[MpathMap]:
        """Every multipathd map now (or only `wwid`'s), with its path devices; forgets paths that went away.

        One DM_LIST_DEVICES names every dm device with its uuid, so sysfs is
        read only for multipathd's maps, and all of those reads in one
        worker-thread call: a reconcile runs this each time, and under load
        every thread hop costs (docs/benchmarks.md, "Measurements behind the code").
        """
        wanted = MPATH_UUID_PREFIX + wwid if wwid else None
        entries = [e for e in await asyncio.to_thread(self.dm.list_devices)
                   if e.uuid == wanted or (wanted is None and e.uuid.startswith(MPATH_UUID_PREFIX))]
        stacks = await self.sysfs.stacks([f"dm-{e.minor}" for e in entries])
        maps = [_mpath_map(e, stacks[f"dm-{e.minor}"]) for e in entries if f"dm-{e.minor}" in stacks]
        # Close only what is gone: a path of no map may be one a reconcile took before multipathd.
        for name, scsi in list(self._paths.items()):
            if not self._still_open_on_node(scsi):
                self._paths.pop(name).close()
        return maps

    def _still_open_on_node(self, scsi: ScsiDevice) -> bool:
        """Whether the path's /dev node is still the one our fd was opened on (devtmpfs makes a new one per disk).

        One stat of the node's path against what the fd was opened on: every poll
        round asks this for every path, and more work here showed in the idle
        daemon's profile (docs/benchmarks.md, "Measurements behind the code").
        """
        try:
            node = os.stat(scsi.path)
        except OSError:
            return False
        return (node.st_ino, node.st_rdev) == scsi.opened_node

    async def describe_path(self, device: str, luns: Container[str] | None = None) -> NewPath | None:
        """A SCSI disk as a path candidate: its LUN (in multipath's naming), major:minor and size.

        None when it is gone, the kernel's identifier has no multipath form, or
        its LUN is not in `luns` (then only the identifier was read: a login
        brings many disks at once).
        """
        try:
            wwid = multipath_wwid(await self.sysfs.scsi_wwid(device))
            if wwid is None or (luns is not None and wwid not in luns):
                return None
            return NewPath(device, str(await self.sysfs.block_devnum(device)), wwid,
                           await self.sysfs.size_sectors(device))
        except SysfsError as exc:
            LOG.debug("%s: not a usable path: %s", device, exc)
            return None

    async def path_identities(self, devices: list[str]) -> dict[str, str]:
        """What names each running iSCSI path's session while it lives (others are left out)."""
        return await self.sysfs.iscsi_path_identities(devices)

    def open_path(self, device: str) -> ScsiDevice:
        """The sd node of a path, opened once and kept for SG_IO (again if the node was replaced)."""
        scsi = self._paths.get(device)
        if scsi is not None and not self._still_open_on_node(scsi):
            # The disk went and a new one took its name (a session logged out and back in):
            # the old fd talks to a deleted device.
            self._paths.pop(device).close()
            scsi = None
        if scsi is None:
            scsi = ScsiDevice(os.path.join(self.dev_root, device), sysfs=self.sysfs, executor=self._sgio,
                              timeout_ms=int(self.config.scsi_timeout_s * 1000))
            self._paths[device] = scsi
        return scsi

    async def rescan_path(self, device: str) -> None:
        """Make the kernel re-read a path's capacity (it does not on CAPACITY DATA HAS CHANGED);
        the write returns once the rescan is done."""
        await self.sysfs.write_attr("1", "block", device, "device", "rescan")

    async def iscsi_sessions(self) -> list[IscsiSession]:
        """Every iSCSI session (sysfs), for the session keeper."""
        return await self.sysfs.iscsi_sessions()

    async def disk_devnum(self, disk: str) -> str:
        """``major:minor`` of an sd disk."""
        return str(await self.sysfs.block_devnum(disk))

    async def read_member_portals(self, device: str) -> tuple[MemberPortals, ...] | None:
        """VPD 0xC1 over a path (None: the array does not offer it)."""
        return await read_member_portals(self.open_path(device))

    async def block_devices_of_scsi(self, scsi_sys_path: str) -> list[str]:
        """The sd names under a scsi_device (a unit attention names the scsi_device only)."""
        try:
            return await self.sysfs.list_dir(os.path.join(scsi_sys_path, "block"))
        except SysfsError:
            return []


def _mpath_map(entry: DeviceEntry, stack: BlockStack) -> MpathMap:
    # The legs sit on the paths, not on multipathd's map: their size is what counts, and
    # after a rescan it follows the array even when multipathd's map has not been resized.
    size = min(s for _, _, s in stack.slaves) if stack.slaves else stack.size_sectors
    return MpathMap(entry.uuid[len(MPATH_UUID_PREFIX):], entry.name, f"dm-{entry.minor}", size,
                    tuple((slave, str(dev)) for slave, dev, _ in stack.slaves), stack.size_sectors)


def multipath_wwid(kernel_wwid: str) -> str | None:
    """The kernel's LU identifier (sysfs ``device/wwid``) as multipath names the LUN, or None.

    multipath's default wwid is udev's ID_SERIAL from scsi_id: the designator
    type as one hex digit, then the identifier in lower-case hex (NAA: "3",
    EUI-64: "2"). Other forms get None: the path then waits for multipathd.
    """
    kind, _, ident = kernel_wwid.strip().partition(".")
    prefix = {"naa": "3", "eui": "2"}.get(kind)
    if prefix is None or not ident or any(c not in "0123456789abcdefABCDEF" for c in ident):
        return None
    return prefix + ident.lower()


def open_udev_events() -> UdevMonitor:
    """The monitor the daemon follows: udev's block/disk and scsi/scsi_device events, plus the
    kernel's own block/disk uevents, which name a new path's disk before udev's rules and
    multipathd have run (seconds, under load)."""
    sources = [PyudevSource()]
    try:
        sources.append(PyudevSource((("block", "disk"),), netlink="kernel"))
    except OSError as exc:  # e.g. a container without the kernel's uevent group: multipathd's events still come
        LOG.warning("no kernel uevents (%s): new paths reach the legs once multipathd has them", exc)
    monitor = UdevMonitor(*sources)
    monitor.start()
    return monitor
