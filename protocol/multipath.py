"""dm-multipath, both ways: the table a leg is built from, and the INFO status line that says which paths failed.

Pure, text in, values out. Table grammar from multipath_ctr (drivers/md/dm-mpath.c)::

    <#features> [<feature>]* <#hw_handler args> [<hw_handler> [<arg>]*]
    <#priority groups> <initial group>
    [<selector> <#selector args> [<arg>]* <#paths> <#per-path args> [<dev> [<arg>]*]+]+

Status layout, from multipath_status in the same file::

    <#features> <feature>...  <#hw handler args> <arg>...  <#groups> <next group>
    per group:  <A|E|D> <#selector status args> <arg>...  <#paths> <#selector info args per path>
    per path:   <major:minor> <A|F> <fail count> <selector info arg>...

(A = active, E = enabled, D = disabled for groups; A = active, F = failed for
paths.) The counts make the line self-describing, so any path selector parses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from protocol.dmtable import (
    DEV_RE,
    Device,
    Target,
    check_int,
    check_length,
    device_arg,
    split_params,
    whole_table,
    word_arg,
    words_arg,
)
from protocol.errors import EncodeError, TruncatedError, ValueRangeError

__all__ = ["PriorityGroup", "MultipathParams", "PathState", "parse_multipath_status"]


@dataclass(frozen=True)
class PriorityGroup:
    """One dm-multipath priority group; ``None`` fields take the table-wide defaults."""

    paths: Sequence[Device]
    selector: str | None = None
    selector_args: Sequence[str] | None = None
    path_args: Sequence[str] | None = None


# parse_features (dm-mpath.c): words without a value, with a number, with a keyword.
_MPATH_FLAGS = {"queue_if_no_path", "retain_attached_hw_handler"}
_MPATH_RANGES = {"pg_init_retries": (1, 50), "pg_init_delay_msecs": (0, 60000)}
_MPATH_CHOICES = {"queue_mode": ("bio", "rq", "mq")}


def _mpath_features(features: Sequence[str], queue_if_no_path: bool) -> list[str]:
    """Validate feature words against parse_features (dm-mpath.c) and add queue_if_no_path if asked."""
    words = words_arg(features, "multipath feature")
    out: list[str] = []
    i = 0
    while i < len(words):
        name = words[i].lower()
        out.append(words[i])
        i += 1
        if name in _MPATH_FLAGS:
            continue
        if name not in _MPATH_RANGES and name not in _MPATH_CHOICES:
            raise EncodeError(f"unknown multipath feature {words[i - 1]!r}")
        if i >= len(words):
            raise EncodeError(f"multipath feature {words[i - 1]!r} needs a value")
        val = words[i]
        if name in _MPATH_RANGES:
            lo, hi = _MPATH_RANGES[name]
            if not val.isdigit() or not lo <= int(val) <= hi:
                raise EncodeError(f"multipath feature {name} must be in [{lo}, {hi}], got {val!r}")
        elif val.lower() not in _MPATH_CHOICES[name]:
            raise EncodeError(f"multipath feature {name} must be one of {_MPATH_CHOICES[name]}, got {val!r}")
        out.append(val)
        i += 1
    if queue_if_no_path and not any(w.lower() == "queue_if_no_path" for w in out):
        out.append("queue_if_no_path")
    # dm_read_arg_group with {0, 8, "invalid number of feature args"}
    if len(out) > 8:
        raise EncodeError(f"at most 8 multipath feature words, got {len(out)}")
    return out


@dataclass(frozen=True)
class MultipathParams:
    """dm-multipath's params, validated: every group's selector and arguments filled in, devices as major:minor.

    ``length_sectors`` is the target's: ``build`` needs it, ``parse`` knows
    it only from a whole line.
    """

    length_sectors: int | None
    features: tuple[str, ...]
    hw_handler: tuple[str, ...]
    """The handler's name then its arguments; empty for none."""
    initial_group: int
    groups: tuple[PriorityGroup, ...]

    @classmethod
    def build(
        cls,
        length_sectors: int,
        priority_groups: Sequence[Sequence[Device] | PriorityGroup],
        selector: str = "round-robin",
        *,
        features: Sequence[str] = (),
        queue_if_no_path: bool = False,
        hw_handler: str | None = None,
        hw_handler_args: Sequence[str] = (),
        initial_group: int = 1,
        selector_args: Sequence[str] = (),
        path_args: Sequence[str] = ("1",),
    ) -> MultipathParams:
        """Validated params; EncodeError for anything multipath_ctr would refuse.

        Counts are bounded to 8 feature words and 1024 for everything else, a
        group has 1..1024 paths, and every path of a group carries the same
        number of selector arguments (``path_args``; round-robin takes one, the
        repeat count). ``queue_if_no_path=True`` adds that feature.
        """
        length = check_length(length_sectors)
        sel_default = word_arg(selector, "path selector")
        feats = _mpath_features(features, queue_if_no_path)
        if hw_handler is None:
            if hw_handler_args:
                raise EncodeError("hw_handler_args given without hw_handler")
            hw: list[str] = []
        else:
            hw = [word_arg(hw_handler, "hw_handler")] + words_arg(hw_handler_args, "hw_handler arg")
            if len(hw) > 1024:
                raise EncodeError("at most 1024 hardware handler args")

        if isinstance(priority_groups, (str, bytes)) or not isinstance(priority_groups, Sequence):
            raise EncodeError(f"priority_groups must be a sequence of groups, got {priority_groups!r}")
        if not priority_groups:
            raise EncodeError("a multipath table needs at least one priority group (no paths)")
        if len(priority_groups) > 1024:
            raise EncodeError("at most 1024 priority groups")
        first = check_int(initial_group, "initial_group", 1, len(priority_groups))

        groups = []
        for n, group in enumerate(priority_groups, 1):
            if not isinstance(group, PriorityGroup):
                if isinstance(group, (str, bytes)) or not isinstance(group, Sequence):
                    raise EncodeError(f"priority group {n} must be a sequence of devices, got {group!r}")
                group = PriorityGroup(paths=group)
            sel = sel_default if group.selector is None else word_arg(group.selector, "path selector")
            sargs = words_arg(selector_args if group.selector_args is None else group.selector_args, "selector arg")
            pargs = words_arg(path_args if group.path_args is None else group.path_args, "path arg")
            if len(sargs) > 1024 or len(pargs) > 1024:
                raise EncodeError("at most 1024 selector args and 1024 per-path args")
            if isinstance(group.paths, (str, bytes)) or not isinstance(group.paths, Sequence):
                raise EncodeError(f"priority group {n} paths must be a sequence, got {group.paths!r}")
            if not group.paths:
                raise EncodeError(f"priority group {n} has no paths")
            if len(group.paths) > 1024:
                raise EncodeError(f"priority group {n}: at most 1024 paths")
            paths = tuple(device_arg(dev) for dev in group.paths)
            groups.append(PriorityGroup(paths, sel, tuple(sargs), tuple(pargs)))
        return cls(length, tuple(feats), tuple(hw), first, tuple(groups))

    def render(self) -> str:
        parts = [str(len(self.features)), *self.features, str(len(self.hw_handler)), *self.hw_handler,
                 str(len(self.groups)), str(self.initial_group)]
        for group in self.groups:
            sargs, pargs = group.selector_args or (), group.path_args or ()
            parts += [group.selector or "", str(len(sargs)), *sargs, str(len(group.paths)), str(len(pargs))]
            for dev in group.paths:
                parts += [str(dev), *pargs]
        return " ".join(parts)

    def target(self) -> Target:
        """The whole table: one target from sector 0 (needs the length ``build`` or ``parse`` saw)."""
        return whole_table("multipath", self.length_sectors, self.render())

    @classmethod
    def parse(cls, line: str) -> MultipathParams:
        """Parse a multipath table: the bare params or a whole ``<start> <len> multipath ...`` line.

        Follows the counts of multipath_ctr's grammar; raises DecodeError
        subclasses on a short or malformed line. Every path of a group must
        carry the same per-path arguments, as ``build`` writes them.
        """
        length, words = split_params(line, "multipath", _TABLE_CODEC)
        table = _Words(words, _TABLE_CODEC)
        features = table.counted("feature")
        hw_handler = table.counted("hardware handler arg")
        nr_groups = table.count("group count")
        initial = table.count("initial group")
        # multipath_ctr: no groups and group 0, or group 1..n.
        if (nr_groups == 0) != (initial == 0) or initial > nr_groups:
            raise ValueRangeError(_TABLE_CODEC, "initial group", f"1..{nr_groups}", initial)
        groups = []
        for n in range(1, nr_groups + 1):
            selector = table.take(f"group {n} selector")
            selector_args = table.counted(f"group {n} selector arg")
            nr_paths = table.count(f"group {n} path count")
            per_path = table.count(f"group {n} per-path arg count")
            paths: list[str] = []
            path_args: tuple[str, ...] | None = None
            for _ in range(nr_paths):
                dev = table.take(f"group {n} path device")
                if DEV_RE.fullmatch(dev) is None:
                    raise ValueRangeError(_TABLE_CODEC, f"group {n} path device", "major:minor", dev)
                args = tuple(table.take(f"path {dev} arg") for _ in range(per_path))
                if path_args is not None and args != path_args:
                    raise ValueRangeError(_TABLE_CODEC, f"path {dev} args", " ".join(path_args), " ".join(args))
                path_args = args
                paths.append(dev)
            groups.append(PriorityGroup(tuple(paths), selector, selector_args, path_args or ()))
        table.end()
        return cls(length, features, hw_handler, initial, tuple(groups))


