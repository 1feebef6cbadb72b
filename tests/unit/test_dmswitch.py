"""protocol.dmswitch_encoder and protocol.dmswitch_oracle: the set_region_mappings message both ways.

The decoder is checked against hand-written examples of what
drivers/md/dm-switch.c process_set_region_mappings does; the encoder is
then checked by decoding what it emits. The encoder has two cores, the
compiled one production uses and the pure-Python one it was ported from:
the properties run on both, and both must emit the same bytes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import _dmswitch_encode
from protocol.dmswitch_encoder import encode_region_mappings, round_robin
from protocol.dmswitch_oracle import apply_region_mappings, region_table_entry_bits, split_message_args
from protocol.dmtable import MAX_MESSAGE_TOKENS, MAX_SWITCH_PATHS
from protocol.errors import DecodeError, DmSwitchMessageError, EncodeError
from tests.bench import maps
from tests.bench.dmswitch_encode import scenarios

CORES = pytest.mark.parametrize("core", ["compiled", "python"])

MSG = "set_region_mappings"
EXPLICIT = re.compile(r"[0-9a-f]+:[0-9a-f]+")


def apply_all(table: np.ndarray, messages: list[str], nr_paths: int) -> np.ndarray:
    for m in messages:
        apply_region_mappings(table, m, nr_paths)
    return table


# --------------------------------------------------------------------------
# Decoder: hand-written kernel behaviour
# --------------------------------------------------------------------------


def test_switch_txt_example():
    # Documentation/device-mapper/switch.txt: "1000:1 :2 R2,10" is 1000:1 :2
    # followed by 16 more alternating entries (all numbers hex).
    table = np.zeros(0x2000, dtype=np.int64)
    apply_region_mappings(table, f"{MSG} 1000:1 :2 R2,10", 3)
    assert table[0x1000:0x1012].tolist() == [1, 2] * 9
    assert table[0x1012] == 0 and table[0xFFF] == 0


def test_leading_colon_sets_region_one():
    # region_index starts at 0 and ':' increments before use.
    table = np.zeros(4, dtype=np.int64)
    apply_region_mappings(table, f"{MSG} :1 :2", 3)
    assert table.tolist() == [0, 1, 2, 0]


def test_case_and_whitespace():
    table = np.zeros(32, dtype=np.int64)
    apply_region_mappings(table, "SET_Region_Mappings\t1A:F  \n:e r2,3", 16)
    assert table[0x1A:0x1F].tolist() == [15, 14, 15, 14, 15]


def test_r_first_copies_region_zero():
    # Valid for the kernel: R1,3 at region_index 0 repeats region 0.
    table = np.array([2, 0, 0, 0, 0], dtype=np.int64)
    apply_region_mappings(table, f"{MSG} R1,3", 3)
    assert table.tolist() == [2, 2, 2, 2, 0]


def test_r_overlapping_cycle_repeats_pattern():
    table = np.zeros(12, dtype=np.int64)
    apply_region_mappings(table, f"{MSG} 2:0 :1 :2 R3,7", 3)
    assert table.tolist() == [0, 0, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0]


def test_r_reads_existing_table_and_leaves_index_at_last_written():
    table = np.array([1, 2, 0, 0, 0, 0, 0, 0], dtype=np.int64)
    apply_region_mappings(table, f"{MSG} 2:0 R3,2 :1", 3)
    # regions 3, 4 copy regions 0, 1; ':' then writes region 5.
    assert table.tolist() == [1, 2, 0, 1, 2, 1, 0, 0]


def test_r_may_reach_the_last_region():
    table = np.zeros(16, dtype=np.int64)
    apply_region_mappings(table, f"{MSG} 5:1 :2 R1,9", 3)  # 6 + 9 = 15, the last region
    assert table[5:].tolist() == [1] + [2] * 10


def test_r_zero_count_is_a_no_op():
    table = np.zeros(4, dtype=np.int64)
    apply_region_mappings(table, f"{MSG} 3:1 R1,0", 3)
    assert table.tolist() == [0, 0, 0, 1]


def test_parse_hex_wraps_without_overflow_check():
    table = np.zeros(4, dtype=np.int64)
    apply_region_mappings(table, f"{MSG} 10000000000000002:1", 3)
    assert table.tolist() == [0, 0, 1, 0]


def test_r_copy_reads_entries_masked_to_entry_width():
    # switch_region_table_read masks to region_table_entry_bits (2 bits for 3 paths).
    table = np.array([6, 0, 0], dtype=np.int64)
    apply_region_mappings(table, f"{MSG} R1,2", 3)
    assert table.tolist() == [6, 2, 2]


def test_backslash_escapes_and_nul():
    assert split_message_args("a\\ b c\\\\d  e") == [b"a b", b"c\\d", b"e"]
    assert split_message_args("a b\0c d") == [b"a", b"b"]
    table = np.zeros(4, dtype=np.int64)
    apply_region_mappings(table, f"{MSG} \\1:\\2", 3)
    assert table.tolist() == [0, 2, 0, 0]


def test_message_with_no_tokens_is_accepted():
    table = np.zeros(4, dtype=np.int64)
    apply_region_mappings(table, MSG, 3)
    assert table.tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize(
    ("tokens", "bad", "why"),
    [
        ("5:1 :2 9:7", "9:7", "device"),  # path >= nr_paths
        ("5:1 :2 ff:0", "ff:0", "region number"),  # region >= nr_regions
        ("5:1 :2 R0,1", "R0,1", "cycle length"),
        ("5:1 :2 R8,1", "R8,1", "cycle length"),  # n - 1 > region_index (6)
        ("5:1 :2 R1,a", "R1,a", "region number"),  # 6 + 10 >= nr_regions (16)
        ("5:1 :2 R,1", "R,1", "argument"),
        ("5:1 :2 R1", "R1", "argument"),
        ("5:1 :2 R1,", "R1,", "argument"),
        ("5:1 :2 R1,2x", "R1,2x", "argument"),
        ("5:1 :2 1:", "1:", "argument"),
        ("5:1 :2 :", ":", "argument"),
        ("5:1 :2 12", "12", "argument"),
        ("5:1 :2 x:1", "x:1", "argument"),
        ("5:1 :2 0x1:1", "0x1:1", "argument"),
        ("5:1 :2 1:2:3", "1:2:3", "argument"),
        ("5:1 :2 1:-1", "1:-1", "argument"),
    ],
)
def test_rejections_leave_earlier_tokens_applied(tokens, bad, why):
    table = np.zeros(16, dtype=np.int64)
    with pytest.raises(DmSwitchMessageError) as exc:
        apply_region_mappings(table, f"{MSG} {tokens}", 3)
    assert exc.value.token == bad
    assert exc.value.position == 3 and exc.value.applied == 2
    assert why in exc.value.reason
    # Not atomic: the two tokens before the bad one stay written.
    assert table[5] == 1 and table[6] == 2
    assert int(np.count_nonzero(table)) == 2


def test_colon_walking_off_the_end():
    table = np.zeros(16, dtype=np.int64)
    with pytest.raises(DmSwitchMessageError) as exc:
        apply_region_mappings(table, f"{MSG} e:1 :2 :1", 3)
    assert (exc.value.token, exc.value.position, exc.value.applied) == (":1", 3, 2)
    assert table[14:].tolist() == [1, 2]


def test_unrecognised_message_name():
    table = np.zeros(4, dtype=np.int64)
    with pytest.raises(DmSwitchMessageError) as exc:
        apply_region_mappings(table, "set_region_mapping 1:1", 3)
    assert exc.value.position == 0
    assert table.tolist() == [0, 0, 0, 0]


def test_region_table_entry_bits():
    assert [region_table_entry_bits(p) for p in (1, 2, 3, 4, 5, 8, 9, 16, 17)] == [1, 1, 2, 2, 3, 3, 4, 4, 5]


# --------------------------------------------------------------------------
# Encoder properties
# --------------------------------------------------------------------------


@st.composite
def region_maps(draw, max_regions=1500):
    """A map drawn from one of the layout families, as int64 with -1 for don't-care."""
    nr_paths = draw(st.sampled_from([1, 2, 3, 4, 5, 8, 16, 17, 300]))
    n = draw(st.integers(1, max_regions))
    seed = draw(st.integers(0, 2**32 - 1))
    family = draw(st.sampled_from(["random", "runs", "striped", "perturbed", "seed", "holes"]))
    rng = np.random.default_rng(seed)
    if family == "random":
        r = rng.integers(0, nr_paths, n)
    elif family == "runs":
        r = maps.run_heavy(n, nr_paths, rng, mean_run=float(draw(st.sampled_from([2, 8, 64]))))
    elif family == "striped":
        r = maps.striped(n, nr_paths, draw(st.integers(1, 5)))
    elif family == "perturbed":
        r = maps.move_pages(maps.striped(n, nr_paths, draw(st.integers(1, 3))), 0.05, nr_paths, rng)
    elif family == "seed":
        r = maps.seed_map(rng, pages=max(n, 10), nr_paths=nr_paths)[:n]
    else:
        r = maps.with_holes(rng.integers(0, nr_paths, n).astype(np.int16), 0.3, rng, mean_hole=4.0)
    r = np.asarray(r, dtype=np.int64)
    if draw(st.booleans()):
        r = maps.with_holes(r.astype(np.int16), draw(st.sampled_from([0.05, 0.5, 0.95])), rng).astype(np.int64)
    return r, nr_paths


