"""The changed-regions encoder: the oracle (the kernel's parse) applies its messages to exactly the changes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.dmswitch_changes import encode_changed_regions
from protocol.dmswitch_oracle import apply_region_mappings, split_message_args
from protocol.dmtable import MAX_MESSAGE_TOKENS
from protocol.errors import EncodeError


def applied(table: np.ndarray, messages: list[str], paths: int) -> np.ndarray:
    out = table.copy()
    for message in messages:
        apply_region_mappings(out, message, paths)
    return out


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_messages_write_the_changed_regions_and_nothing_else(data):
    n = data.draw(st.integers(1, 400))
    paths = data.draw(st.integers(1, 20))
    table = np.asarray(data.draw(st.lists(st.integers(0, paths - 1), min_size=n, max_size=n)), dtype=np.int64)
    regions = np.array(sorted(data.draw(st.sets(st.integers(0, n - 1), max_size=n))), dtype=np.int64)
    same = data.draw(st.booleans())
    values = np.asarray(data.draw(st.lists(st.integers(0, paths - 1), min_size=regions.size,
                                           max_size=regions.size)), dtype=np.int64)
    if same and regions.size:
        values[:] = values[0]  # long runs of one path: R1 tokens
    limit = data.draw(st.integers(48, 400))
    messages = encode_changed_regions(regions, values, nr_regions=n, max_message_bytes=limit)
    expected = table.copy()
    expected[regions] = values
    # The kernel's table is garbage outside the changes as far as the encoder knows: it must not read it.
    garbage = np.where(np.isin(np.arange(n), regions), table, (table + 1) % paths)
    want = garbage.copy()
    want[regions] = values
    assert np.array_equal(applied(garbage, messages, paths), want)
    assert np.array_equal(applied(table, messages, paths), expected)
    assert all(len(m) <= limit for m in messages)
    assert all(b":" in split_message_args(m)[1] and not split_message_args(m)[1].startswith(b":")
               for m in messages)  # every message opens with an explicit index


def test_a_run_is_one_index_and_one_copy():
    regions = np.arange(100, 200)
    (message,) = encode_changed_regions(regions, np.full(100, 2), nr_regions=1000)
    assert message == "set_region_mappings 64:2 R1,63"
    (message,) = encode_changed_regions(np.array([5, 6, 7, 9]), np.array([1, 0, 0, 1]), nr_regions=10)
    assert message == "set_region_mappings 5:1 :0 :0 9:1"


def test_token_limit_splits_messages():
    regions = np.arange(0, 4 * MAX_MESSAGE_TOKENS, 2)
    messages = encode_changed_regions(regions, np.zeros(regions.size, dtype=np.int64), nr_regions=regions[-1] + 1,
                                      max_message_bytes=1 << 30)
    assert len(messages) > 1 and all(len(split_message_args(m)) <= MAX_MESSAGE_TOKENS for m in messages)


def test_bad_input():
    assert encode_changed_regions(np.array([]), np.array([]), nr_regions=5) == []
    with pytest.raises(EncodeError):
        encode_changed_regions(np.array([5]), np.array([0]), nr_regions=5)
    with pytest.raises(EncodeError):
        encode_changed_regions(np.array([3, 2]), np.array([0, 0]), nr_regions=5)
    with pytest.raises(EncodeError):
        encode_changed_regions(np.array([1]), np.array([-1]), nr_regions=5)
    with pytest.raises(EncodeError):
        encode_changed_regions(np.array([1]), np.array([1]), nr_regions=5, max_message_bytes=20)
