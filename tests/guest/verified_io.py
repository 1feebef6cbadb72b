"""Continuous verified I/O on a block device: the project's own checksummed writer.

A background thread writes 4 KiB blocks at random offsets (O_DIRECT), each
block filled from a seed that names its offset and a sequence number, and
reads back an earlier block every other step to check it. It counts I/O
errors and verify failures, so a test can change the array under it and
assert that nothing was lost and nothing failed.
"""

from __future__ import annotations

import mmap
import os
import random
import threading
import time
from dataclasses import dataclass, field

BLOCK = 4096


def block_data(offset: int, sequence: int) -> bytes:
    """The content written at `offset` the `sequence`-th time: reproducible, different every time."""
    return random.Random(offset * 1_000_003 + sequence).randbytes(BLOCK)


@dataclass
class VerifiedIo:
    """Writer/verifier on `device`, over its first `size_bytes`."""

    device: str
    size_bytes: int
    seed: int = 0
    writes_per_s: float | None = None
    """Pace the writer (None: flat out). Flat out, this Python writer and the emulator serving it
    keep both vCPUs of a TCG guest busy, and whatever else runs there (the agent) is starved."""
    io_errors: list[str] = field(default_factory=list)
    verify_failures: list[int] = field(default_factory=list)
    writes: int = 0
    reads: int = 0

    def __post_init__(self) -> None:
        self._written: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="verified-io", daemon=True)

    def __enter__(self) -> VerifiedIo:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def _run(self) -> None:
        rng = random.Random(self.seed)
        fd = os.open(self.device, os.O_RDWR | os.O_DIRECT)
        buf = mmap.mmap(-1, BLOCK)
        blocks = self.size_bytes // BLOCK
        started = time.monotonic()
        try:
            while not self._stop.is_set():
                if self.writes_per_s:
                    # Pacing against a schedule, so a stall is caught up on rather than lost.
                    self._stop.wait(started + self.writes / self.writes_per_s - time.monotonic())
                offset = rng.randrange(blocks) * BLOCK
                sequence = self._written.get(offset, -1) + 1
                buf[:] = block_data(offset, sequence)
                try:
                    os.pwritev(fd, [buf], offset)
                except OSError as exc:
                    self.io_errors.append(f"write {offset}: {exc}")
                    continue
                self._written[offset] = sequence
                self.writes += 1
                if self.writes % 2 == 0:
                    self._verify(fd, buf, rng)
        finally:
            os.close(fd)

    def _verify(self, fd: int, buf: mmap.mmap, rng: random.Random) -> None:
        offset = rng.choice(list(self._written))
        try:
            os.preadv(fd, [buf], offset)
        except OSError as exc:
            self.io_errors.append(f"read {offset}: {exc}")
            return
        self.reads += 1
        if buf[:] != block_data(offset, self._written[offset]):
            self.verify_failures.append(offset)

    def verify_all(self) -> None:
        """After stopping: read back every block written and compare."""
        fd = os.open(self.device, os.O_RDONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, BLOCK)
        try:
            for offset, sequence in self._written.items():
                os.preadv(fd, [buf], offset)
                if buf[:] != block_data(offset, sequence):
                    self.verify_failures.append(offset)
        finally:
            os.close(fd)

    def wait_for_writes(self, count: int, timeout_s: float = 60.0) -> None:
        """Block until `count` more writes went through (the writer is alive and making progress)."""
        target = self.writes + count
        deadline = time.monotonic() + timeout_s
        while self.writes < target:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise AssertionError(f"verified I/O stalled at {self.writes} writes")
            time.sleep(0.05)
