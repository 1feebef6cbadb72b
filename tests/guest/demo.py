"""The README's demo, inside the VM rig: the same workload without and with switch-agent.

    sh tests/demo.sh        (boots the VM with a 3-member emulated array, then runs this)

Starts the daemon before the array's LUN exists, logs in to every member,
waits for the LUN to be routed, prints `switch-agent status`, then writes
and reads back 64 MiB at random page-aligned offsets (O_DIRECT) through
multipathd's map and through the routed device, and prints each member's
direct and forwarded I/O for both.
"""

from __future__ import annotations

import sys

from tests.array import control as array_control
from tests.guest.agentlib import (MIB, AgentDaemon, agent_cli, array, array_info, install_udev_rule,
                                  login_and_wait_routed, quiesce, random_io, remove_our_devices)


def member_rows(label: str, stats: dict) -> list[str]:
    rows = []
    for name, m in stats["members"].items():
        total = m["direct_bytes"] + m["forwarded_bytes"]
        share = m["forwarded_bytes"] / total if total else 0.0
        rows.append(f"| {label} | {name} | {m['direct_bytes'] // MIB} | {m['forwarded_bytes'] // MIB} "
                    f"| {share:.0%} |")
    return rows


def main() -> int:
    if not array_control.server_running(array_control.run_dir()):
        print("demo: no emulated array is up; run it through `sh tests/demo.sh`", file=sys.stderr)
        return 2
    install_udev_rule()
    daemon = AgentDaemon()
    try:
        record, elapsed = login_and_wait_routed()
        print(f"\n== LUN {record['wwid']} routed {elapsed:.1f} s after login\n")
        print(agent_cli("status").stdout)
        info = array_info()
        page, pages = info["page_size_bytes"], info["total_pages"]
        quiesce()
        array("stats", reset=True)
        random_io(info["multipath_map"], page, pages, seed=1)
        without = array("stats", reset=True)
        quiesce()
        array("stats", reset=True)
        random_io(record["device"], page, pages, seed=2)
        with_agent = array("stats", reset=True)
        print("== 64 MiB written and read back at random page-aligned offsets (O_DIRECT)\n")
        print("| device | member | direct MiB | forwarded MiB | forwarded |")
        print("|---|---|---|---|---|")
        print("\n".join(member_rows(f"{info['multipath_map']} (multipathd, no agent)", without)
                        + member_rows(f"{record['device']} (switch-agent)", with_agent)))
        print()
    finally:
        status = daemon.stop()
        remove_our_devices()
    return status


if __name__ == "__main__":
    sys.exit(main())