def check_messages(messages: list[str], limit: int) -> None:
    for m in messages:
        assert len(m.encode()) <= limit
        words = m.split(" ")
        assert words[0] == MSG and all(words)
        assert EXPLICIT.fullmatch(words[1]), words[1]  # valid on its own
        assert len(words) <= MAX_MESSAGE_TOKENS


LIMITS = st.sampled_from([64, 80, 128, 1024, 65536])
EXAMPLES = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@CORES
@EXAMPLES
@given(region_maps(), LIMITS, st.integers(0, 2**32 - 1))
def test_unknown_table_every_allocated_region_lands(core, case, limit, garbage_seed):
    regions, nr_paths = case
    messages = encode_region_mappings(regions, max_message_bytes=limit, core=core)
    check_messages(messages, limit)
    table = np.random.default_rng(garbage_seed).integers(0, nr_paths, len(regions))
    apply_all(table, messages, nr_paths)
    alloc = regions >= 0
    assert np.array_equal(table[alloc], regions[alloc])
    if not alloc.any():
        assert messages == []


def previous_of_kind(regions, nr_paths, kind, rng):
    """A kernel table the map is written over: the round-robin load, anything, or the map nearly or exactly."""
    n = len(regions)
    if kind == "round_robin":
        return round_robin(n, nr_paths).astype(np.int64)
    if kind == "arbitrary":
        return rng.integers(0, nr_paths, n)
    previous = np.where(regions >= 0, regions, rng.integers(0, nr_paths, n))
    if kind == "near" and nr_paths > 1:
        previous = maps.move_pages(previous, 0.02, nr_paths, rng).astype(np.int64)
    return previous