_CODEC = "dm-multipath status"
_TABLE_CODEC = "dm-multipath table"


class _Words:
    """A line's words read front to back; a short or malformed line raises DecodeError naming what was missing."""

    def __init__(self, words: list[str], codec: str) -> None:
        self.words = words
        self.codec = codec
        self.pos = 0

    def take(self, what: str) -> str:
        if self.pos >= len(self.words):
            raise TruncatedError(self.codec, what, "another word", f"end of line after {self.pos} words")
        self.pos += 1
        return self.words[self.pos - 1]

    def count(self, what: str) -> int:
        word = self.take(what)
        if not word.isdigit():
            raise ValueRangeError(self.codec, what, "a decimal count", word)
        return int(word)

    def counted(self, what: str) -> tuple[str, ...]:
        """``<n> <word>...``: the n words."""
        return tuple(self.take(what) for _ in range(self.count(f"{what} count")))

    def end(self) -> None:
        if self.pos != len(self.words):
            raise ValueRangeError(self.codec, "line", f"{self.pos} words", f"{len(self.words)} words")


@dataclass(frozen=True)
class PathState:
    """One path of a multipath table as the kernel reports it."""

    dev: str
    """major:minor."""
    group: int
    """1-based priority group."""
    active: bool
    fail_count: int


