"""dm-multipath INFO status lines, as the kernel prints them (dm-mpath.c multipath_status)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import DecodeError
from protocol.mpath_status import PathState, parse_multipath_status

# Two groups, round-robin (no per-path info args), second path of group 1 failed:
# what `dmsetup status` shows for a leg after `fail_path 8:32`.
LEG = "2 0 0 0 2 1 A 0 2 0 8:16 A 0 8:32 F 1 E 0 2 0 8:48 A 0 8:64 A 0"
# queue-length and service-time report per-path info args.
QUEUE_LENGTH = "2 1 0 0 1 1 A 0 2 1 8:16 A 0 3 8:32 F 2 0"


def test_two_groups_one_failed_path():
    assert parse_multipath_status(LEG) == [
        PathState("8:16", 1, True, 0), PathState("8:32", 1, False, 1),
        PathState("8:48", 2, True, 0), PathState("8:64", 2, True, 0)]


def test_per_path_selector_args_are_skipped():
    assert [(p.dev, p.active, p.fail_count) for p in parse_multipath_status(QUEUE_LENGTH)] == [
        ("8:16", True, 0), ("8:32", False, 2)]


def test_hardware_handler_and_features():
    line = "3 queue_if_no_path 1 1 1 alua 1 1 A 0 1 0 8:16 A 0"
    assert parse_multipath_status(line) == [PathState("8:16", 1, True, 0)]


@pytest.mark.parametrize("line", ["", "2 0 0 0 2 1 A 0 2 0 8:16 A 0", "2 0 0 0 1 1 X 0 0 0",
                                  "2 0 0 0 1 1 A 0 1 0 sdb A 0", "2 0 0 0 1 1 A 0 1 0 8:16 Q 0",
                                  LEG + " extra"])
def test_garbled_lines_are_typed_errors(line):
    with pytest.raises(DecodeError):
        parse_multipath_status(line)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["0", "1", "2", "A", "F", "E", "8:16", "x"]), max_size=30))
def test_fuzz_only_decode_errors(words):
    try:
        parse_multipath_status(" ".join(words))
    except DecodeError:
        pass