PREVIOUS_KINDS = st.sampled_from(["round_robin", "arbitrary", "near", "same"])


@CORES
@EXAMPLES
@given(region_maps(), LIMITS, PREVIOUS_KINDS, st.integers(0, 2**32 - 1))
def test_known_table_only_differences_needed(core, case, limit, kind, seed):
    regions, nr_paths = case
    previous = previous_of_kind(regions, nr_paths, kind, np.random.default_rng(seed))
    messages = encode_region_mappings(regions, previous=previous, max_message_bytes=limit, core=core)
    check_messages(messages, limit)
    table = apply_all(previous.copy(), messages, nr_paths)
    alloc = regions >= 0
    assert np.array_equal(table[alloc], regions[alloc])
    if kind == "same":
        assert messages == []


@CORES
@EXAMPLES
@given(region_maps(), LIMITS, st.sampled_from([0.1, 0.5, 1.0]), st.integers(0, 2**32 - 1))
def test_partly_unknown_table(core, case, limit, blind, seed):
    # A negative previous entry is unknown: the kernel may hold anything there.
    regions, nr_paths = case
    n = len(regions)
    rng = np.random.default_rng(seed)
    previous = rng.integers(0, nr_paths, n)
    previous[rng.random(n) < blind] = -1
    messages = encode_region_mappings(regions, previous=previous, max_message_bytes=limit, core=core)
    check_messages(messages, limit)
    table = np.where(previous < 0, rng.integers(0, nr_paths, n), previous)
    apply_all(table, messages, nr_paths)
    alloc = regions >= 0
    assert np.array_equal(table[alloc], regions[alloc])


