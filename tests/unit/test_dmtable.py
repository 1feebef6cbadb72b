"""protocol.dmtable: dm-linear and dm-switch table lines, built and (for a switch) parsed back."""

from __future__ import annotations

import pytest

from protocol.dmtable import LinearParams, SwitchParams
from protocol.errors import DecodeError, EncodeError


def test_switch_table():
    assert SwitchParams.build(1000, 128, ["253:0", (253, 1)]).target().line() == "0 1000 switch 2 128 0 253:0 0 253:1 0"
    assert SwitchParams.build(8, 1, ["8:16"], offsets=[2048]).target().line() == "0 8 switch 1 1 0 8:16 2048"


@pytest.mark.parametrize(
    "args",
    [
        (0, 128, ["8:0"]),
        (-1, 128, ["8:0"]),
        (2**64, 128, ["8:0"]),
        (1000, 0, ["8:0"]),
        (1000, 2**32, ["8:0"]),
        (1000, 128, []),
        (1000, 128, "8:0"),
        (1000, 128, ["sdb"]),
        (1000, 128, ["/dev/sdb"]),
        (1000, 128, ["8:"]),
        (1000, 128, ["8:1:2"]),
        (1000, 128, ["-1:0"]),
        (1000, 128, ["4096:0"]),
        (1000, 128, ["8:1048576"]),
        (1000, 128, [(8,)]),
        (1000, 128, [8]),
        (1000.0, 128, ["8:0"]),
        (True, 128, ["8:0"]),
    ],
)
def test_switch_table_rejects(args):
    with pytest.raises(EncodeError):
        SwitchParams.build(*args)


def test_switch_table_offsets_must_match():
    with pytest.raises(EncodeError):
        SwitchParams.build(8, 1, ["8:0", "8:16"], offsets=[0])


def test_linear_table():
    assert LinearParams.build(100, "253:4", 0).target().line() == "0 100 linear 253:4 0"
    assert LinearParams.build(100, (8, 16), 63).target().line() == "0 100 linear 8:16 63"
    with pytest.raises(EncodeError):
        LinearParams.build(0, "8:0", 0)
    with pytest.raises(EncodeError):
        LinearParams.build(10, "8:0", -1)
    with pytest.raises(EncodeError):
        LinearParams.build(10, "sda", 0)


def test_parse_switch_table_roundtrip():
    line = SwitchParams.build(10_000, 2048, ["253:0", "253:1", "253:2"], offsets=[0, 8, 0]).target().line()
    full = SwitchParams.parse(line)
    assert full == SwitchParams(2048, ("253:0", "253:1", "253:2"), (0, 8, 0), 10_000)
    assert full.nr_regions == 5
    params = SwitchParams.parse(line.split(" ", 3)[3])
    assert params.length_sectors is None and params.nr_regions is None
    assert params.devices == full.devices and params.offsets == full.offsets


@pytest.mark.parametrize(
    "params",
    ["", "2 128", "2 128 0 8:0 0", "2 128 0 8:0 0 8:16", "2 128 1 x 8:0 0 8:16 0", "1 128 0 sda 0",
     "1 128 0 8:0 -1", "0 128 0", "1 0 0 8:0 0", "1 128 0 8:0 0 extra words", "x 128 0 8:0 0"],
)
def test_parse_switch_table_rejects(params):
    with pytest.raises(DecodeError):
        SwitchParams.parse(params)


def test_linear_table_parses_back():
    built = LinearParams.build(100, (8, 16), 63)
    assert LinearParams.parse(built.target().line()) == built
    assert LinearParams.parse("8:16 63") == LinearParams(None, "8:16", 63)


@pytest.mark.parametrize("line", ["", "8:16", "8:16 63 1", "sda 0", "8:16 -1", "x 100 linear 8:16 0",
                                  "0 100 linear 8:16"])
def test_linear_table_parse_rejects(line):
    with pytest.raises(DecodeError):
        LinearParams.parse(line)
