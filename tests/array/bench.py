"""Guest benchmark: the TCMU handler beside LIO's own fileio backstore, same guest, same medium.

    python -m tests.array.bench [--runtime 20] [--json]

Needs the emulated array up and logged in (the VM rig does both). Creates
a second target with a fileio backstore (a sparse file in the emulator's run
directory, so both sit on the same tmpfs), logs in to it, and runs fio with
O_DIRECT on one path of each: 1 MiB sequential read and write, 4 KiB random
read and write. Prints MB/s and IOPS and the ratio handler / fileio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from tests.array import control, initiator
from tests.array.errors import InitiatorError

FILEIO_IQN = "iqn.2026-11.org.switch-agent:fileio-bench"
FILEIO_PORTAL = "127.0.0.200"
FILEIO_SIZE = 1 << 30
JOBS = (
    ("seq-read-1M", "read", "1M", 1),
    ("seq-write-1M", "write", "1M", 1),
    ("rand-read-4K", "randread", "4k", 16),
    ("rand-write-4K", "randwrite", "4k", 16),
)


class FileioTarget:
    """A plain LIO fileio LUN on its own target and portal, for comparison."""

    def __init__(self, backing: Path) -> None:
        import rtslib_fb as rts

        Path("/etc/target").mkdir(exist_ok=True)
        self.rts = rts
        self.storage = rts.FileIOStorageObject("bench_fileio", str(backing), size=FILEIO_SIZE,
                                               write_back=True)
        self.target = rts.Target(rts.FabricModule("iscsi"), FILEIO_IQN, mode="create")
        tpg = rts.TPG(self.target, 1, mode="create")
        for name, value in (("generate_node_acls", 1), ("cache_dynamic_acls", 1),
                            ("demo_mode_write_protect", 0), ("authentication", 0)):
            tpg.set_attribute(name, value)
        rts.NetworkPortal(tpg, FILEIO_PORTAL, 3260, mode="create")
        rts.LUN(tpg, 0, self.storage)
        tpg.enable = True

    def delete(self) -> None:
        """Target first (sessions must be gone), then the backstore."""
        self.target.delete()
        self.storage.delete()


def fio(device: str, rw: str, block: str, depth: int, runtime: int) -> dict[str, float]:
    """One fio job with O_DIRECT on `device`; MB/s and IOPS."""
    argv = ["fio", "--name=bench", f"--filename={device}", "--direct=1", "--ioengine=libaio",
            f"--rw={rw}", f"--bs={block}", f"--iodepth={depth}", f"--runtime={runtime}", "--time_based",
            "--size=256M", "--randrepeat=1", "--output-format=json"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=runtime * 4 + 60, check=True)
    job = json.loads(out.stdout)["jobs"][0]
    side = job["write"] if "write" in rw else job["read"]
    return {"MBps": side["bw_bytes"] / 1e6, "iops": side["iops"]}


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print the table (or JSON)."""
    parser = argparse.ArgumentParser(prog="python -m tests.array.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", type=int, default=20, help="seconds per fio job")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    run_dir = control.run_dir()
    info = control.request(run_dir, "info")
    handler_sessions = [s for s in initiator.sessions(info["iqn"]) if s.devices]
    if not handler_sessions:
        raise InitiatorError("the emulated array has no logged-in path (python -m tests.array login)")
    handler_device = f"/dev/{handler_sessions[0].devices[0]}"
    # Keep multipathd's checker and the kernel's readahead out of the way of the single path.
    backing = run_dir / "bench-fileio.img"
    backing.unlink(missing_ok=True)
    fileio = FileioTarget(backing)
    try:
        initiator.discover(FILEIO_PORTAL)
        initiator.login(FILEIO_IQN, FILEIO_PORTAL)
        deadline = time.monotonic() + 60
        while not any(s.devices for s in initiator.sessions(FILEIO_IQN)):
            if time.monotonic() > deadline:
                raise InitiatorError("fileio LUN did not appear")
            time.sleep(0.2)
        fileio_session = next(s for s in initiator.sessions(FILEIO_IQN) if s.devices)
        fileio_device = f"/dev/{fileio_session.devices[0]}"
        # multipathd (find_multipaths no) would claim the fileio disk too: keep it a plain disk.
        subprocess.run(["multipath", "-f", fileio_session.devices[0]], capture_output=True)
        results = {}
        for name, rw, block, depth in JOBS:
            handler = fio(handler_device, rw, block, depth, args.runtime)
            plain = fio(fileio_device, rw, block, depth, args.runtime)
            results[name] = {"handler": handler, "fileio": plain,
                             "ratio": handler["MBps"] / plain["MBps"] if plain["MBps"] else 0.0}
    finally:
        for session in initiator.sessions(FILEIO_IQN):
            initiator.remove_paths(session.devices)
        initiator.logout(FILEIO_IQN, FILEIO_PORTAL)
        fileio.delete()
        backing.unlink(missing_ok=True)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{'job':14} {'handler MB/s':>13} {'IOPS':>8} {'fileio MB/s':>12} {'IOPS':>8} {'ratio':>6}")
        for name, r in results.items():
            print(f"{name:14} {r['handler']['MBps']:13.1f} {r['handler']['iops']:8.0f} "
                  f"{r['fileio']['MBps']:12.1f} {r['fileio']['iops']:8.0f} {r['ratio']:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