def test_impossible_path_in_previous_means_unknown():
    # agent/orchestrator.py marks regions it does not know with path nr_paths.
    # Holes there must never be written back as that path (the kernel would
    # reject the message); indices need 5 hex digits for gap bridging to occur.
    rng = np.random.default_rng(3)
    kernel = maps.seed_map(rng, pages=100_000)
    owners = maps.with_holes(maps.move_pages(kernel, 0.05, 3, rng), 0.3, rng, 3).astype(np.int64)
    previous = np.where(owners < 0, 3, kernel)
    messages = encode_region_mappings(owners, previous=previous)
    table = apply_all(kernel.astype(np.int64), messages, 3)
    assert np.array_equal(table[owners >= 0], owners[owners >= 0])
    assert messages == encode_region_mappings(owners, previous=np.where(owners < 0, -1, kernel))


@CORES
@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-1, 3), min_size=1, max_size=40), st.integers(0, 2**32 - 1))
def test_small_lists_shrinkable(core, regions, seed):
    messages = encode_region_mappings(regions, max_message_bytes=64, core=core)
    check_messages(messages, 64)
    r = np.array(regions)
    table = apply_all(np.random.default_rng(seed).integers(0, 4, len(r)), messages, 4)
    assert np.array_equal(table[r >= 0], r[r >= 0])


# --------------------------------------------------------------------------
# The two cores: the same bytes
# --------------------------------------------------------------------------


def both_cores(regions, previous, limit):
    compiled = encode_region_mappings(regions, previous=previous, max_message_bytes=limit, core="compiled")
    python = encode_region_mappings(regions, previous=previous, max_message_bytes=limit, core="python")
    assert compiled == python
    return compiled


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(region_maps(), LIMITS, st.sampled_from(["none", "round_robin", "arbitrary", "near", "same", "blind"]),
       st.integers(0, 2**32 - 1))
def test_cores_emit_the_same_messages(case, limit, kind, seed):
    regions, nr_paths = case
    rng = np.random.default_rng(seed)
    if kind == "none":
        previous = None
    elif kind == "blind":
        previous = rng.integers(0, nr_paths, len(regions))
        previous[rng.random(len(regions)) < 0.3] = -1
    else:
        previous = previous_of_kind(regions, nr_paths, kind, rng)
    both_cores(regions, previous, limit)


@pytest.mark.parametrize("index", range(len(scenarios())))
def test_cores_agree_on_the_benchmark_maps(index):
    # Full-size maps: the distance vote runs on the sample (over 2**17 regions),
    # matches run long, messages hit the 64 KiB limit.
    name, regions, previous, before, nr_paths, _ = scenarios()[index]
    messages = both_cores(regions, previous, 65536)
    table = apply_all(before.astype(np.int64), messages, nr_paths)
    assert np.array_equal(table[regions >= 0], regions[regions >= 0]), name


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16])
def test_cores_agree_on_every_dtype(dtype):
    r = maps.seed_map(np.random.default_rng(9), pages=20_000).astype(dtype)
    holes = maps.with_holes(r.astype(np.int16), 0.2, np.random.default_rng(10)).astype(np.int64)
    assert both_cores(r, None, 4096) == both_cores(r.astype(np.int64), None, 4096)
    both_cores(holes if np.dtype(dtype).kind == "i" else r, round_robin(len(r), 3), 4096)


