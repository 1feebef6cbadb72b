"""dm-multipath's STATUSTYPE_INFO line: which paths of a leg are failed. Pure, text in, values out.

Layout, from multipath_status in drivers/md/dm-mpath.c::

    <#features> <feature>...  <#hw handler args> <arg>...  <#groups> <next group>
    per group:  <A|E|D> <#selector status args> <arg>...  <#paths> <#selector info args per path>
    per path:   <major:minor> <A|F> <fail count> <selector info arg>...

(A = active, E = enabled, D = disabled for groups; A = active, F = failed for
paths.) The counts make the line self-describing, so any path selector parses.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.errors import TruncatedError, ValueRangeError

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
