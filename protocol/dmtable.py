"""Device-mapper table lines, typed: one :class:`Target` per line, one params class per target type.

A table line is ``<start> <length> <target type> <params>`` in 512-byte
sectors. The params classes (:class:`LinearParams`, :class:`SwitchParams`;
dm-multipath's lives in :mod:`protocol.multipath` with its status parser)
each refuse what the target's constructor in the kernel would refuse
(``build``, raising EncodeError), render their params, and parse a table
as the kernel or dmsetup prints it (``parse``, raising DecodeError).
Kernel rules are quoted from ``drivers/md/dm-switch.c`` (target 1.1.0),
``drivers/md/dm-linear.c`` and ``drivers/md/dm-table.c``, and the target grammar is the kernel's
Documentation/admin-guide/device-mapper/. Pure: nothing here touches a device.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from protocol.errors import EncodeError, TruncatedError, ValueRangeError

__all__ = [
    "MESSAGE_NAME",
    "MAX_MESSAGE_TOKENS",
    "MAX_SWITCH_PATHS",
    "Device",
    "DmUdevFlags",
    "Target",
    "LinearParams",
    "SwitchParams",
]

#: dm-switch's message verb; dm-switch.c switch_message compares it with strcasecmp.
MESSAGE_NAME = "set_region_mappings"

#: argv entries (verb included) we allow in one message. dm_split_args
#: (dm-table.c) grows argv with kmalloc_array, doubling; 64k pointers is a
#: 512 KiB allocation, well below KMALLOC_MAX_SIZE (4 MiB on x86_64).
MAX_MESSAGE_TOKENS = 65536

#: switch_ctr's bound on <num_paths>: (KMALLOC_MAX_SIZE - sizeof(struct
#: switch_ctx)) / sizeof(struct switch_path) = (4 MiB - 40) / 16 on x86_64.
MAX_SWITCH_PATHS = (4 * 1024 * 1024 - 40) // 16

UINT_MAX = 2**32 - 1
ULONG_MAX = 2**64 - 1
SECTOR_MAX = 2**64 - 1
# MKDEV: 12-bit major, 20-bit minor (MINORBITS); dm_devt_from_path rejects
# numbers that do not survive MKDEV with -EOVERFLOW (dm-table.c).
_MAJOR_MAX = 2**12 - 1
_MINOR_MAX = 2**20 - 1

Device = str | tuple[int, int]
"""A block device as a table names it: ``"major:minor"`` or ``(major, minor)``."""

DEV_RE = re.compile(r"([0-9]+):([0-9]+)")
_TOKEN_RE = re.compile(r"[^\s\\]+")


class DmUdevFlags(enum.IntFlag):
    """libdm's udev flags (libdm/libdevmapper.h), carried in the high half of a udev cookie."""

    DISABLE_DM_RULES = 0x0001
    DISABLE_SUBSYSTEM_RULES = 0x0002
    DISABLE_DISK_RULES = 0x0004
    DISABLE_OTHER_RULES = 0x0008
    LOW_PRIORITY = 0x0010
    DISABLE_LIBRARY_FALLBACK = 0x0020
    PRIMARY_SOURCE = 0x0040
    # Keeps legs and switch away from blkid/LVM and other rules, so only the
    # top device shows the volume's data.
    HIDDEN = DISABLE_DISK_RULES | DISABLE_OTHER_RULES


class Target(NamedTuple):
    """One table line: ``<start> <length> <type> <params>``, in 512-byte sectors."""

    start_sector: int
    length_sectors: int
    target_type: str
    params: str

    def line(self) -> str:
        """The line as dmsetup prints it."""
        return f"{self.start_sector} {self.length_sectors} {self.target_type} {self.params}"


# --------------------------------------------------------------------------
# Arguments, as each target's constructor reads them
# --------------------------------------------------------------------------


