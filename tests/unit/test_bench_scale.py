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
                       "request_to_routed_s": 0.13, "reconcile_parts_s": {"discover_s": 0.03, "fetch_s": 0.02, "kernel_s": 0.02}}],
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
    assert "from the move request 0.130 s" in one.note and "move request" not in thousand.note  # older JSON
    assert "limited" not in one.note  # met
    slow = {**SAMPLE, "diff_one_page": [{**SAMPLE["diff_one_page"][0], "change_to_routed_s": 0.12}]}
    missed = next(r for r in scale_lib.build_rows(slow) if r.what.startswith("diff: 1 page"))
    assert missed.met == "no" and missed.note.endswith(
        "limited by discover (the multipath map read from sysfs, and the member of any path on a new session), "
        "0.030 s of it")
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
    m["idle_profile"] = {"samples": 100, "innermost": [], "on_stack": [
        ["<module> (agent/cli.py)", 90], ["run_daemon (agent/cli.py)", 90], ["Metrics.write (agent/metrics.py)", 53],
        ["generate_latest (prometheus_client/exposition.py)", 50],
        ["poll_map_header (agent/mapsources/pagemap.py)", 16], ["SessionKeeper.keep (agent/session_keeper.py)", 9],
        ["Sysfs._stacks (agent/kernel/sysfs.py)", 2]]}
    assert scale_lib.build_rows({"many_luns": m})[2].note.endswith(
        "limited by what the idle daemon's py-spy samples (100) hold on the stack: "
        "`Metrics.write (agent/metrics.py)` 53, `poll_map_header (agent/mapsources/pagemap.py)` 16, "
        "`SessionKeeper.keep (agent/session_keeper.py)` 9")


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
    assert "--no-login" in calls[1][0] and calls[1][0][calls[1][0].index("--luns") + 1] == "128"
    assert calls[1][0][calls[1][0].index("--memory") + 1] == "5G"  # 3G held 64 LUNs
    assert "install seed map" in doc.read_text()


# -- the boot storm ----------------------------------------------------------------------------------

def test_percentile_interpolates_like_numpy() -> None:
    data = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 7.5]
    for q in (0, 25, 50, 90, 95, 100):
        assert scale_lib.percentile(data, q) == pytest.approx(float(np.percentile(data, q)))
    assert scale_lib.percentile([2.0], 95) == 2.0
    assert np.isnan(scale_lib.percentile([], 50))


def test_cpu_seconds_from_proc_stat_with_spaces_in_comm() -> None:
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime ...
    line = "4242 (python -m agent) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 23 0\n"
    assert scale_lib.cpu_seconds(line, 100) == 3.0


def ev(t: float, uuid: str, action: str = "change") -> scale_lib.DmEvent:
    return scale_lib.DmEvent(t, action, uuid)


def test_storm_stats_per_lun_times_and_tail_fraction() -> None:
    t0 = 100.0
    events = [
        ev(110, "mpath-3a", "add"), ev(111, "mpath-3a"),          # a's map; reloaded once more at 120
        ev(112, "mpath-3b", "add"), ev(113, "mpath-3b"),
        ev(115, "SWAGENT-leg-0-1-3a", "add"), ev(116, "SWAGENT-sw-1-3a"),
        ev(117, "SWAGENT-top-3a", "add"), ev(118, "SWAGENT-top-3a"),  # a routed at 118 (its map 111)
        ev(120, "mpath-3a"),                                       # multipathd's last map
        ev(121, "SWAGENT-top-3a"),                                 # a swapped again: routed at 121 (map 120)
        ev(125, "SWAGENT-top-3b"),                                 # b routed at 125 (map 113)
        ev(130, "mpath-3b"),                                       # after the last routing: ignored
        ev(119, "mpath-3z"), ev(119.5, "SWAGENT-top-3z"),          # not one of ours: ignored
    ]
    s = scale_lib.storm_stats(events, t0, ["3a", "3b", "3c"])
    assert s["luns"] == 3 and s["routed_by_uevent"] == 2
    assert s["agent_s"]["n"] == 2
    assert s["agent_s"]["p50"] == pytest.approx((1 + 12) / 2)      # a: 121-120, b: 125-113
    assert s["agent_s"]["max"] == 12
    assert s["first_map_s"] == 10 and s["last_map_s"] == 20 and s["last_routed_s"] == 25
    assert s["tail_s"] == 5 and s["tail_fraction"] == pytest.approx(0.25)


