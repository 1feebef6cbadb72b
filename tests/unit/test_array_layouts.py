"""Page-owner layouts and the state changes the control CLI makes (tests/array/layouts.py, volume.py)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.array import layouts
from tests.array.errors import ArrayStateError, LayoutError
from tests.array.volume import (
    ASC_CAPACITY_DATA_HAS_CHANGED,
    ASC_INQUIRY_DATA_HAS_CHANGED,
    ArrayVolume,
)

MIB = 1 << 20


def runs(owners: np.ndarray) -> np.ndarray:
    """Lengths of the maximal runs of equal owners."""
    edges = np.flatnonzero(np.diff(owners)) + 1
    return np.diff(np.concatenate([[0], edges, [owners.size]]))


def test_striped() -> None:
    owners = layouts.build("striped", 10, 3, np.random.default_rng(0))
    assert owners.dtype == np.int16
    assert owners.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]


def test_random_is_seeded_and_uses_every_member() -> None:
    a = layouts.build("random", 10_000, 4, np.random.default_rng(5))
    b = layouts.build("random", 10_000, 4, np.random.default_rng(5))
    assert np.array_equal(a, b)
    assert set(np.unique(a)) == {0, 1, 2, 3}


def test_seed_layout_run_statistics() -> None:
    owners = layouts.build("seed", 1_572_864, 3, np.random.default_rng(1))
    assert owners.size == 1_572_864
    assert set(np.unique(owners)) == {0, 1, 2}
    lengths = runs(owners)
    # Adjacent runs are on different members, so maximal runs are the generated runs.
    pages_in = {length: int(lengths[lengths == length].sum()) / owners.size for length in (1, 2, 5, 10, 20)}
    assert pages_in[1] == pytest.approx(0.50, abs=0.01)
    assert pages_in[2] == pytest.approx(0.20, abs=0.01)
    for length in (5, 10, 20):
        assert pages_in[length] == pytest.approx(0.10, abs=0.01)
    assert set(np.unique(lengths)) <= {1, 2, 5, 10, 20}


def test_seed_layout_tiny_volume() -> None:
    owners = layouts.build("seed", 3, 2, np.random.default_rng(0))
    assert owners.size == 3 and (np.diff(owners) != 0).all()


def test_unknown_layout() -> None:
    with pytest.raises(LayoutError, match="unknown layout"):
        layouts.build("zigzag", 10, 2, np.random.default_rng(0))


def test_move_changes_exactly_the_fraction() -> None:
    owners = layouts.build("striped", 1000, 3, np.random.default_rng(0))
    new, count = layouts.moved(owners, 0.25, 3, np.random.default_rng(1))
    assert count == 250
    assert int((new != owners).sum()) == 250
    assert new.max() < 3


def test_move_to_one_member_takes_pages_only_from_the_others() -> None:
    owners = layouts.build("striped", 1000, 4, np.random.default_rng(0))
    owners[owners == 3] = 0  # member 3 owns nothing yet (joined empty)
    new, count = layouts.moved_to(owners, 0.25, 3, 4, np.random.default_rng(1))
    assert count == 250
    changed = new != owners
    assert int(changed.sum()) == 250 and (new[changed] == 3).all()
    assert int((new == 3).sum()) == 250
    # Asked for more than the others own: all of theirs, no more.
    everything, count = layouts.moved_to(new, 1.0, 3, 4, np.random.default_rng(2))
    assert count == 750 and (everything == 3).all()
    with pytest.raises(LayoutError):
        layouts.moved_to(owners, 0.1, 4, 4, np.random.default_rng(0))
    with pytest.raises(LayoutError):
        layouts.moved_to(owners, 1.5, 3, 4, np.random.default_rng(0))


def test_remove_member_reassigns_and_renumbers() -> None:
    owners = layouts.build("striped", 999, 3, np.random.default_rng(0))
    new = layouts.with_member_removed(owners, 1, 3, np.random.default_rng(0))
    assert set(np.unique(new)) == {0, 1}
    # Pages of member 2 are now index 1; pages of member 0 stay.
    assert (new[owners == 2] == 1).all()
    assert (new[owners == 0] == 0).all()


def test_volume_geometry_and_owner() -> None:
    vol = ArrayVolume(size_bytes=10 * MIB + 512, page_size_bytes=MIB, members=3)
    assert vol.total_pages == 11  # last page partial
    assert vol.generation == 1
    assert vol.owner_of_offset(0).number == 0
    assert vol.owner_of_offset(MIB).number == 1
    assert vol.owner_of_offset(10 * MIB).number == 1
    with pytest.raises(ArrayStateError):
        vol.owner_of_offset(10 * MIB + 512)


def test_volume_rejects_bad_geometry() -> None:
    with pytest.raises(ArrayStateError):
        ArrayVolume(size_bytes=1000, page_size_bytes=512, members=1)
    with pytest.raises(ArrayStateError):
        ArrayVolume(size_bytes=MIB, page_size_bytes=1000, members=1)


def test_counters_split_per_page_portion() -> None:
    vol = ArrayVolume(size_bytes=8 * MIB, page_size_bytes=MIB, members=2)
    # member 0 receives 2 MiB starting half-way into page 0: pages 0 (own), 1 (m1), 2 (own)
    vol.account(0, MIB // 2, 2 * MIB)
    c = vol.member(0).counters
    assert (c.direct_cmds, c.direct_bytes) == (2, MIB)
    assert (c.forwarded_cmds, c.forwarded_bytes) == (1, MIB)
    assert c.last_forwarded_at > 0
    forwarded_at = c.last_forwarded_at
    vol.account(0, 0, 4096)  # direct: leaves the time of the last forwarded command alone
    assert c.last_forwarded_at == forwarded_at
    assert c.forwarded_write_cmds == 0 and c.last_forwarded_write_at == 0
    vol.account(0, MIB, 4096, write=True)  # page 1 is m1's
    assert c.forwarded_write_cmds == 1 and c.last_forwarded_write_at == c.last_forwarded_at > forwarded_at
    vol.account(1, MIB, 4096)
    assert vol.member(1).counters.direct_bytes == 4096
    vol.reset_counters()
    assert vol.member(0).counters.as_dict() == dict.fromkeys(
        ("direct_bytes", "forwarded_bytes", "direct_cmds", "forwarded_cmds", "last_forwarded_at",
         "forwarded_write_cmds", "last_forwarded_write_at"), 0)


def test_changes_bump_generation_and_queue_unit_attentions() -> None:
    vol = ArrayVolume(size_bytes=4 * MIB, page_size_bytes=MIB, members=2)
    assert vol.describe()["change_times"] == []
    vol.move_pages(0.5)
    assert vol.generation == 2 and len(vol.describe()["change_times"]) == 1
    vol.resize(6 * MIB)
    assert vol.generation == 3 and vol.total_pages == 6
    assert vol.take_unit_attention(0) == ASC_INQUIRY_DATA_HAS_CHANGED
    assert vol.take_unit_attention(0) == ASC_CAPACITY_DATA_HAS_CHANGED
    assert vol.take_unit_attention(0) is None
    assert vol.take_unit_attention(1) == ASC_INQUIRY_DATA_HAS_CHANGED


def test_add_and_remove_members_keep_numbers_stable() -> None:
    vol = ArrayVolume(size_bytes=30 * MIB, page_size_bytes=MIB, members=3)
    added = vol.add_member()
    assert (added.number, added.member_id, added.portal_ip) == (3, 4, "127.0.0.4")
    assert vol.describe()["members"][3]["pages"] == 30 // 4
    vol.remove_member(1)
    assert [m.number for m in vol.members] == [0, 2, 3]
    assert vol.owners.max() == 2
    assert vol.generation == 3
    with pytest.raises(ArrayStateError):
        vol.index_of(1)  # retired: still answers, owns nothing
    assert vol.member(1).name == "m1"
    vol.forget_member(1)
    with pytest.raises(ArrayStateError):
        vol.member(1)


def test_a_member_added_empty_is_listed_and_owns_nothing_until_pages_move_to_it() -> None:
    vol = ArrayVolume(size_bytes=40 * MIB, page_size_bytes=MIB, members=3)
    before = vol.owners.copy()
    added = vol.add_member(take_pages=False)
    assert added.number == 3 and vol.generation == 2
    assert np.array_equal(vol.owners, before)
    assert [m.member_id for m in vol.page_map_members()] == [1, 2, 3, 4]
    assert [m.member_id for m in vol.member_portals().members] == [1, 2, 3, 4]
    assert vol.describe()["members"][3]["pages"] == 0
    for number in range(4):  # every member, the new one too, says the inquiry data changed
        assert vol.take_unit_attention(number) == ASC_INQUIRY_DATA_HAS_CHANGED
    assert vol.move_pages(0.25, to=3) == 10
    assert vol.generation == 3 and vol.describe()["members"][3]["pages"] == 10
    assert int((vol.owners != before).sum()) == 10
    assert vol.take_unit_attention(0) == ASC_INQUIRY_DATA_HAS_CHANGED
    with pytest.raises(ArrayStateError):
        vol.move_pages(0.1, to=7)


def test_corruption_is_consumed() -> None:
    vol = ArrayVolume(size_bytes=4 * MIB, page_size_bytes=MIB, members=2)
    vol.corrupt_next_map("entry-out-of-range", count=2)
    assert vol.take_corruption(has_entries=False) is None  # a header poll does not use it up
    assert vol.take_corruption(has_entries=True) == "entry-out-of-range"
    assert vol.take_corruption(has_entries=True) == "entry-out-of-range"
    assert vol.take_corruption(has_entries=True) is None
    with pytest.raises(ArrayStateError):
        vol.corrupt_next_map("sideways")