def check_int(value: object, what: str, lo: int, hi: int) -> int:
    """Return ``value`` as an int in [lo, hi] or raise EncodeError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise EncodeError(f"{what} must be an integer, got {value!r}")
    v = int(value)
    if not lo <= v <= hi:
        raise EncodeError(f"{what} must be in [{lo}, {hi}], got {v}")
    return v


def check_length(length_sectors: object) -> int:
    """A target's length: at least one sector, at most sector_t's range."""
    return check_int(length_sectors, "length_sectors", 1, SECTOR_MAX)


def device_arg(dev: object) -> str:
    """Normalise a device to the ``major:minor`` text the kernel resolves without a path lookup."""
    if isinstance(dev, tuple):
        if len(dev) != 2:
            raise EncodeError(f"device tuple must be (major, minor), got {dev!r}")
        major = check_int(dev[0], "device major", 0, _MAJOR_MAX)
        minor = check_int(dev[1], "device minor", 0, _MINOR_MAX)
        return f"{major}:{minor}"
    if isinstance(dev, str):
        m = DEV_RE.fullmatch(dev)
        if m is None:
            raise EncodeError(f"device must be 'major:minor' (decimal), got {dev!r}")
        major, minor = int(m.group(1)), int(m.group(2))
        if major > _MAJOR_MAX or minor > _MINOR_MAX:
            raise EncodeError(f"device {dev!r} does not fit MKDEV (major <= {_MAJOR_MAX}, minor <= {_MINOR_MAX})")
        return f"{major}:{minor}"
    raise EncodeError(f"device must be 'major:minor' or (major, minor), got {dev!r}")


def word_arg(value: object, what: str) -> str:
    """A single table argument: non-empty, no whitespace or backslash (dm_split_args would split or unescape it)."""
    if isinstance(value, bool):
        raise EncodeError(f"{what} must be a word, got {value!r}")
    if isinstance(value, (int, np.integer)):
        value = str(int(value))
    if not isinstance(value, str) or _TOKEN_RE.fullmatch(value) is None:
        raise EncodeError(f"{what} must be a non-empty word without spaces, got {value!r}")
    return value


def words_arg(values: object, what: str) -> list[str]:
    """A sequence of table arguments; a bare string is refused rather than split into characters."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise EncodeError(f"{what} must be a sequence of words, got {values!r}")
    return [word_arg(v, what) for v in values]


def whole_table(target_type: str, length_sectors: int | None, params: str) -> Target:
    """A table of one target from sector 0; EncodeError if its length is unknown (params parsed bare)."""
    if length_sectors is None:
        raise EncodeError(f"a {target_type} target needs its length")
    return Target(0, length_sectors, target_type, params)


def split_params(line: str, target_type: str, codec: str) -> tuple[int | None, list[str]]:
    """A table's params as words, and its length if ``line`` is a whole ``<start> <len> <type> ...`` line."""
    words = line.split()
    if len(words) >= 3 and words[2] == target_type:
        if not (words[0].isdigit() and words[1].isdigit()):
            raise ValueRangeError(codec, "start/length", "decimal sector numbers", " ".join(words[:2]))
        return int(words[1]), words[3:]
    return None, words


# --------------------------------------------------------------------------
# dm-linear
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearParams:
    """dm-linear's params ``<dev> <offset>`` (linear_ctr: offset is a decimal sector_t).

    ``length_sectors`` is the target's: ``build`` needs it, ``parse`` knows
    it only from a whole line.
    """

    length_sectors: int | None
    device: str
    offset: int = 0

    @classmethod
    def build(cls, length_sectors: int, device: Device, offset: int = 0) -> LinearParams:
        """Validated params; EncodeError for anything linear_ctr would refuse."""
        return cls(check_length(length_sectors), device_arg(device), check_int(offset, "offset", 0, SECTOR_MAX))

    def render(self) -> str:
        return f"{self.device} {self.offset}"

    def target(self) -> Target:
        """The whole table: one target from sector 0 (needs the length ``build`` or ``parse`` saw)."""
        return whole_table("linear", self.length_sectors, self.render())

    @classmethod
    def parse(cls, line: str) -> LinearParams:
        """Parse ``<dev> <offset>``, bare or after ``<start> <len> linear``; DecodeError on anything else."""
        codec = "dm-linear table"
        length, words = split_params(line, "linear", codec)
        if len(words) < 2:
            raise TruncatedError(codec, "params", "<dev> <offset>", line)
        if len(words) > 2:
            raise ValueRangeError(codec, "params", "<dev> <offset>", line)
        if DEV_RE.fullmatch(words[0]) is None:
            raise ValueRangeError(codec, "device", "major:minor", words[0])
        if not words[1].isdigit():
            raise ValueRangeError(codec, "offset", "a decimal sector", words[1])
        return cls(length, words[0], int(words[1]))


