"""The emulated array's LIO side, through rtslib-fb: one iSCSI target, one TPG+portal+user backstore per member.

A TCMU command does not say which target port it came in on, so each member
gets its own user backstore, exported only through its own TPG (tag k+1)
and portal (127.0.0.(k+1):3260): the uio device a command arrives on names
the member. All backstores carry the same unit serial (`wwn`). With `chap`
every TPG requires one-way CHAP (demo-mode auth: authentication=1 and the
TPG's auth/userid, auth/password); SendTargets discovery stays open.

Order matters at teardown (docs/emulator.md): sessions must be gone before
portals are deleted, or the kernel can hang in iscsit_reset_np_thread; the
control CLI logs out first, then asks the server to delete.
"""

from __future__ import annotations

import logging
import re
import subprocess
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

from tests.array.errors import LioError

DEFAULT_IQN = "iqn.2026-11.org.switch-agent:vol0"
HANDLER_SUBTYPE = "swemu"
PORT = 3260
# 1 MiB per command (the user backstore's default is 64 KiB), like fileio, so
# large sequential I/O is not split eight ways before reaching the handler.
HW_MAX_SECTORS = 2048
# Demo mode: any initiator may log in and sees LUN 0 read-write, no CHAP.
DEMO_MODE_ATTRIBUTES = (("generate_node_acls", 1), ("cache_dynamic_acls", 1),
                        ("demo_mode_write_protect", 0), ("authentication", 0))
KERNEL_MODULES = ("target_core_mod", "target_core_user", "iscsi_target_mod")
# No tcmu-runner: do not make `enable` wait for a netlink reply.
CONTROL = "nl_reply_supported=-1"
# With many LUNs: the kernel vmallocs each backstore's command ring (8 MiB by
# default), 192 of which would not fit a 2-3 GiB guest; 1 MiB holds ~100 commands.
SMALL_RING_CONTROL = CONTROL + ",cmd_ring_size_mb=1,max_data_area_mb=16"
_EXTRA_VOLUME = re.compile(r"vol\d+_m\d+")

CHAP_ENV = "SWEMU_CHAP"
"""How `up` hands the server its CHAP credentials: off the process's argv."""
MAX_CHAP_FIELD = 255  # LIO's auth/userid and auth/password hold up to 255 characters

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Chap:
    """CHAP credentials every member's TPG requires (one-way: the initiator proves itself)."""

    userid: str
    password: str

    def __repr__(self) -> str:  # never print the secret
        return f"Chap(userid={self.userid!r}, password=<{len(self.password)} characters>)"


def parse_chap(text: str) -> Chap:
    """``USER:PASSWORD`` (split at the first colon): printable ASCII, no blanks, 1-255 characters each."""
    userid, sep, password = text.strip().partition(":")
    for name, value in (("user", userid), ("password", password)):
        if not sep or not 1 <= len(value) <= MAX_CHAP_FIELD or not value.isascii() \
                or not value.isprintable() or any(c.isspace() for c in value):
            raise LioError(f"CHAP {name}: expected USER:PASSWORD, printable ASCII without blanks, "
                           f"1-{MAX_CHAP_FIELD} characters each")
    return Chap(userid, password)


def member_config(volume: str, number: int) -> str:
    """The TCMU config string of member `number`'s backstore (uio name suffix)."""
    return f"{HANDLER_SUBTYPE}/{volume}/m{number}"


def load_modules() -> None:
    """modprobe what a user backstore behind an iSCSI target needs (idempotent)."""
    for module in KERNEL_MODULES:
        result = subprocess.run(["modprobe", module], capture_output=True, text=True)
        if result.returncode:
            raise LioError(f"modprobe {module} failed: {result.stderr.strip()}")
    if not Path("/sys/kernel/config/target").is_dir():
        raise LioError("configfs is not mounted at /sys/kernel/config (mount -t configfs none /sys/kernel/config)")


