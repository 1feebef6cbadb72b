"""Pure parts of the scale benchmark: the seed thread's text, rows, and the docs section it owns."""

from __future__ import annotations

import json

import numpy as np
import pytest

from protocol.dmswitch_oracle import apply_region_mappings
from tests.bench import maps, scale, scale_lib


def test_run_starts_skip_holes() -> None:
    owners = np.array([0, 0, 1, -1, -1, 1, 1, 2, -1, 2])
    starts, lengths = scale_lib.run_starts(owners)
    assert starts.tolist() == [0, 2, 5, 7, 9]
    assert lengths.tolist() == [2, 1, 2, 1, 1]


@pytest.mark.parametrize("limit", [64, 200, 4096])
def test_naive_messages_rebuild_the_map_and_respect_the_limit(limit) -> None:
    owners = maps.seed_map(np.random.default_rng(1), pages=5000).astype(np.int64)
    owners[100:140] = -1
    messages = scale_lib.naive_messages(owners, limit)
    assert all(len(m) <= limit for m in messages)
    table = np.full(owners.size, 7, dtype=np.int64)
    for m in messages:
        apply_region_mappings(table, m, 3)
    alloc = owners >= 0
    assert np.array_equal(table[alloc], owners[alloc])
    assert (table[~alloc] == 7).all()
    assert scale_lib.naive_message_count(owners, limit) == (len(messages), sum(map(len, messages)))
    assert scale_lib.naive_messages(owners, limit, max_messages=2) == messages[:2]


def test_replace_section_keeps_other_text() -> None:
    doc = "# Benchmarks\n\n## Other\ntext\n"
    once = scale_lib.replace_section(doc, "## Scale\nv1")
    assert once.startswith(doc.rstrip("\n")) and "v1" in once
    twice = scale_lib.replace_section(once + "\n## Later section\nkept\n", "## Scale\nv2")
    assert "v1" not in twice and "v2" in twice and "## Later section\nkept" in twice and "## Other\ntext" in twice
    assert twice.count(scale_lib.BEGIN_MARK) == 1


def test_replace_section_refuses_broken_markers() -> None:
    with pytest.raises(scale_lib.DocSectionError):
        scale_lib.replace_section(f"x\n{scale_lib.END_MARK}\n{scale_lib.BEGIN_MARK}\n", "s")
    with pytest.raises(scale_lib.DocSectionError):
        scale_lib.replace_section(f"x\n{scale_lib.BEGIN_MARK}\n", "s")


def t(v: float) -> dict:
    return {"min": v, "median": v, "max": v, "n": 1}


SAMPLE = {
    "install": [{"map_to_routed_s": 2.0, "send_s": 0.3}, {"map_to_routed_s": 4.0, "send_s": 0.3},
                {"map_to_routed_s": 3.0, "send_s": 0.3}],
    "agent_messages": {"count": 20, "bytes": 1000},
    "kernel": {"agent_messages_s": t(0.5),
               "bigger_messages": [{"limit": 1 << 20, "messages": 4, "bytes": 999, "s": t(0.4)},
                                   {"limit": 4 << 20, "messages": 1, "bytes": 999, "error": "OSError: ENOMEM"}],
               "diff_messages_s": t(0.01), "diff_messages": {"count": 1, "bytes": 80}},
    "dmsetup": {"messages": 100, "bytes": 400000, "sample": 10, "sample_s": 5.0, "sample_raw_ioctl_s": 0.01,
                "extrapolated_s": 600.0},
    "fetch": {"agent_s": t(1.0), "sg_raw_s": t(0.8), "sgio_no_decode_s": t(0.6), "commands": 1,
              "allocation": 1 << 20, "bytes": 393380},
    "diff": [{"change_to_routed_s": 1.5, "reconcile_s": 1.4, "moved_pages": 1000}],
    "diff_one_page": [{"change_to_routed_s": 0.08, "reconcile_s": 0.07, "moved_pages": 1, "changes_since": True,
                       "reconcile_parts_s": {"discover_s": 0.03, "fetch_s": 0.02, "kernel_s": 0.02}}],
}


def test_rows_compare_with_the_fastest_kernel_bound_and_state_goals() -> None:
    rows = scale_lib.build_rows(SAMPLE)
    install = rows[0]
    assert install.measured == "3.000 s"            # median of 2, 4, 3
    assert "(a) 0.400 s" in install.baseline      # the faster of 0.5 s and 0.4 s
    assert install.ratio == "7.50x" and install.met == "no"
    rejected = next(r for r in rows if "4096 KiB" in r.what)
    assert rejected.measured == "rejected" and "ENOMEM" in rejected.note
    b = next(r for r in rows if r.what.startswith("(b)"))
    assert b.ratio == "200x" and b.met == "yes"
    fetch = next(r for r in rows if r.what.startswith("fetch"))
    assert fetch.ratio == "1.25x" and fetch.met == "yes"
    thousand = next(r for r in rows if r.what.startswith("diff: 1,000"))
    assert thousand.goal == "<= 0.25 s" and thousand.met == "no" and "whole map" in thousand.note
    one = next(r for r in rows if r.what.startswith("diff: 1 page"))
    assert one.goal == "<= 0.1 s" and one.met == "yes"
    assert "changes since" in one.note and "discover 0.030 s" in one.note
    table = scale_lib.render_table(rows)
    assert table.count("\n") == len(rows) + 1


