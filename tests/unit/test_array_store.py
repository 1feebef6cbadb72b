"""The sparse shared store: volumes past the file-size limit, holes, segment edges, resize."""

from __future__ import annotations

import pytest

from tests.array.errors import StoreError
from tests.array.store import SparseStore

TIB = 1 << 40


def test_seed_sized_volume_writes_at_the_end_without_using_space(tmp_path) -> None:
    size = 22 * TIB + TIB // 2  # 22.5 TiB: past ext4's 16 TiB file limit
    store = SparseStore(tmp_path, size)
    tail = b"end of the volume".ljust(4096, b"!")
    store.write(size - 4096, tail)
    head = b"start".ljust(512, b"\0")
    store.write(0, head)
    assert store.read(size - 4096, 4096) == tail
    assert store.read(0, 512) == head
    assert store.read(TIB * 7 + 12345, 100) == bytes(100)  # never-written segment
    assert store.allocated_bytes() < 1 << 20
    store.close()


def test_write_across_a_segment_boundary(tmp_path) -> None:
    store = SparseStore(tmp_path, 1 << 20, segment_bytes=4096)
    data = bytes(range(256)) * 40  # 10240 bytes over three segments
    store.write(4000, data)
    assert store.read(4000, len(data)) == data
    assert store.read(0, 4000) == bytes(4000)
    assert len(list(tmp_path.glob("segment-*.bin"))) == 4


def test_reopening_sees_the_same_data(tmp_path) -> None:
    store = SparseStore(tmp_path, 1 << 30)
    store.write(123 * 512, b"persist")
    store.flush()
    store.close()
    assert SparseStore(tmp_path, 1 << 30).read(123 * 512, 7) == b"persist"


def test_out_of_range_is_refused(tmp_path) -> None:
    store = SparseStore(tmp_path, 4096)
    with pytest.raises(StoreError):
        store.read(4000, 200)
    with pytest.raises(StoreError):
        store.write(-1, b"x")


def test_shrink_then_grow_reads_zeros(tmp_path) -> None:
    store = SparseStore(tmp_path, 3 * 4096, segment_bytes=4096)
    store.write(0, b"a" * (3 * 4096))
    store.resize(4096 + 100)
    assert store.read(4096, 100) == b"a" * 100
    store.resize(3 * 4096)
    assert store.read(4096 + 100, 200) == bytes(200)
    assert store.read(2 * 4096, 4096) == bytes(4096)
    assert store.read(0, 4096) == b"a" * 4096