def parse_multipath_status(params: str) -> list[PathState]:
    """Every path of a dm-multipath INFO status line, in table order."""
    line = _Words(params.split(), _CODEC)
    for _ in range(line.count("feature count")):
        line.take("feature")
    for _ in range(line.count("hardware handler count")):
        line.take("hardware handler arg")
    groups = line.count("group count")
    line.count("next group")
    paths: list[PathState] = []
    for group in range(1, groups + 1):
        state = line.take(f"group {group} state")
        if state not in ("A", "E", "D"):
            raise ValueRangeError(_CODEC, f"group {group} state", "A, E or D", state)
        for _ in range(line.count(f"group {group} selector status count")):
            line.take("selector status arg")
        nr_paths = line.count(f"group {group} path count")
        info_args = line.count(f"group {group} per-path selector args")
        for _ in range(nr_paths):
            dev = line.take("path device")
            major, _, minor = dev.partition(":")
            if not (major.isdigit() and minor.isdigit()):
                raise ValueRangeError(_CODEC, "path device", "major:minor", dev)
            flag = line.take(f"path {dev} state")
            if flag not in ("A", "F"):
                raise ValueRangeError(_CODEC, f"path {dev} state", "A or F", flag)
            fails = line.count(f"path {dev} fail count")
            for _ in range(info_args):
                line.take("selector info arg")
            paths.append(PathState(dev, group, flag == "A", fails))
    line.end()
    return paths