def test_an_unmet_install_row_says_what_limits_it() -> None:
    enc = {"s": t(2.5), "messages": 20, "bytes": 1000}
    res = {**SAMPLE, "encode": {"agent": enc, "runs_only": enc},
           "install_pyspy": {"samples": 300, "on_stack": [["encode_region_mappings (protocol/dmswitch_encoder.py)", 240]]}}
    install = scale_lib.build_rows(res)[0]
    assert install.met == "no"
    assert install.note.endswith("limited by the agent's encoder, 2.500 s alone under TCG, "
                                 "on the stack in 240 of 300 py-spy samples of the install")
    b = next(r for r in scale_lib.build_rows(res) if r.what.startswith("(b)"))
    assert b.met == "yes" and "limited" not in b.note  # met: nothing to explain


def test_many_lun_rows() -> None:
    m = {"luns": 64, "members": 3, "pages": 100000, "routed": 64, "all_routed_s": 300.0, "max_parallel_luns": 8,
         "max_concurrent": 8, "packed_map_bytes": 1_600_000, "vm_hwm_bytes": 90 << 20, "vm_rss_bytes": 80 << 20,
         "poll_interval_s": 15.0, "idle_cpu_fraction": 0.02, "idle_window_s": 30.0}
    rows = scale_lib.build_rows({"many_luns": m})
    assert [r.met for r in rows] == ["yes", "yes", "no"]
    m.update(start_rss_bytes=40 << 20, start_threads=4, threads=200)
    memory = scale_lib.build_rows({"many_luns": m})[1]
    assert memory.note.endswith("before any LUN (Python, numpy, the daemon's threads) VmRSS 40.0 MiB with "
                                "4 threads, 200 threads at the end")
    assert "limited by" not in scale_lib.build_rows({"many_luns": m})[2].note  # no profile, no claim
    m["idle_profile"] = {"samples": 100, "innermost": [], "on_stack": [["poll_map_header (agent/mapsources/pagemap.py)", 47]]}
    assert scale_lib.build_rows({"many_luns": m})[2].note.endswith(
        "limited by the polls themselves, one GET PAGE MAP per LUN per interval under TCG: "
        "in 47 of 100 py-spy samples of the idle daemon")


def test_host_renders_saved_json_without_booting(tmp_path, monkeypatch, capsys) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Someone else's\nkeep\n")
    monkeypatch.setattr(scale, "DOC", doc)
    saved = tmp_path / "bench-scale.json"
    saved.write_text(json.dumps(SAMPLE))
    assert scale.main(["--from-json", str(saved)]) == 0
    text = doc.read_text()
    assert "## Someone else's\nkeep" in text and "install seed map" in text
    assert "python -m tests.vm.run --members 3 --layout seed" in text


def test_collapsed_stacks_summary() -> None:
    text = ("main (a.py:1);poll (d.py:10);select (selectors.py:5) 30\n"
            "main (a.py:1);poll (d.py:12);sg_io (s.py:3) 10\n"
            "garbage line\n")
    s = scale_lib.summarise_collapsed(text)
    assert s["samples"] == 40
    assert s["innermost"][0] == ("select (selectors.py)", 30)
    assert dict(s["on_stack"])["poll (d.py)"] == 40


def test_host_boots_each_part_and_merges_their_json(tmp_path, monkeypatch) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n")
    monkeypatch.setattr(scale, "DOC", doc)
    calls = []

    def fake_rig(results, rig_args, command, timeout):
        calls.append((rig_args, command))
        if "tests.bench.guest_scale" in command:
            (results / "bench-scale.json").write_text(json.dumps(SAMPLE))
        return 0  # the many-LUN part writes nothing: reported, not fatal

    monkeypatch.setattr(scale, "rig", fake_rig)
    monkeypatch.setattr(scale, "host_part", lambda results, repeat: {"host_encoder": ENCODER})
    assert scale.main(["--results", str(tmp_path / "r")]) == 0
    assert [c[1][2] for c in calls] == ["tests.bench.guest_scale", "tests.bench.guest_many_luns"]
    assert "encoder (host, one core)" in doc.read_text()
    assert "--no-login" in calls[1][0] and calls[1][0][calls[1][0].index("--luns") + 1] == "64"
    assert "install seed map" in doc.read_text()


ENCODER = {"regions": 1_572_864, "repeat": 11, "cpu": 1, "load_avg": [2.0, 1.5, 1.0], "per_run_bytes": 9_351_758,
           "identical": True, "oracle_ok": True,
           "compiled": {"s": {"min": 0.020, "median": 0.025, "max": 0.04}, "messages": 20, "bytes": 1_275_178},
           "python": {"s": {"min": 0.20, "median": 0.25, "max": 0.3}, "messages": 20, "bytes": 1_275_178}}


def test_encoder_row_states_goal_baseline_and_ratio() -> None:
    row = scale_lib.build_rows({"host_encoder": ENCODER})[0]
    assert (row.measured, row.baseline, row.ratio, row.met) == ("25.0 ms", "Python core 250.0 ms", "0.10x", "yes")
    assert "1,275,178 bytes in 20 messages = 0.1364x per-run; byte-identical" in row.note
    slow = {**ENCODER, "compiled": {**ENCODER["compiled"], "s": {"min": 0.03, "median": 0.031, "max": 0.05}}}
    assert scale_lib.encoder_row(slow).met == "no"
    bigger = {**ENCODER, "compiled": {**ENCODER["compiled"], "bytes": 1_275_179}}
    assert scale_lib.encoder_row(bigger).met == "no"
    assert scale_lib.encoder_row({**ENCODER, "identical": False}).met == "no"
