"""The agent's metrics through Debian's node_exporter, its own endpoint, and `show --map` in tmux.

Runs inside the VM rig with the array logged in:

    python -m tests.vm.run --members 3 -- python -m pytest -q -s tests/guest/test_metrics.py

The tests run in file order and share one daemon (poll interval 2 s), one
node_exporter (textfile collector only) and one LUN.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.guest.agentlib import (CONFIG, RESULTS, AgentDaemon, array, remove_our_devices,
                                  skip_unless_emulated_array_rig, status, wait_for)

pytestmark = pytest.mark.guest

REPO = Path(__file__).resolve().parents[2]
POLL_INTERVAL_S = 2.0
TEXTFILE_DIR = Path("/tmp/switch-agent-test/node-exporter")
EXPORTER = "127.0.0.1:9100"
AGENT_ENDPOINT = "127.0.0.1:9776"
SERIES = ("switch_agent_lun_routed", "switch_agent_map_generation", "switch_agent_map_age_seconds",
          "switch_agent_member_pages", "switch_agent_member_paths", "switch_agent_reconciles_total",
          "switch_agent_map_fetch_seconds", "switch_agent_upload_bytes_total", "switch_agent_poll_interval_seconds")
APPLY_SLACK_S = 30.0
"""A reconcile's own time under TCG (fetch, messages, udev), on top of the poll interval."""


