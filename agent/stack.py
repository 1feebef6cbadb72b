"""What the device stack of one LUN should be: names, uuids and table lines. Pure, no I/O.

    /dev/mapper/<device_name>        top: linear over the current switch (what users open)
      └── <device_name>-sw<epoch>    dm-switch, one region per array page
            ├── <device_name>-leg<k>-<epoch>   dm-multipath: member k's paths first,
            ...                                 every other path as a fallback group

The top device never changes identity. A rebuild (resize, new member, new
paths) builds and fully programs a new switch and legs under a new epoch,
then re-points the top device to it under suspend, so the routed device
never serves I/O through a switch whose map is incomplete: a switch table
load resets its region map to round-robin (drivers/md/dm-switch.c).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from agent.config import UUID_PREFIX, Config
from agent.topology import Topology
from protocol.dmtable import DmUdevFlags, LinearParams, SwitchParams, Target
from protocol.errors import SwitchAgentError
from protocol.multipath import MultipathParams
from protocol.pagemap import PageMap

class PlanError(SwitchAgentError):
    """The LUN as found cannot be routed (no paths, geometry the map does not cover...)."""

    def __init__(self, wwid: str, problem: str) -> None:
        self.wwid = wwid
        self.problem = problem
        super().__init__(f"{wwid}: {problem}")


@dataclass(frozen=True)
class DeviceSpec:
    """One dm device to create: its name, uuid, table and udev flags."""

    name: str
    uuid: str
    targets: tuple[Target, ...]
    udev_flags: DmUdevFlags = DmUdevFlags(0)


@dataclass(frozen=True)
class StackPlan:
    """The legs and switch of one epoch, and the top device's identity."""

    wwid: str
    epoch: int
    size_sectors: int
    region_size_sectors: int
    region_count: int
    legs: tuple[DeviceSpec, ...]
    leg_paths: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]
    """Per leg: (preferred path devs, fallback path devs) as major:minor."""
    switch_name: str
    switch_uuid: str
    top_name: str
    top_uuid: str

    def same_shape_as(self, other: StackPlan) -> bool:
        """True when the switch of `other` can carry this plan's map: same size, regions and legs.

        The legs' paths may differ: a leg's table is reloaded in place, and a
        switch keeps its region map through a reload of the devices under it.
        """
        return (self.size_sectors, self.region_size_sectors, len(self.legs)) == (
            other.size_sectors, other.region_size_sectors, len(other.legs))

    def switch_spec(self, leg_devs: list[str]) -> DeviceSpec:
        """The switch over the legs once their major:minor are known."""
        target = SwitchParams.build(self.size_sectors, self.region_size_sectors, leg_devs).target()
        return DeviceSpec(self.switch_name, self.switch_uuid, (target,), DmUdevFlags.HIDDEN)

    def top_targets(self, switch_dev: str) -> tuple[Target, ...]:
        """The top device's table: all of it, linear over the switch."""
        return (LinearParams.build(self.size_sectors, switch_dev, 0).target(),)


def top_name_for(config: Config, topology: Topology) -> str:
    """The routed device's stable name from the configured template."""
    return config.device_name.format(wwid=topology.wwid, mpath=topology.mpath_name)


def is_owned_uuid(uuid: str) -> bool:
    """True for any device this agent created."""
    return uuid.startswith(UUID_PREFIX)


class DeviceKind(enum.StrEnum):
    """The three kinds of device the agent makes, as their uuids name them."""

    TOP = "top"
    SWITCH = "sw"
    LEG = "leg"


@dataclass(frozen=True)
class OwnedUuid:
    """One of our device uuids: top-<wwid>, sw-<epoch>-<wwid> or leg-<k>-<epoch>-<wwid>, after our prefix.

    Built here and parsed here only: the uuid is how every change finds its device.
    """

    kind: DeviceKind
    wwid: str
    epoch: int | None = None
    leg: int | None = None

    @classmethod
    def top(cls, wwid: str) -> OwnedUuid:
        return cls(DeviceKind.TOP, wwid)

    @classmethod
    def switch(cls, epoch: int, wwid: str) -> OwnedUuid:
        return cls(DeviceKind.SWITCH, wwid, epoch)

    @classmethod
    def of_leg(cls, leg: int, epoch: int, wwid: str) -> OwnedUuid:
        return cls(DeviceKind.LEG, wwid, epoch, leg)

    @property
    def uuid(self) -> str:
        numbers = {DeviceKind.TOP: (), DeviceKind.SWITCH: (self.epoch,), DeviceKind.LEG: (self.leg, self.epoch)}
        return "-".join((f"{UUID_PREFIX}{self.kind}", *map(str, numbers[self.kind]), self.wwid))

    @classmethod
    def parse(cls, uuid: str) -> OwnedUuid | None:
        """Decode one of our device uuids; None for anybody else's (or a garbled one)."""
        if not is_owned_uuid(uuid):
            return None
        kind, _, rest = uuid[len(UUID_PREFIX):].partition("-")
        numbers = {"top": 0, "sw": 1, "leg": 2}.get(kind)
        if numbers is None:
            return None
        *digits, wwid = rest.split("-", numbers)
        if not wwid or len(digits) != numbers or not all(d.isdigit() for d in digits):
            return None
        if kind == DeviceKind.TOP:
            return cls.top(wwid)
        if kind == DeviceKind.SWITCH:
            return cls.switch(int(digits[0]), wwid)
        return cls.of_leg(int(digits[0]), int(digits[1]), wwid)


def plan_stack(config: Config, topology: Topology, page_map: PageMap, *, epoch: int,
               top_name: str | None = None) -> StackPlan:
    """Turn what discovery found and the array's map into the stack to build.

    `top_name`: the routed device's name when it exists already (it keeps it); else the template's.
    """
    wwid = topology.wwid
    usable = [p for p in topology.paths if p.usable]
    if not usable:
        raise PlanError(wwid, "no usable path")
    page = page_map.page_size_sectors
    region_count = -(-topology.size_sectors // page)
    if page_map.total_pages != region_count:
        raise PlanError(wwid, f"the array's map has {page_map.total_pages} pages of {page} sectors, "
                              f"the LUN's {topology.size_sectors} sectors need {region_count}")
    top = top_name or top_name_for(config, topology)
    # The config holds dm's counted argument lists ("round-robin 0", "1 queue_if_no_path").
    selector, _count, *selector_args = config.path_selector.split()
    features = config.leg_features.split()[1:]
    # A path to a member the map no longer lists is left out of every leg: the member is leaving
    # the array, its sessions are about to go, and a table naming a vanished disk fails to load.
    listed = {m.member_id for m in page_map.members}
    usable = [p for p in usable if p.member_id in listed] or usable
    legs, leg_paths = [], []
    for k, member in enumerate(page_map.members):
        own = tuple(p.dev for p in usable if p.member_id == member.member_id)
        other = tuple(p.dev for p in usable if p.member_id != member.member_id)
        groups = [g for g in (own, other) if g]
        target = MultipathParams.build(topology.size_sectors, groups, selector, selector_args=selector_args,
                                       features=features).target()
        legs.append(DeviceSpec(f"{top}-leg{k}-{epoch}", OwnedUuid.of_leg(k, epoch, wwid).uuid,
                               (target,), DmUdevFlags.HIDDEN))
        leg_paths.append((own, other))
    return StackPlan(wwid, epoch, topology.size_sectors, page, region_count, tuple(legs), tuple(leg_paths),
                     f"{top}-sw{epoch}", OwnedUuid.switch(epoch, wwid).uuid, top, OwnedUuid.top(wwid).uuid)