def test_storm_stats_with_nothing_routed() -> None:
    s = scale_lib.storm_stats([ev(1, "mpath-3a", "add")], 0.0, ["3a"])
    assert s == {"luns": 1, "routed_by_uevent": 0}


STORM = {"luns": 128, "members": 3, "pages": 100000, "routed": 128, "all_routed_s": 1500.0, "max_parallel_luns": 8,
         "max_concurrent": 8, "packed_map_bytes": 3_200_000, "vm_hwm_bytes": 150 << 20, "vm_rss_bytes": 120 << 20,
         "poll_interval_s": 15.0, "cpu_s": 256.0,
         "storm": {"agent_s": {"p50": 2.0, "p95": 9.5, "max": 12.0, "n": 128}, "first_map_s": 40.0,
                   "last_map_s": 1000.0, "last_routed_s": 1150.0, "tail_s": 150.0, "tail_fraction": 0.15}}


def test_storm_rows_state_goal_measured_baseline_ratio() -> None:
    rows = scale_lib.build_rows({"many_luns": STORM})
    whats = [r.what for r in rows]
    assert whats[0].startswith("many LUNs: 128 LUNs") and rows[0].met == "yes"
    per_lun = rows[1]
    assert per_lun.measured == "p50 2.0 s, p95 9.5 s"
    cpu = rows[2]
    assert cpu.measured == "2.00 s" and "128 LUNs" in cpu.note
    tail = rows[3]
    assert tail.goal.startswith("<= 20 %") and tail.measured == "150.0 s"
    assert tail.baseline == "first login -> last map 1000.0 s" and tail.ratio == "15.0 %" and tail.met == "yes"
    memory = rows[4]
    assert memory.what.endswith("(VmHWM)") and memory.met == "no"  # 150 MiB > 100 MiB + 1.2 x 3.05 MiB
    assert len(rows) == 5  # no idle window measured: no idle row
    late = {**STORM, "storm": {**STORM["storm"], "tail_fraction": 0.3}}
    assert scale_lib.build_rows({"many_luns": late})[3].met == "no"


def test_floor_row_compares_the_install_with_bare_ioctls() -> None:
    runs = [{"total_s": 1.0, "legs_s": 0.2, "switch_s": 0.1, "messages_s": 0.3, "top_s": 0.4},
            {"total_s": 1.2, "legs_s": 0.4, "switch_s": 0.1, "messages_s": 0.3, "top_s": 0.4}]
    floor = {"messages": 20, "bytes": 1000, "kernel": {"s": t(1.0), "runs": runs}, "top_udev": {"s": t(1.5)}}
    enc = {"s": t(2.5), "messages": 20, "bytes": 1000}
    rows = scale_lib.build_rows({**SAMPLE, "floor": floor, "encode": {"agent": enc, "runs_only": enc}})
    row = rows[0]
    assert row.goal == "<= 1.5x floor" and row.baseline == "floor 1.000 s"
    assert row.measured == "3.000 s" and row.ratio == "3.00x" and row.met == "no"
    assert "with the top's udev wait (as the agent's) 1.500 s (2.00x)" in row.note
    assert "limited by the agent's encoder" in row.note
    assert "of it legs 0.300 s, switch 0.100 s, messages 0.300 s, top 0.400 s" in row.note
    fast = scale_lib.build_rows({**SAMPLE, "floor": {**floor, "kernel": {"s": t(2.5)}}})[0]
    assert fast.met == "yes" and "limited" not in fast.note


