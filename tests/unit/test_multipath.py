"""protocol.multipath: the table a leg is built from, and INFO status lines as the kernel prints them (dm-mpath.c)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import DecodeError, EncodeError
from protocol.multipath import MultipathParams, PathState, PriorityGroup, parse_multipath_status

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


def test_multipath_table_example_grammar():
    line = MultipathParams.build(2048, [["7:0"], ["7:1", (7, 2)]]).target().line()
    assert line == "0 2048 multipath 0 0 2 1 round-robin 0 1 1 7:0 1 round-robin 0 2 1 7:1 1 7:2 1"


def test_multipath_table_features_and_handler():
    line = MultipathParams.build(
        100,
        [["8:0", "8:16"]],
        "service-time",
        queue_if_no_path=True,
        features=["pg_init_retries", "50"],
        hw_handler="alua",
        path_args=("1", "1"),
    ).target().line()
    assert line == (
        "0 100 multipath 3 pg_init_retries 50 queue_if_no_path 1 alua 1 1 "
        "service-time 0 2 2 8:0 1 1 8:16 1 1"
    )
    # Asking twice for queue_if_no_path keeps one.
    twice = MultipathParams.build(1, [["8:0"]], features=["queue_if_no_path"], queue_if_no_path=True)
    assert twice.target().line().startswith(
        "0 1 multipath 1 queue_if_no_path 0 1 1"
    )


def test_multipath_priority_group_overrides():
    groups = [PriorityGroup(["8:0"], selector="queue-length", path_args=("2",)), ["8:16"]]
    line = MultipathParams.build(10, groups, initial_group=2, selector_args=["x"]).target().line()
    assert line == "0 10 multipath 0 0 2 2 queue-length 1 x 1 1 8:0 2 round-robin 1 x 1 1 8:16 1"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"priority_groups": []},
        {"priority_groups": [[]]},
        {"priority_groups": ["8:0"]},
        {"priority_groups": [[8]]},
        {"initial_group": 2},
        {"initial_group": 0},
        {"features": ["bogus"]},
        {"features": ["pg_init_retries"]},
        {"features": ["pg_init_retries", "51"]},
        {"features": ["queue_mode", "xyz"]},
        {"features": ["queue_if_no_path"] * 9},
        {"selector": "round robin"},
        {"selector": ""},
        {"path_args": ("1 2",)},
        {"hw_handler_args": ["x"]},
        {"selector_args": "ab"},
        {"features": "queue_if_no_path"},
        {"length_sectors": 0},
    ],
)
def test_multipath_table_rejects(kwargs):
    args = {"length_sectors": 100, "priority_groups": [["8:0"]]}
    args.update(kwargs)
    with pytest.raises(EncodeError):
        MultipathParams.build(**args)


BUILT = [
    MultipathParams.build(2048, [["7:0"], ["7:1", (7, 2)]]),
    MultipathParams.build(100, [["8:0", "8:16"]], "service-time", queue_if_no_path=True,
                          features=["pg_init_retries", "50"], hw_handler="alua", path_args=("1", "1")),
    MultipathParams.build(10, [PriorityGroup(["8:0"], selector="queue-length", path_args=("2",)), ["8:16"]],
                          initial_group=2, selector_args=["x"]),
]


@pytest.mark.parametrize("built", BUILT)
def test_multipath_table_parses_back(built):
    assert MultipathParams.parse(built.target().line()) == built
    assert MultipathParams.parse(built.render()) == dataclasses.replace(built, length_sectors=None)


def test_multipath_table_without_groups_parses():
    # multipath_ctr takes no groups with initial group 0 (a map whose paths are all gone).
    assert MultipathParams.parse("1 queue_if_no_path 0 0 0").groups == ()


@pytest.mark.parametrize(
    "params",
    ["", "0", "0 0", "x 0 1 1", "0 0 1 1 round-robin 0 1", "0 0 1 1 round-robin 0 1 1 8:0",
     "0 0 1 2 round-robin 0 1 1 8:0 1", "0 0 0 1", "0 0 1 0 round-robin 0 1 1 8:0 1",
     "0 0 1 1 round-robin 0 1 1 sda 1", "0 0 1 1 round-robin 0 2 1 8:0 1 8:16 2",
     "0 0 1 1 round-robin 0 1 1 8:0 1 extra"],
)
def test_multipath_table_parse_rejects(params):
    with pytest.raises(DecodeError):
        MultipathParams.parse(params)
