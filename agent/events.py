"""Which udev events matter to the agent, and what each asks for. Pure: properties in, a Trigger out."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Mapping

from agent.config import UUID_PREFIX
from agent.stack import OwnedUuid

MPATH_UUID_PREFIX = "mpath-"  # multipath-tools libmultipath/devmapper.h UUID_PREFIX
LEG_UUID_PREFIX = UUID_PREFIX + "leg-"
SCSI_DISK_NAME = re.compile(r"sd[a-z]+")  # sd.c's names; partitions (sda1) are not paths


class TriggerKind(enum.StrEnum):
    """What an event asks of the daemon."""

    MPATH_READY = "mpath-ready"
    """multipathd's map appeared or was reloaded: (re)build routing."""
    MPATH_GONE = "mpath-gone"
    """multipathd's map went away."""
    PATH_EVENT = "path-event"
    """multipathd's map failed or reinstated a path."""
    LEG_PATH_EVENT = "leg-path-event"
    """one of our legs failed or reinstated a path."""
    UNIT_ATTENTION = "unit-attention"
    """a path reported a change: re-check its LUN's map."""
    PATH_ADDED = "path-added"
    """a new SCSI disk (``detail`` its kernel name) that may be a new path of a LUN."""


@dataclass(frozen=True)
class Trigger:
    """Something to do about one LUN (wwid) or one SCSI device (scsi_sys_path)."""

    kind: TriggerKind
    wwid: str | None = None
    scsi_sys_path: str | None = None
    detail: str = ""


def classify(action: str, subsystem: str, devtype: str | None, sys_path: str,
             properties: Mapping[str, str]) -> Trigger | None:
    """Map one udev event to a Trigger, or None when it is none of our business."""
    if subsystem == "scsi" and devtype == "scsi_device" and action == "change":
        ua = properties.get("SDEV_UA")
        return Trigger(TriggerKind.UNIT_ATTENTION, scsi_sys_path=sys_path, detail=ua) if ua else None
    if subsystem != "block" or devtype != "disk":
        return None
    name = sys_path.rstrip("/").rsplit("/", 1)[-1]
    if action == "add" and SCSI_DISK_NAME.fullmatch(name):
        # Seen from the kernel's own uevent, seconds before multipathd has it in its map.
        return Trigger(TriggerKind.PATH_ADDED, detail=name)
    uuid = properties.get("DM_UUID", "")
    if uuid.startswith(LEG_UUID_PREFIX) and properties.get("DM_ACTION", "").startswith("PATH_"):
        # dm-mpath failed (or reinstated) a path inside one of our legs (dm-uevent.c).
        owned = OwnedUuid.parse(uuid)
        return Trigger(TriggerKind.LEG_PATH_EVENT, wwid=owned.wwid, detail=properties["DM_ACTION"]) if owned else None
    if not uuid.startswith(MPATH_UUID_PREFIX):
        return None
    wwid = uuid[len(MPATH_UUID_PREFIX):]
    if not wwid or not _safe(wwid):
        return None
    if action == "remove":
        return Trigger(TriggerKind.MPATH_GONE, wwid=wwid)
    if action not in ("add", "change"):
        return None
    # 11-dm-mpath.rules: MPATH_DEVICE_READY=0 is a map with no usable path; wait for it.
    if properties.get("MPATH_DEVICE_READY") == "0":
        return None
    if properties.get("DM_ACTION", "").startswith("PATH_"):
        return Trigger(TriggerKind.PATH_EVENT, wwid=wwid, detail=properties["DM_ACTION"])
    # A reload of a live map (MPATH_UNCHANGED=1: multipathd added or dropped a path) tells other
    # rules not to probe the device again, and sets DM_UDEV_DISABLE_OTHER_RULES_FLAG for that. We
    # never open the map itself, only sysfs and its paths, and a changed path set is exactly our
    # business. Any other reason for the flag (a map not set up yet) means: wait.
    if properties.get("DM_UDEV_DISABLE_OTHER_RULES_FLAG") == "1" and properties.get("MPATH_UNCHANGED") != "1":
        return None
    return Trigger(TriggerKind.MPATH_READY, wwid=wwid)


def _safe(wwid: str) -> bool:
    """A wwid we will put into dm names and uuids: no separators, no control characters."""
    return len(wwid) <= 96 and all(c.isalnum() or c in "._:-" for c in wwid)
