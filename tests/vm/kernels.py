"""The guest tests on every kernel the users run: one command, one table in docs/kernels.md.

    .venv/bin/python -m tests.vm.kernels [--kernels 5.10,6.1,6.12,6.1-rt] [--tests agent,change]
        [--results DIR] [--no-docs] [--from-results DIR]

Fetches the kernels first (`sh tests/vm/setup.sh --kernels`, idempotent; root),
then boots the rig once per kernel and test: `agent` is tests/guest/test_agent.py
and `change` tests/guest/test_change.py, each with the options of its wrapper
(tests/vm/test_agent_in_guest.py, tests/vm/test_change_in_guest.py).  Each
cell's results stay in DIR/<kernel>-<test>/.  Prints the table and rewrites
docs/kernels.md between its markers.  `--from-results DIR` renders the cells
already in DIR instead of booting (a cell not there shows "not run").

Exit status 0 when every cell that ran passed.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.bench import scale_lib
from tests.vm import guest_kernels
from tests.vm.test_rig import guest_pytest, junit_cases

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "kernels.md"
BEGIN_MARK = "<!-- kernels:begin (written by python -m tests.vm.kernels; edit there) -->"
END_MARK = "<!-- kernels:end -->"
RIG_FAILURE = 125
KERNEL_ORDER = ("5.10", "6.1", "6.12", "6.1-rt")


@dataclass(frozen=True)
class GuestTest:
    name: str
    path: str
    rig_options: tuple[str, ...]
    min_cases: int


# The same options as the wrappers that CI runs.
TESTS = {
    "agent": GuestTest("agent", "tests/guest/test_agent.py", ("--members", "3", "--no-login", "--timeout", "900"), 9),
    "change": GuestTest("change", "tests/guest/test_change.py", ("--members", "3", "--no-login", "--timeout", "900"),
                        7),
}


@dataclass
class Cell:
    kernel: str
    test: str
    ran: bool = False
    rig_failed: bool = False
    status_written: bool = False
    release: str = ""
    dm_version: str = ""
    passed: int = 0
    cases: int = 0
    not_passed: list[tuple[str, str, str]] = field(default_factory=list)
    total_s: float | None = None
    routed_s: float | None = None
    """test_agent: seconds from the last login until the agent had routed the LUN."""
    last_misrouted_write_s: dict[str, float] = field(default_factory=dict)
    """test_change: per scenario, seconds from the change to the last forwarded (misrouted) write."""
    qemu_aborts: list[str] = field(default_factory=list)
    """QEMU's own aborts at boot, before the guest ran anything, that the rig retried (tests/vm/run.py)."""

    @property
    def ok(self) -> bool:
        return self.ran and not self.rig_failed and self.cases >= TESTS[self.test].min_cases and not self.not_passed


def guest_command(results: Path, test: GuestTest) -> list[str]:
    """Record the kernel's dm ioctl and target versions, then the guest tests."""
    pytest_argv = shlex.join(guest_pytest(results, "-s", test.path))
    out = shlex.quote(str(results / "dm-version.txt"))
    return ["sh", "-c", f"{{ dmsetup version; dmsetup targets; }} > {out} 2>&1; exec {pytest_argv}"]


def run_cell(kernel: str, test: GuestTest, results: Path) -> int:
    argv = [sys.executable, "-m", "tests.vm.run", "--kernel", kernel, "--results", str(results),
            *test.rig_options, "--", *guest_command(results, test)]
    print("kernels: $ " + shlex.join(argv), flush=True)
    return subprocess.run(argv, cwd=REPO, stdin=subprocess.DEVNULL).returncode


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def read_cell(kernel: str, test: str, results: Path) -> Cell:
    """What one rig run left in `results`."""
    cell = Cell(kernel, test)
    status = _read(results / "status.json")
    if not status and not (results / "config.json").exists():
        return cell
    cell.ran = True
    try:
        st = json.loads(status) if status else {}
    except ValueError:
        st = {}
    cell.status_written = bool(st)
    cell.rig_failed = not st.get("rig_ok", False)
    m = re.search(r"guest up: kernel (\S+),", _read(results / "rig.log"))
    cell.release = m.group(1) if m else ""
    dm = _read(results / "dm-version.txt")
    m = re.search(r"Driver version:\s*(\S+)", dm)
    cell.dm_version = m.group(1) if m else ""
    targets = dict(re.findall(r"^(switch|multipath)\s+v(\S+)", dm, re.M))
    if targets:
        cell.dm_version += " (" + ", ".join(f"{k} {v}" for k, v in sorted(targets.items(), reverse=True)) + ")"
    try:
        cases = junit_cases(results)
    except (OSError, ValueError, SyntaxError):
        cases = []
    cell.cases = len(cases)
    cell.passed = sum(1 for c in cases if c[1] == "passed")
    cell.not_passed = [c for c in cases if c[1] != "passed"]
    try:
        timings = json.loads(_read(results / "timings.json"))
        cell.total_s = timings["host"]["total"]
        cell.qemu_aborts = list(timings.get("qemu_aborts_at_boot", []))
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    routed = _read(results / "agent-route-time.txt").strip()
    cell.routed_s = float(routed) if routed else None
    try:
        conv = json.loads(_read(results / "convergence.json") or "{}")
    except ValueError:
        conv = {}
    cell.last_misrouted_write_s = {name: r.get("last_forwarded_write_s", 0.0) for name, r in conv.items()}
    return cell


