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

from protocol.dmtable import Device, Target, check_int, check_length, device_arg, word_arg, words_arg
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
    """dm-multipath's params, validated: every group's selector and arguments filled in, devices as major:minor."""

    length_sectors: int
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
        """The whole table: one target from sector 0."""
        return Target(0, self.length_sectors, "multipath", self.render())


_CODEC = "dm-multipath status"


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
    words = params.split()
    pos = 0

    def take(what: str) -> str:
        nonlocal pos
        if pos >= len(words):
            raise TruncatedError(_CODEC, what, "another word", f"end of line after {pos} words")
        pos += 1
        return words[pos - 1]

    def count(what: str) -> int:
        word = take(what)
        if not word.isdigit():
            raise ValueRangeError(_CODEC, what, "a decimal count", word)
        return int(word)

    for _ in range(count("feature count")):
        take("feature")
    for _ in range(count("hardware handler count")):
        take("hardware handler arg")
    groups = count("group count")
    count("next group")
    paths: list[PathState] = []
    for group in range(1, groups + 1):
        state = take(f"group {group} state")
        if state not in ("A", "E", "D"):
            raise ValueRangeError(_CODEC, f"group {group} state", "A, E or D", state)
        for _ in range(count(f"group {group} selector status count")):
            take("selector status arg")
        nr_paths = count(f"group {group} path count")
        info_args = count(f"group {group} per-path selector args")
        for _ in range(nr_paths):
            dev = take("path device")
            major, _, minor = dev.partition(":")
            if not (major.isdigit() and minor.isdigit()):
                raise ValueRangeError(_CODEC, "path device", "major:minor", dev)
            flag = take(f"path {dev} state")
            if flag not in ("A", "F"):
                raise ValueRangeError(_CODEC, f"path {dev} state", "A or F", flag)
            fails = count(f"path {dev} fail count")
            for _ in range(info_args):
                take("selector info arg")
            paths.append(PathState(dev, group, flag == "A", fails))
    if pos != len(words):
        raise ValueRangeError(_CODEC, "line", f"{pos} words", f"{len(words)} words")
    return paths
