"""The README's "Install on a host" steps, as an administrator copies them.

The systemd guest's scenario (scenario.py) runs what these return instead of
its own copy of the commands, so the README is followed word for word and a
README edit that breaks the install breaks the scenario. Standard library
only: Debian's python3 runs this in the guest.
"""

from __future__ import annotations

import glob
import re
import shlex

SECTION = "## Install on a host"
_STEP = re.compile(r"^\*\*(\d+)\. ", re.M)
_FENCE = re.compile(r"^```[a-z]*\n(.*?)^```\n", re.M | re.S)
_PLACEHOLDER = re.compile(r"<[a-z]+>")


class ReadmeError(Exception):
    pass


def install_steps(readme: str) -> dict[int, list[str]]:
    """Step number -> the fenced blocks of that step, in order."""
    start = readme.find(SECTION + "\n")
    if start < 0:
        raise ReadmeError(f"the README has no {SECTION!r} section")
    end = readme.find("\n## ", start + len(SECTION))
    section = readme[start:end if end >= 0 else len(readme)]
    marks = list(_STEP.finditer(section))
    steps: dict[int, list[str]] = {}
    for i, mark in enumerate(marks):
        body = section[mark.end():marks[i + 1].start() if i + 1 < len(marks) else len(section)]
        steps[int(mark.group(1))] = _FENCE.findall(body)
    return steps


def fill(text: str, **values: str) -> str:
    """`text` with each <name> replaced; a placeholder left over is an error (the scenario would run it)."""
    for name, value in values.items():
        text = text.replace(f"<{name}>", value)
    left = _PLACEHOLDER.findall(text)
    if left:
        raise ReadmeError(f"no value for {sorted(set(left))} in: {text.strip()}")
    return text


def commands(block: str, *, cwd: str = ".", **values: str) -> list[list[str]]:
    """The block's command lines as argv lists: comments dropped, placeholders filled, globs expanded as
    a shell would (relative to `cwd`)."""
    argvs = []
    for line in block.splitlines():
        argv = [fill(arg, **values) for arg in shlex.split(line, comments=True)]
        if not argv:
            continue
        expanded = []
        for arg in argv:
            matches = sorted(glob.glob(arg, root_dir=cwd)) if any(c in arg for c in "*?[") else []
            expanded.extend(matches or [arg])
        argvs.append(expanded)
    return argvs