def test_an_install_over_its_floor_names_the_top_devices_udev_wait_when_the_floor_shows_it() -> None:
    bare = [{"total_s": 0.3, "top_s": 0.02}, {"total_s": 0.3, "top_s": 0.04}]
    waited = [{"total_s": 1.2, "top_s": 0.9}, {"total_s": 1.3, "top_s": 1.0}]
    floor = {"messages": 20, "bytes": 1000, "kernel": {"s": t(0.3), "runs": bare},
             "top_udev": {"s": t(1.25), "runs": waited}}
    spy = {"samples": 140, "innermost": [["semop (dm_udev_sync.py)", 80], ["ioctl (dm.py)", 20], ["x", 1]]}
    row = scale_lib.build_rows({**SAMPLE, "floor": floor, "install_pyspy": spy})[0]
    assert row.met == "no"
    assert ("limited by the top device's udev wait, which users need (they open it by name): the floor's top "
            "step takes 0.950 s with it, 0.030 s without; the floor that waits as the agent must is 1.250 s"
            in row.note)
    assert "py-spy over one install (140 samples, all threads): innermost `semop (dm_udev_sync.py)` 80" in row.note


def test_the_section_keeps_earlier_runs_for_comparison(tmp_path, monkeypatch) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n")
    monkeypatch.setattr(scale, "DOC", doc)
    saved = tmp_path / "bench-luns.json"
    saved.write_text(json.dumps({"many_luns": STORM}))
    assert scale.main(["--from-json", str(saved)]) == 0
    text = doc.read_text()
    assert "many LUNs: 128 LUNs" in text
    # The committed 64-LUN record of 2026-11-28 is shown beside, and says where it comes from.
    assert "many LUNs: 64 LUNs x 3 members x 100,000 pages appear at once | all routed | 64/64 routed in 799.9 s" in text
    assert "64-LUN run of 2026-11-28, kept for comparison" in text


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


DAEMON_LOG = """\
2026-12-06 21:19:42,294 INFO agent.orchestrator: 3600a: reconciled in 14.00 s (discover 9.00, fetch 3.00, kernel 2.00)
2026-12-06 21:19:43,000 INFO agent.daemon: 3600a: reconcile for mpath-ready
2026-12-06 21:19:46,563 INFO agent.orchestrator: 3600b: reconciled in 4.00 s (discover 2.00, fetch 1.00, kernel 1.00)
2026-12-06 21:20:46,563 INFO agent.orchestrator: 3600a: reconciled in 2.00 s (discover 1.00, fetch 0.50, kernel 0.50)
2026-12-06 21:21:04,924 WARNING agent.kernel.dm_udev_sync: udev cookie 0x40d76f: udev did not complete within 30.0 s
"""


def test_reconcile_profile_from_the_daemons_log_names_the_storms_limit() -> None:
    p = scale_lib.reconcile_profile(DAEMON_LOG)
    assert p["reconciles"] == 3 and p["luns"] == 2 and p["udev_timeouts"] == 1
    assert p["median_s"] == {"total": 4.0, "discover": 2.0, "fetch": 1.0, "kernel": 1.0}
    assert p["sum_s"]["total"] == 20.0 and p["sum_s"]["discover"] == 12.0
    assert scale_lib.reconcile_profile("no such lines\n") == {}
    late = {**STORM, "max_parallel_luns": 8, "reconcile_profile": p,
            "storm": {**STORM["storm"], "tail_fraction": 0.3}}
    tail = scale_lib.build_rows({"many_luns": late})[3]
    assert tail.met == "no"
    assert ("limited by the reconciles themselves: 3 for 2 LUNs" in tail.note
            and "median reconcile 4.0 s (discover 2.0, fetch 1.0, kernel 1.0)" in tail.note
            and "of their sum discover 60 %, fetch 22 %, kernel 18 %." in tail.note
            and "1 waits of 30 s for a new top device ran out" in tail.note)
    met = scale_lib.build_rows({"many_luns": {**late, "storm": {**STORM["storm"], "tail_fraction": 0.1}}})[3]
    assert met.met == "yes" and "limited" not in met.note