# --------------------------------------------------------------------------
# dm-switch
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class SwitchParams:
    """dm-switch's params ``<num_paths> <region_size> 0 <dev> <offset>...`` (no optional arguments).

    ``length_sectors`` is the target's: ``build`` needs it, ``parse`` knows
    it only from a whole line.
    """

    region_size: int
    devices: tuple[str, ...]
    offsets: tuple[int, ...]
    length_sectors: int | None = None

    @property
    def nr_paths(self) -> int:
        return len(self.devices)

    @property
    def nr_regions(self) -> int | None:
        """ceil(length / region_size) as alloc_region_table computes it, if the length is known."""
        if self.length_sectors is None:
            return None
        return -(-self.length_sectors // self.region_size)

    @classmethod
    def build(
        cls,
        length_sectors: int,
        region_size_sectors: int,
        devices: Sequence[Device],
        *,
        offsets: Sequence[int] | None = None,
    ) -> SwitchParams:
        """Validated params for a switch of ``length_sectors``.

        Rules from switch_ctr (dm-switch.c): 1 <= num_paths <= MAX_SWITCH_PATHS,
        1 <= region_size <= UINT_MAX, one device and decimal start offset per
        path; alloc_region_table needs ceil(len / region_size) < ULONG_MAX.
        """
        length = check_length(length_sectors)
        region = check_int(region_size_sectors, "region_size_sectors", 1, UINT_MAX)
        if isinstance(devices, (str, bytes)) or not isinstance(devices, Sequence):
            raise EncodeError(f"devices must be a sequence of devices, got {devices!r}")
        if not devices:
            raise EncodeError("a switch table needs at least one path")
        if len(devices) > MAX_SWITCH_PATHS:
            raise EncodeError(f"at most {MAX_SWITCH_PATHS} paths, got {len(devices)}")
        devs = tuple(device_arg(d) for d in devices)
        if offsets is None:
            offs = (0,) * len(devs)
        else:
            if len(offsets) != len(devs):
                raise EncodeError(f"{len(offsets)} offsets for {len(devs)} devices")
            offs = tuple(check_int(o, "device offset", 0, SECTOR_MAX) for o in offsets)
        if -(-length // region) >= ULONG_MAX:
            raise EncodeError("region table too large (nr_regions >= ULONG_MAX)")
        return cls(region, devs, offs, length)

    def render(self) -> str:
        paths = " ".join(f"{d} {o}" for d, o in zip(self.devices, self.offsets))
        return f"{self.nr_paths} {self.region_size} 0 {paths}"

    def target(self) -> Target:
        """The whole table: one target from sector 0 (needs the length ``build`` or ``parse`` saw)."""
        return whole_table("switch", self.length_sectors, self.render())

    @classmethod
    def parse(cls, line: str) -> SwitchParams:
        """Parse a switch STATUSTYPE_TABLE string: ``"%u %u 0"`` then ``" %s %llu"`` per path (switch_status).

        Accepts the bare parameters (what DM_TABLE_STATUS returns after the
        target spec) or a whole ``<start> <len> switch ...`` line as dmsetup
        prints it. Raises DecodeError subclasses on anything else.
        """
        codec = "dm-switch status"
        length, words = split_params(line, "switch", codec)
        if len(words) < 3:
            raise TruncatedError(codec, "header", "<num_paths> <region_size> 0", line)
        for name, w in zip(("num_paths", "region_size", "num_optional_args"), words[:3]):
            if not w.isdigit():
                raise ValueRangeError(codec, name, "a decimal number", w)
        nr_paths, region_size, nopt = (int(w) for w in words[:3])
        if nopt != 0:
            raise ValueRangeError(codec, "num_optional_args", 0, nopt)
        if not 1 <= nr_paths <= MAX_SWITCH_PATHS:
            raise ValueRangeError(codec, "num_paths", f"1..{MAX_SWITCH_PATHS}", nr_paths)
        if not 1 <= region_size <= UINT_MAX:
            raise ValueRangeError(codec, "region_size", f"1..{UINT_MAX}", region_size)
        rest = words[3:]
        if len(rest) < 2 * nr_paths:
            raise TruncatedError(codec, "paths", f"{nr_paths} '<dev> <offset>' pairs", f"{len(rest)} words")
        if len(rest) > 2 * nr_paths:
            raise ValueRangeError(codec, "paths", f"{nr_paths} '<dev> <offset>' pairs", f"{len(rest)} words")
        devices, offsets = [], []
        for k in range(nr_paths):
            dev, off = rest[2 * k], rest[2 * k + 1]
            if DEV_RE.fullmatch(dev) is None:
                raise ValueRangeError(codec, f"path {k} device", "major:minor", dev)
            if not off.isdigit():
                raise ValueRangeError(codec, f"path {k} offset", "a decimal sector", off)
            devices.append(dev)
            offsets.append(int(off))
        return cls(region_size, tuple(devices), tuple(offsets), length)