class LioArray:
    """Creates and deletes the LIO objects of one emulated volume."""

    def __init__(self, *, iqn: str = DEFAULT_IQN, volume: str = "vol0", serial: str,
                 control: str = CONTROL, chap: Chap | None = None) -> None:
        import rtslib_fb  # only in the guest: the host has no configfs

        # rtslib's RTSRoot insists on its dbroot directory existing, though we save nothing:
        # /etc/target for PyPI's rtslib-fb, /etc/rtslib-fb-target for Debian's python3-rtslib-fb.
        for dbroot in ("/etc/target", "/etc/rtslib-fb-target"):
            Path(dbroot).mkdir(exist_ok=True)
        self._rts = rtslib_fb
        self.iqn = iqn
        self.volume = volume
        self.serial = serial
        self.control = control
        self.chap = chap
        self._target = None

    def _storage_name(self, number: int) -> str:
        return f"{self.volume}_m{number}"

    def create_target(self) -> None:
        """The iSCSI target (no TPG yet). Refuses if one with our IQN is left over."""
        rts = self._rts
        try:
            fabric = rts.FabricModule("iscsi")
            self._target = rts.Target(fabric, self.iqn, mode="create")
        except rts.RTSLibError as exc:
            raise LioError(f"cannot create target {self.iqn}: {exc} "
                           "(left over from a crashed run? python -m tests.array down --force)") from exc

    def add_member(self, number: int, size_bytes: int) -> str:
        """Backstore, TPG, portal and LUN 0 of member `number`; returns the backstore's config string.

        The backstore is enabled here; the caller then opens its uio device
        and must serve it before anyone logs in.
        """
        rts = self._rts
        config = member_config(self.volume, number)
        try:
            storage = rts.UserBackedStorageObject(
                self._storage_name(number), config=config, size=size_bytes, wwn=self.serial,
                hw_max_sectors=HW_MAX_SECTORS, control=self.control)
            tpg = rts.TPG(self._require_target(), number + 1, mode="create")
            for name, value in DEMO_MODE_ATTRIBUTES:
                tpg.set_attribute(name, value)
            if self.chap is not None:
                # Demo mode's generated ACLs authenticate with the TPG's own auth/ credentials.
                tpg.chap_userid = self.chap.userid
                tpg.chap_password = self.chap.password
                tpg.set_attribute("authentication", 1)
            rts.NetworkPortal(tpg, f"127.0.0.{number + 1}", PORT, mode="create")
            rts.LUN(tpg, 0, storage)
            tpg.enable = True
        except rts.RTSLibError as exc:
            raise LioError(f"cannot set up member m{number}: {exc}") from exc
        return config

    def add_lun(self, number: int, lun: int, volume: str, serial: str, size_bytes: int) -> str:
        """Another volume as LUN `lun` of member `number`'s TPG (made by add_member); returns its config string."""
        rts = self._rts
        config = member_config(volume, number)
        try:
            storage = rts.UserBackedStorageObject(
                f"{volume}_m{number}", config=config, size=size_bytes, wwn=serial,
                hw_max_sectors=HW_MAX_SECTORS, control=self.control)
            tpg = next(t for t in self._require_target().tpgs if t.tag == number + 1)
            rts.LUN(tpg, lun, storage)
        except (rts.RTSLibError, StopIteration) as exc:
            raise LioError(f"cannot add LUN {lun} ({volume}) to member m{number}: {exc!r}") from exc
        return config

    def remove_lun_storage(self, volume: str, number: int) -> None:
        """Delete the backstore of `volume` on member `number` (after its uio device is closed)."""
        rts = self._rts
        try:
            rts.UserBackedStorageObject(f"{volume}_m{number}").delete()
        except rts.RTSLibError as exc:
            raise LioError(f"cannot delete backstore {volume}_m{number}: {exc}") from exc

    def remove_member_port(self, number: int) -> None:
        """Delete member `number`'s TPG (its LUN and portal); sessions must already be logged out."""
        for tpg in self._require_target().tpgs:
            if tpg.tag == number + 1:
                tpg.delete()
                return

    def remove_member_storage(self, number: int) -> None:
        """Delete member `number`'s backstore (after its uio device is closed)."""
        rts = self._rts
        try:
            rts.UserBackedStorageObject(self._storage_name(number)).delete()
        except rts.RTSLibError as exc:
            raise LioError(f"cannot delete backstore of m{number}: {exc}") from exc

    def set_size(self, number: int, size_bytes: int) -> None:
        """Tell LIO member `number`'s new size (our handler answers READ CAPACITY; this is for tidiness)."""
        rts = self._rts
        storage = rts.UserBackedStorageObject(self._storage_name(number))
        try:
            storage.set_attribute("dev_size", str(size_bytes))
        except (rts.RTSLibError, OSError) as exc:
            log.warning("could not update LIO's dev_size of m%d: %s", number, exc)

    def delete_target(self) -> None:
        """Delete the target with every TPG, LUN and portal (sessions must be gone)."""
        if self._target is not None:
            self._target.delete()
            self._target = None

    def _require_target(self):
        if self._target is None:
            raise LioError("target not created")
        return self._target


def delete_target_and_storage(root, iqn: str, is_ours: Callable[[object], bool]) -> list[str]:
    """Delete target `iqn` and the storage objects `is_ours` picks from an RTSRoot; returns what went.

    The target first: its LUNs hold the storage objects.
    """
    deleted = []
    for target in list(root.targets):
        if target.wwn == iqn:
            target.delete()
            deleted.append(f"target {iqn}")
    for storage in list(root.storage_objects):
        if is_ours(storage):
            storage.delete()
            deleted.append(f"backstore {storage.name}")
    return deleted


def delete_leftovers(iqn: str = DEFAULT_IQN, volume: str = "vol0") -> list[str]:
    """Remove a target and backstores a crashed run left behind; returns what was deleted."""
    import rtslib_fb as rts

    # vol<i>_m<k>: the extra volumes of `up --luns N`.
    return delete_target_and_storage(
        rts.RTSRoot(), iqn, lambda storage: storage.plugin == "user" and (
            storage.name.startswith(f"{volume}_m") or bool(_EXTRA_VOLUME.fullmatch(storage.name))))