def test_cores_agree_past_sixteen_paths_and_with_tight_token_caps(monkeypatch):
    # More than 16 paths: literal costs vary (2-digit paths); a lowered token cap cuts messages by count.
    r = maps.move_pages(maps.striped(300_000, 40, 3), 0.05, 40, np.random.default_rng(11))
    both_cores(r, None, 65536)
    both_cores(r, round_robin(len(r), 40), 65536)
    from protocol import dmswitch_encoder

    monkeypatch.setattr(dmswitch_encoder, "MAX_MESSAGE_TOKENS", 100)
    msgs = both_cores(r, None, 1 << 20)
    assert all(len(m.split()) <= 100 for m in msgs)


def test_compiled_core_runs_in_threads_at_once():
    # It plans without the GIL, in scratch memory one call keeps for the next: calls that overlap must
    # neither share it nor change each other's messages.
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(12)
    cases = [maps.seed_map(rng, pages=n) for n in (300_000, 50_000, 200_000, 1000, 150_000, 300_000)]
    alone = [encode_region_mappings(r) for r in cases]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(3):
            assert list(pool.map(encode_region_mappings, cases)) == alone


def test_compiled_core_refuses_malformed_arrays():
    t = np.zeros(10, dtype=np.int8)
    with pytest.raises(TypeError):
        _dmswitch_encode.encode(t.astype(np.float64), None, None, 0, 65536, 65536, None)
    with pytest.raises(ValueError):
        _dmswitch_encode.encode(np.full(10, -1, dtype=np.int8), None, None, 0, 65536, 65536, None)
    with pytest.raises(ValueError):
        _dmswitch_encode.encode(t, np.ones(9, dtype=bool), None, 0, 65536, 65536, None)
    with pytest.raises(ValueError):
        _dmswitch_encode.encode(t, None, None, 0, 65536, 65536, np.array([10], dtype=np.int64))
    with pytest.raises(ValueError):
        _dmswitch_encode.encode(t.reshape(2, 5), None, None, 0, 65536, 65536, None)
    assert _dmswitch_encode.encode(t, None, None, 0, 65536, 65536, None) == [f"{MSG} 0:0 R1,9"]