def scrape(address: str) -> dict[str, list]:
    """Sample name -> samples, from an HTTP /metrics parsed by prometheus_client's parser."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as answer:
        text = answer.read().decode()
    found: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append(sample)
    return found


def pages_by_member(found: dict, wwid: str) -> dict[str, int]:
    return {s.labels["member"]: int(s.value) for s in found.get("switch_agent_member_pages", [])
            if s.labels["wwid"] == wwid}


def arrays_pages() -> dict[str, int]:
    return {m["name"]: m["pages"] for m in array("info")["members"]}


def answers(address: str) -> bool:
    try:
        scrape(address)
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def exporter():
    skip_unless_emulated_array_rig()
    binary = shutil.which("prometheus-node-exporter")
    assert binary, "prometheus-node-exporter is not installed (sh tests/vm/setup.sh installs it)"
    TEXTFILE_DIR.mkdir(parents=True, exist_ok=True)
    log = open(RESULTS / "node-exporter.log", "a")
    proc = subprocess.Popen([binary, f"--web.listen-address={EXPORTER}", "--collector.disable-defaults",
                             "--collector.textfile", f"--collector.textfile.directory={TEXTFILE_DIR}"],
                            stdout=log, stderr=subprocess.STDOUT)
    wait_for(lambda: answers(EXPORTER) or proc.poll() is not None, 60, "node_exporter to answer")
    assert proc.poll() is None, (RESULTS / "node-exporter.log").read_text()[-2000:]
    yield proc
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def routed(exporter) -> dict:
    agent = AgentDaemon(poll_interval_s=POLL_INTERVAL_S, extra_config=(
        f'metrics_textfile = "{TEXTFILE_DIR}/switch-agent.prom"\nmetrics_listen = "{AGENT_ENDPOINT}"\n'))
    try:
        members = len(array("info")["members"])
        yield wait_for(lambda: next((s for s in status() if s["state"] == "routed"
                                     and len(s["members"]) == members), None), 120, "the LUN to be routed")
    finally:
        assert agent.stop() == 0
        remove_our_devices()  # so the rig can flush multipath and log out


def test_node_exporter_shows_the_series_with_the_arrays_counts(routed):
    wwid = routed["wwid"]
    wanted = arrays_pages()
    found = wait_for(lambda: (f := scrape(EXPORTER)) and pages_by_member(f, wwid) == wanted and f, 30,
                     f"node_exporter's switch_agent_member_pages to be {wanted}")
    missing = [name for name in SERIES if not any(s.labels.get("wwid", wwid) == wwid for s in found.get(name, []))]
    assert not missing, f"series missing from node_exporter's /metrics: {missing}"

    def one(name: str, **labels: str) -> float:
        (sample,) = [s for s in found[name] if s.labels.get("wwid") == wwid
                     and all(s.labels.get(k) == v for k, v in labels.items())]
        return sample.value

    info = array("info")
    assert one("switch_agent_lun_routed") == 1
    assert one("switch_agent_map_generation") == info["generation"]
    assert one("switch_agent_map_age_seconds") < 10 * POLL_INTERVAL_S
    assert one("switch_agent_reconciles_total", result="ok") >= 1
    # The daemon's own count (0 is right where the array's layout is the switch's round-robin default).
    assert one("switch_agent_upload_bytes_total") == status()[0]["message_bytes_sent"]
    for member in routed["members"]:
        assert one("switch_agent_member_paths", member=member["name"], state="active") == len(member["paths"]) > 0
    # The textfile collector read our file without error, under the name the alert rules match.
    (mtime,) = [s for s in found["node_textfile_mtime_seconds"] if "switch-agent" in s.labels["file"]]
    assert re.fullmatch(r"(.*/)?switch-agent\.prom", mtime.labels["file"])
    assert [s.value for s in found["node_textfile_scrape_error"]] == [0]


def test_after_a_move_the_new_counts_arrive_within_a_poll_interval(routed):
    wwid = routed["wwid"]
    before = arrays_pages()
    moved = array("move", fraction=0.3)
    started = time.monotonic()
    wanted = arrays_pages()
    assert wanted != before and moved["moved_pages"] > 0
    wait_for(lambda: pages_by_member(scrape(EXPORTER), wwid) == wanted, POLL_INTERVAL_S + APPLY_SLACK_S,
             f"node_exporter's switch_agent_member_pages to become {wanted}")
    elapsed = time.monotonic() - started
    print(f"\nnew page counts in node_exporter's /metrics {elapsed:.1f} s after the move "
          f"(poll interval {POLL_INTERVAL_S} s)")
    (RESULTS / "metrics-move-seconds.txt").write_text(f"{elapsed:.2f}\n")
    found = scrape(EXPORTER)
    assert [s.value for s in found["switch_agent_map_generation"] if s.labels["wwid"] == wwid] \
        == [moved["generation"]]
    # The moved pages' regions went to the switch.
    assert [s.value for s in found["switch_agent_upload_bytes_total"] if s.labels["wwid"] == wwid] \
        == [status()[0]["message_bytes_sent"]] != [0]


def test_the_agents_own_endpoint_serves_the_same_values(routed):
    wwid = routed["wwid"]
    exporter, own = scrape(EXPORTER), scrape(AGENT_ENDPOINT)
    assert pages_by_member(own, wwid) == pages_by_member(exporter, wwid) == arrays_pages()
    for name in ("switch_agent_map_generation", "switch_agent_lun_routed", "switch_agent_member_paths"):
        assert sorted((tuple(sorted(s.labels.items())), s.value) for s in own[name]) \
            == sorted((tuple(sorted(s.labels.items())), s.value) for s in exporter[name]), name


def test_show_map_in_tmux(routed):
    """A person's view: the command in a terminal (tmux), its screen read back with capture-pane."""
    tmux = ["tmux", "-L", "switch-agent-test"]
    command = f"{sys.executable} -m agent.cli --config {CONFIG} show {routed['wwid']} --map; echo END-OF-MAP; sleep 300"
    subprocess.run([*tmux, "kill-server"], capture_output=True)
    subprocess.run([*tmux, "new-session", "-d", "-x", "100", "-y", "30", "-c", str(REPO), "env", "-u", "NO_COLOR",
                    "sh", "-c", command], check=True)
    try:
        screen = wait_for(lambda: finished(capture(tmux)), 120, "`show --map` to finish in tmux")
        coloured = capture(tmux, "-e")
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
    (RESULTS / "show-map-screen.txt").write_text(screen)
    lines = screen.splitlines()
    info = array("info")
    assert lines[0].startswith(routed["wwid"])
    assert f"map generation {info['generation']}: {info['total_pages']} pages" in lines[1]
    rows = [line for line in lines[2:] if line and re.fullmatch(r"[A-Ca-c.]+", line)]
    # Cells: one page each (the volume fits 99 x 18 cells), all rows but the last full width.
    assert sum(len(row) for row in rows) == info["total_pages"]
    assert all(len(row) == 99 for row in rows[:-1])
    for letter, member in zip("ABC", info["members"]):
        legend = next((line for line in lines if re.match(rf"^ {letter}  {member['name']} ", line)), None)
        assert legend, f"no legend line for {member['name']}:\n{screen}"
        assert f"{member['pages']} pages" in legend and "paths up" in legend
    # The earlier move's pages are marked (lower case) and the legend says from which generation.
    assert any(c.islower() for row in rows for c in row)
    assert re.search(r"moved from generation \d+ to " + str(info["generation"]), screen)
    # On a terminal, in colour: tmux shows the cells' SGR attributes with -e.
    coloured_rows = [line for line in coloured.splitlines() if "\x1b[" in line]
    assert len(coloured_rows) >= len(rows), coloured


def capture(tmux: list[str], *flags: str) -> str:
    return subprocess.run([*tmux, "capture-pane", "-p", *flags, "-t", "0"], capture_output=True, text=True,
                          check=False).stdout


def finished(screen: str) -> str | None:
    return screen if "END-OF-MAP" in screen else None