def result_text(cell: Cell) -> str:
    if not cell.ran:
        return "not run"
    if cell.rig_failed:
        return "**rig failed**" if cell.status_written else "**no status** (the rig failed, or is still running)"
    text = f"{cell.passed}/{cell.cases} passed" if cell.ok else f"**FAILED** {cell.passed}/{cell.cases} passed"
    skipped = [c for c in cell.not_passed if c[1] == "skipped"]
    failed = [c for c in cell.not_passed if c[1] != "skipped"]
    if failed:
        text += ": " + ", ".join(c[0] for c in failed)
    if skipped:
        text += "; skipped: " + ", ".join(f"{c[0]} ({c[2]})" for c in skipped)
    if cell.qemu_aborts:
        n = len(cell.qemu_aborts)
        text += (f" (QEMU itself aborted at boot {'once' if n == 1 else f'{n} times'} before the guest ran "
                 "anything, a QEMU TCG bug; the rig booted again)")
    return text


def timings_text(cell: Cell) -> str:
    parts = []
    if cell.routed_s is not None:
        parts.append(f"routed {cell.routed_s:.1f} s after login")
    if cell.last_misrouted_write_s:
        parts.append("last misrouted write: " + ", ".join(
            f"{name}: {s:.1f} s" for name, s in cell.last_misrouted_write_s.items()))
    if cell.total_s is not None:
        parts.append(f"VM {cell.total_s / 60:.1f} min")
    return "; ".join(parts) or "-"


def render(cells: list[Cell]) -> str:
    rows = ["| kernel | release | dm ioctl (targets) | test | result | notable timings (TCG) |",
            "|---|---|---|---|---|---|"]
    for c in cells:
        rows.append(f"| {c.kernel} | {c.release or '-'} | {c.dm_version or '-'} | {c.test} | {result_text(c)} "
                    f"| {timings_text(c)} |")
    return "\n".join(rows) + "\n"


def replace_section(doc: str, text: str) -> str:
    """docs/kernels.md with its generated section replaced (scale_lib.DocSectionError on broken markers)."""
    return scale_lib.replace_section(doc, text, BEGIN_MARK, END_MARK, "docs/kernels.md")


def section(cells: list[Cell], command: str, rendered_from: Path | None = None) -> str:
    date = time.strftime("%Y-%m-%d", time.gmtime())
    head = f"Produced on {date} by one command on the host (one VM boot per row):"
    if rendered_from is not None:
        # Say so when the cells were booted separately and only rendered here.
        head = (f"Rendered on {date} from saved results (`--from-results`), each row booted by "
                "`--kernels K --tests T` of:")
    return "\n".join([head, "", f"    {command}", "", render(cells)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.vm.kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", default=",".join(KERNEL_ORDER), help="comma-separated (default: all four)")
    p.add_argument("--tests", default=",".join(TESTS), help="comma-separated: agent, change (default: both)")
    p.add_argument("--results", type=Path, default=None, help="default: a new /tmp/switch-agent-kernels-*")
    p.add_argument("--from-results", type=Path, default=None, help="render the cells already in this directory")
    p.add_argument("--no-docs", action="store_true", help="print the table only")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    kernels = [k for k in args.kernels.split(",") if k]
    tests = [t for t in args.tests.split(",") if t]
    bad = [k for k in kernels if k not in guest_kernels.BY_NAME] + [t for t in tests if t not in TESTS]
    if bad:
        p.error(f"unknown: {bad} (kernels {list(KERNEL_ORDER)}, tests {list(TESTS)})")

    if args.from_results:
        results = args.from_results.resolve()
    else:
        if any(guest_kernels.BY_NAME[k].suites for k in kernels):
            subprocess.run(["sh", "tests/vm/setup.sh", "--kernels"], cwd=REPO, check=True)
        results = (args.results or Path(tempfile.mkdtemp(prefix="switch-agent-kernels-"))).resolve()
        results.mkdir(parents=True, exist_ok=True)
        for kernel in kernels:
            for test in tests:
                run_cell(kernel, TESTS[test], results / f"{kernel}-{test}")
    cells = [read_cell(k, t, results / f"{k}-{t}") for k in kernels for t in tests]
    table = render(cells)
    print(table, flush=True)
    if not args.no_docs:
        command = ".venv/bin/python -m tests.vm.kernels" + (
            "" if args.kernels == p.get_default("kernels") and args.tests == p.get_default("tests")
            else f" --kernels {args.kernels} --tests {args.tests}")
        DOC.write_text(replace_section(_read(DOC) or DOC_HEAD, section(cells, command, args.from_results)))
        print(f"kernels: wrote {DOC.relative_to(REPO)} (results in {results})")
    return 0 if all(c.ok for c in cells if c.ran) else 1


DOC_HEAD = "# Kernels\n"

if __name__ == "__main__":
    sys.exit(main())