@pytest.mark.parametrize(("env", "core"), [({}, "compiled"), ({"SWITCH_AGENT_ENCODER": "python"}, "python")])
def test_core_is_chosen_by_the_environment(env, core):
    run_env = {k: v for k, v in os.environ.items() if k != "SWITCH_AGENT_ENCODER"} | env
    out = subprocess.run([sys.executable, "-c", "import protocol.dmswitch_encoder as e; print(e.CORE)"],
                         env=run_env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == core


# --------------------------------------------------------------------------
# Encoder edges
# --------------------------------------------------------------------------


def test_one_region():
    assert encode_region_mappings([0]) == [f"{MSG} 0:0"]
    assert encode_region_mappings([1], previous=[1]) == []
    assert encode_region_mappings([1], previous=[0]) == [f"{MSG} 0:1"]


def test_one_path_is_one_run():
    assert encode_region_mappings(np.zeros(1000, dtype=np.int64)) == [f"{MSG} 0:0 R1,3e7"]


def test_only_the_last_region_changed():
    prev = round_robin(100_001, 16)
    regions = prev.astype(np.int64)
    regions[-1] = (regions[-1] + 1) % 16
    assert encode_region_mappings(regions, previous=prev) == [f"{MSG} 186a0:1"]


def test_all_dont_care():
    assert encode_region_mappings(np.full(50, -1)) == []
    assert encode_region_mappings(np.full(50, -1), previous=np.zeros(50, dtype=int)) == []


def test_previous_equal_sends_nothing():
    r = maps.seed_map(np.random.default_rng(1), pages=5000)
    assert encode_region_mappings(r, previous=r) == []
    holes = maps.with_holes(r, 0.3, np.random.default_rng(2))
    assert encode_region_mappings(holes, previous=r) == []


def test_leading_holes_start_at_first_allocated():
    assert encode_region_mappings([-1, -1, -1, 2, 2]) == [f"{MSG} 3:2 :2"]


def test_striped_is_a_few_tokens():
    msgs = encode_region_mappings(maps.striped(3000, 3))
    assert len(msgs) == 1 and len(msgs[0]) < 60
    table = apply_all(np.zeros(3000, dtype=np.int64), msgs, 3)
    assert np.array_equal(table, maps.striped(3000, 3))


def test_wide_stripes_copy_one_period_back():
    # Stripes 64 pages wide over 3 members repeat every 192 regions.
    r = maps.striped(100_000, 3, 64)
    msgs = encode_region_mappings(r)
    assert sum(len(m) for m in msgs) < 80
    assert np.array_equal(apply_all(np.zeros(len(r), dtype=np.int64), msgs, 3), r)


def test_many_paths_use_wider_hex():
    r = np.random.default_rng(3).integers(0, 300, 500)
    msgs = encode_region_mappings(r)
    assert apply_all(np.zeros(500, dtype=np.int64), msgs, 300).tolist() == r.tolist()


def test_tiny_limit_splits_r_tokens():
    r = np.repeat(np.arange(3), 40)
    msgs = encode_region_mappings(r, max_message_bytes=len(MSG) + 1 + len("77:2"))
    assert all(EXPLICIT.fullmatch(m.split()[1]) for m in msgs)
    assert apply_all(np.zeros(120, dtype=np.int64), msgs, 3).tolist() == r.tolist()


def test_limit_too_small_for_one_token():
    with pytest.raises(EncodeError):
        encode_region_mappings([0, 1, 2], max_message_bytes=len(MSG) + 3)
    assert encode_region_mappings([0, 1, 2], max_message_bytes=len(MSG) + 4)


def test_token_count_bounded_per_message():
    r = np.random.default_rng(4).integers(0, 16, 200_000)
    msgs = encode_region_mappings(r, max_message_bytes=2**30)
    assert len(msgs) >= 2
    assert all(len(m.split(" ")) <= MAX_MESSAGE_TOKENS for m in msgs)
    assert np.array_equal(apply_all(np.zeros(len(r), dtype=np.int64), msgs, 16), r)


def test_seed_layout_slice_beats_per_run():
    r = maps.seed_map(np.random.default_rng(2012), pages=200_000)
    msgs = encode_region_mappings(r)
    assert np.array_equal(apply_all(np.zeros(len(r), dtype=np.int64), msgs, 3), r)
    starts = np.flatnonzero(np.r_[True, r[1:] != r[:-1]])
    per_run = sum(len(f"{s:x}:{r[s]:x} ") for s in starts.tolist())  # a lower bound of per-run
    assert sum(len(m) for m in msgs) < 0.35 * per_run


@pytest.mark.parametrize(
    ("regions", "previous"),
    [
        (np.zeros((2, 2), dtype=int), None),
        (np.array([0.0, 1.0]), None),
        (np.array([True, False]), None),
        (["a", "b"], None),
        ([0, MAX_SWITCH_PATHS], None),
        ([0, 1], [0]),
        ([0, 1], [0, MAX_SWITCH_PATHS]),
    ],
)
def test_encoder_rejects_bad_input(regions, previous):
    with pytest.raises(EncodeError):
        encode_region_mappings(regions, previous=previous)


def test_round_robin():
    rr = round_robin(7, 3)
    assert rr.tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert round_robin(0, 3).tolist() == []
    with pytest.raises(EncodeError):
        round_robin(5, 0)
