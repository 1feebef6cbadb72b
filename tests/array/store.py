"""The array's data: one sparse byte space shared by every member, in segment files.

A volume may be larger than the file system's largest file (ext4 stops at
16 TiB; the seed volume is 22.5 TiB), so the byte space is cut into segment
files of `segment_bytes` each (1 TiB by default), created sparse: only what
is written takes space, and unwritten ranges read as zeros. All members read
and write the same store, so data is identical on every path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from tests.array.errors import StoreError

DEFAULT_SEGMENT_BYTES = 1 << 40


class SparseStore:
    """A zero-filled byte space of `size` bytes backed by sparse segment files under `directory`."""

    def __init__(self, directory: str | os.PathLike[str], size: int,
                 segment_bytes: int = DEFAULT_SEGMENT_BYTES) -> None:
        if segment_bytes <= 0:
            raise StoreError(f"segment size must be positive, got {segment_bytes}")
        if size < 0:
            raise StoreError(f"store size must not be negative, got {size}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.segment_bytes = segment_bytes
        self._size = size
        self._fds: dict[int, int] = {}

    @property
    def size(self) -> int:
        """Bytes addressable now."""
        return self._size

    def resize(self, size: int) -> None:
        """Grow or shrink the byte space; shrinking drops the data past the new end."""
        if size < 0:
            raise StoreError(f"store size must not be negative, got {size}")
        if size < self._size:
            last = (size - 1) // self.segment_bytes if size else -1
            for index in sorted(self._existing_segments()):
                path = self._segment_path(index)
                if index > last:
                    self._close_segment(index)
                    path.unlink()
                elif index == last:
                    # Cut the tail so a later grow reads zeros there, as a real LU would.
                    keep = size - index * self.segment_bytes
                    if path.stat().st_size > keep:
                        os.truncate(path, keep)
        self._size = size

    def read(self, offset: int, length: int) -> bytes:
        """`length` bytes at `offset`; holes read as zeros."""
        self._check(offset, length)
        parts = []
        for index, seg_offset, chunk in self._pieces(offset, length):
            # Opening (creating) an empty segment costs no space and spares a
            # stat per read of a never-written segment.
            data = os.pread(self._fd(index), chunk, seg_offset)
            # Past a segment file's end (never written there) is a hole too.
            parts.append(data if len(data) == chunk else data.ljust(chunk, b"\0"))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Store `data` at `offset`."""
        view = memoryview(data).cast("B")
        self._check(offset, len(view))
        done = 0
        for index, seg_offset, chunk in self._pieces(offset, len(view)):
            fd = self._fd(index)
            piece = view[done : done + chunk]
            while piece:
                written = os.pwrite(fd, piece, seg_offset)
                piece = piece[written:]
                seg_offset += written
            done += chunk

    def flush(self) -> None:
        """fdatasync every open segment (SYNCHRONIZE CACHE)."""
        for fd in self._fds.values():
            os.fdatasync(fd)

    def allocated_bytes(self) -> int:
        """Disk space the segment files take (the point of being sparse)."""
        return sum(self._segment_path(i).stat().st_blocks * 512 for i in self._existing_segments())

    def close(self) -> None:
        """Close every segment file; the files stay."""
        for index in list(self._fds):
            self._close_segment(index)

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise StoreError(f"range {offset}+{length} is outside the {self._size}-byte store")

    def _pieces(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        """(segment index, offset in segment, bytes) for each segment the range touches."""
        while length > 0:
            index, seg_offset = divmod(offset, self.segment_bytes)
            chunk = min(length, self.segment_bytes - seg_offset)
            yield index, seg_offset, chunk
            offset += chunk
            length -= chunk

    def _segment_path(self, index: int) -> Path:
        return self.directory / f"segment-{index:06d}.bin"

    def _existing_segments(self) -> list[int]:
        return [int(p.stem.split("-")[1]) for p in self.directory.glob("segment-*.bin")]

    def _fd(self, index: int) -> int:
        fd = self._fds.get(index)
        if fd is None:
            path = self._segment_path(index)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise StoreError(f"cannot open segment {path}: {exc}") from exc
            self._fds[index] = fd
        return fd

    def _close_segment(self, index: int) -> None:
        fd = self._fds.pop(index, None)
        if fd is not None:
            os.close(fd)
