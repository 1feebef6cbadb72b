"""Prometheus metrics over the fake kernel: the values agree with the emulated array and the LunStates."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import time
import urllib.request

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.config import Config, ConfigError, config_from_mapping
from agent.daemon import Daemon
from agent.lun import LunState, State
from agent import metrics as metrics_module
from agent.metrics import LABEL_MAX_CHARS, Metrics, MetricsEndpointError, label, write_atomically
from agent.orchestrator import Orchestrator
from protocol.errors import SwitchAgentError
from tests.unit.fakes_kernel import FakeSystem, ManyLunSystem
from tests.unit.test_daemon import PollGate, config, round_driver, until

OFF = Config(max_message_bytes=4096, metrics_textfile="")


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def samples(text: str | bytes) -> dict[tuple[str, frozenset], float]:
    """(sample name, labels) -> value, parsed back by the library's own parser."""
    text = text.decode() if isinstance(text, bytes) else text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict, series: str, /, **labels: str) -> float:
    return found[(series, frozenset(labels.items()))]


def scrape(orch: Orchestrator, metrics: Metrics | None = None) -> dict:
    metrics = metrics or Metrics(OFF, lambda: orch.luns.values(), orch.clock)
    return samples(generate_latest(metrics.registry))


def member_pages(found: dict, wwid: str) -> dict[str, float]:
    return {dict(key)["member"]: v for (name, key), v in found.items()
            if name == "switch_agent_member_pages" and dict(key)["wwid"] == wwid}


def test_routed_lun_series_equal_the_arrays_counts(tmp_path):
    system = FakeSystem(tmp_path=tmp_path / "store", layout="random")
    orch = Orchestrator(OFF, system)
    lun = asyncio.run(orch.reconcile(system.wwid))
    metrics = Metrics(OFF, lambda: orch.luns.values(), orch.clock)
    found = scrape(orch, metrics)
    wwid = system.wwid
    described = system.volume.describe()
    assert member_pages(found, wwid) == {m["name"]: m["pages"] for m in described["members"]}
    assert value(found, "switch_agent_lun_routed", wwid=wwid, name=lun.topology.mpath_name) == 1
    assert value(found, "switch_agent_map_generation", wwid=wwid) == described["generation"]
    assert value(found, "switch_agent_reconciles_total", wwid=wwid, result="ok") == 1
    assert value(found, "switch_agent_reconciles_total", wwid=wwid, result="error") == 0
    assert value(found, "switch_agent_upload_bytes_total", wwid=wwid) == lun.message_bytes_sent > 0
    assert value(found, "switch_agent_map_fetch_seconds", wwid=wwid) == lun.last_reconcile["fetch_s"]
    assert value(found, "switch_agent_poll_interval_seconds") == OFF.poll_interval_s
    for member in described["members"]:
        assert value(found, "switch_agent_member_paths", wwid=wwid, member=member["name"], state="active") == 2
        assert value(found, "switch_agent_member_paths", wwid=wwid, member=member["name"], state="failed") == 0

    # Pages move: the next reconcile's counts are the array's new ones, and the upload grew.
    system.volume.move_pages(0.3)
    asyncio.run(orch.reconcile(wwid))
    moved = scrape(orch, metrics)  # the same collector: its counts follow the new map
    described = system.volume.describe()
    assert member_pages(moved, wwid) == {m["name"]: m["pages"] for m in described["members"]}
    assert member_pages(moved, wwid) != member_pages(found, wwid)
    assert value(moved, "switch_agent_map_generation", wwid=wwid) == described["generation"]
    assert value(moved, "switch_agent_reconciles_total", wwid=wwid, result="ok") == 2
    assert value(moved, "switch_agent_upload_bytes_total", wwid=wwid) > value(found, "switch_agent_upload_bytes_total",
                                                                              wwid=wwid)


def test_failures_count_by_kind_and_an_unrouted_lun_shows_0(tmp_path):
    system = FakeSystem(tmp_path=tmp_path / "store", page_size_bytes=16 * 1024 * 1024)
    orch = Orchestrator(Config(max_message_bytes=4096, fetch_restarts=0, metrics_textfile=""), system)
    system.volume.corrupt_next_map("bad-crc", count=2)
    for _ in range(2):
        with pytest.raises(SwitchAgentError) as failure:
            asyncio.run(orch.reconcile(system.wwid))
    found = scrape(orch)
    wwid = system.wwid
    kind = type(failure.value).__name__
    assert value(found, "switch_agent_lun_routed", wwid=wwid, name=orch.luns[wwid].topology.mpath_name) == 0
    assert value(found, "switch_agent_reconciles_total", wwid=wwid, result="error") == 2
    assert value(found, "switch_agent_errors_total", wwid=wwid, kind=kind) == 2
    # Nothing routed: no map, so no generation, age or pages.
    assert not [key for key in found if key[0] in ("switch_agent_map_generation", "switch_agent_member_pages")]
    asyncio.run(orch.reconcile(wwid))
    found = scrape(orch)
    assert value(found, "switch_agent_lun_routed", wwid=wwid, name=orch.luns[wwid].topology.mpath_name) == 1
    assert value(found, "switch_agent_errors_total", wwid=wwid, kind=kind) == 2  # a counter: kept


def test_a_member_whose_path_does_not_answer_has_no_active_path(tmp_path):
    system = FakeSystem(tmp_path=tmp_path / "store", members=3, paths_per_member=1)
    system.paths["sdc"].broken = True  # member 1's only path
    orch = Orchestrator(OFF, system)
    lun = asyncio.run(orch.reconcile(system.wwid))
    found = scrape(orch)
    names = [m.name for m in lun.stack.page_map.members]
    active = [value(found, "switch_agent_member_paths", wwid=system.wwid, member=n, state="active") for n in names]
    assert active == [1, 0, 1]


def test_map_age_counts_from_the_last_confirmation(tmp_path):
    system = FakeSystem(tmp_path=tmp_path / "store")
    clock = Clock()
    orch = Orchestrator(OFF, system, clock=clock)
    lun = asyncio.run(orch.reconcile(system.wwid))
    clock.now += 42.5
    assert value(scrape(orch), "switch_agent_map_age_seconds", wwid=system.wwid) == 42.5
    lun.map_confirmed_at = clock.now - 3  # what a poll round that found the same generation does
    assert value(scrape(orch), "switch_agent_map_age_seconds", wwid=system.wwid) == 3


def test_label_values_are_capped_and_escaped_by_the_library():
    long_wwid = "3" + "a" * 300
    lun = LunState(long_wwid, state=State.ERROR, errors={'Odd"Kind\\\n': 1})
    metrics = Metrics(OFF, lambda: [lun], lambda: 0.0)
    text = generate_latest(metrics.registry).decode()
    found = samples(text)
    capped = label(long_wwid)
    assert len(capped) == LABEL_MAX_CHARS and capped.endswith("...") and long_wwid.startswith(capped[:-3])
    assert value(found, "switch_agent_errors_total", wwid=capped, kind='Odd"Kind\\\n') == 1
    assert long_wwid not in text and '\\"' in text and "\\n" in text


def test_the_textfile_is_replaced_whole_readable_by_all_and_only_where_its_directory_is(tmp_path):
    system = FakeSystem(tmp_path=tmp_path / "store")
    orch = Orchestrator(OFF, system)
    asyncio.run(orch.reconcile(system.wwid))
    path = tmp_path / "textfile" / "switch-agent.prom"
    metrics = Metrics(Config(metrics_textfile=str(path)), lambda: orch.luns.values(), orch.clock)
    assert metrics.write() is False and not path.parent.exists()  # no node_exporter directory: nothing made
    path.parent.mkdir()
    old_umask = os.umask(0o077)
    try:
        assert metrics.write() is True
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert member_pages(samples(path.read_text()), system.wwid)
    assert os.listdir(path.parent) == [path.name]
    assert Metrics(Config(metrics_textfile=""), lambda: [], orch.clock).write() is False


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "switch-agent.prom"
    write_atomically(path, b"old\n")
    blocker = tmp_path / "blocked.prom"
    blocker.mkdir()  # rename over a directory fails
    with pytest.raises(OSError):
        write_atomically(blocker, b"new\n")
    assert sorted(os.listdir(tmp_path)) == ["blocked.prom", "switch-agent.prom"] and path.read_text() == "old\n"
    metrics = Metrics(Config(metrics_textfile=str(blocker)), lambda: [], lambda: 0.0)
    assert metrics.write() is False  # logged, not raised: the daemon goes on


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_endpoint_serves_the_same_values_computed_on_the_event_loop(tmp_path):
    system = FakeSystem(tmp_path=tmp_path / "store", layout="random")
    orch = Orchestrator(OFF, system, clock=Clock())
    address = f"127.0.0.1:{free_port()}"
    metrics = Metrics(Config(metrics_textfile="", metrics_listen=address), lambda: orch.luns.values(), orch.clock)

    async def main() -> tuple[bytes, bytes]:
        await orch.reconcile(system.wwid)
        metrics.start_endpoint()
        try:
            # The scrape's thread waits for this loop to compute the values: it must stay free meanwhile.
            # No proxy: the Debian build exports http_proxy=http://127.0.0.1:9/ to keep tests off the network.
            direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            served = await asyncio.to_thread(lambda: direct.open(f"http://{address}/metrics", timeout=10).read())
        finally:
            await metrics.close()
        return served, generate_latest(metrics.registry)

    served, local = asyncio.run(main())
    assert samples(served) == samples(local)
    assert member_pages(samples(served), system.wwid)
    with socket.socket() as again:  # stopped: nothing listens there any more (the scrape's TIME_WAIT may stay)
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", int(address.rsplit(":", 1)[1])))


def test_a_daemon_whose_endpoint_cannot_listen_routes_all_the_same(tmp_path, caplog):
    system = FakeSystem(tmp_path=tmp_path / "store")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        cfg = config(tmp_path, metrics_listen=address)

        async def main():
            daemon = Daemon(cfg, system, None)
            task = asyncio.create_task(daemon.run())
            await until(lambda: system.wwid in daemon.orchestrator.luns
                        and daemon.orchestrator.luns[system.wwid].state == "routed")
            daemon.stop()
            await task

        asyncio.run(main())
    assert any(isinstance(r.msg, MetricsEndpointError) or "metrics endpoint" in r.getMessage()
               for r in caplog.records if r.levelname == "ERROR")


def test_the_daemon_rewrites_the_textfile_after_reconciles_and_each_poll_round(tmp_path):
    system = ManyLunSystem(2, tmp_path=tmp_path, members=3, paths_per_member=1)
    path = tmp_path / "textfile" / "switch-agent.prom"
    path.parent.mkdir()
    cfg = config(tmp_path, poll_interval_s=1000, metrics_textfile=str(path))
    gate = PollGate(1000)

    async def main():
        daemon = Daemon(cfg, system, None, sleep=gate.sleep)
        task = asyncio.create_task(daemon.run())
        luns = daemon.orchestrator.luns
        settled, poll_round = round_driver(daemon, gate, system.dm)
        await until(lambda: len(luns) == 2 and settled(0))
        # Written after the reconciles, before any poll round.
        await until(lambda: path.exists() and routed_in(path) == sorted(luns))
        confirmed = {wwid: lun.map_confirmed_at for wwid, lun in luns.items()}
        path.unlink()
        await poll_round(1)
        # The round found every generation unchanged: each map is confirmed anew, and the file is back.
        assert all(lun.map_confirmed_at > confirmed[wwid] for wwid, lun in luns.items())
        assert path.exists()
        daemon.stop()
        await task

    asyncio.run(main())


def routed_in(path) -> list[str]:
    return sorted(dict(k)["wwid"] for (n, k), v in samples(path.read_text()).items()
                  if n == "switch_agent_lun_routed" and v == 1)


def test_writes_after_reconciles_are_at_most_one_a_second(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics_module, "WRITE_EVERY_S", 0.3)
    path = tmp_path / "switch-agent.prom"
    lun = LunState("3600a", state=State.ERROR)
    metrics = Metrics(Config(metrics_textfile=str(path)), lambda: [lun], time.monotonic)

    async def main() -> float:
        for _ in range(5):  # five reconciles end at once: one write
            metrics.write_soon()
        await until(lambda: path.exists())
        written = time.monotonic()
        lun.state = State.ROUTED
        metrics.write_soon()
        for _ in range(10):
            await asyncio.sleep(0)
        assert routed_in(path) == []  # too soon after the last write: the next one waits
        await until(lambda: routed_in(path) == ["3600a"])
        return time.monotonic() - written

    assert asyncio.run(main()) >= 0.3 * 0.9


@pytest.mark.parametrize("key, text", [
    ("metrics_textfile", "relative/switch-agent.prom"),
    ("metrics_textfile", "/var/lib/prometheus/node-exporter/switch-agent.txt"),
    ("metrics_listen", "9776"),
    ("metrics_listen", ":9776"),
    ("metrics_listen", "::1:9776"),
    ("metrics_listen", "127.0.0.1:0"),
    ("metrics_listen", "127.0.0.1:65536"),
    ("metrics_listen", "127.0.0.1:97x6"),
])
def test_bad_metrics_keys_are_refused_with_their_name(key, text):
    with pytest.raises(ConfigError) as refused:
        config_from_mapping({key: text})
    assert refused.value.key == key


def test_metrics_keys_defaults_and_good_values():
    assert Config().metrics_textfile == "/var/lib/prometheus/node-exporter/switch-agent.prom"
    assert Config().metrics_listen == ""
    good = config_from_mapping({"metrics_textfile": "", "metrics_listen": "[::1]:9776"})
    assert good.metrics_textfile == "" and good.metrics_listen == "[::1]:9776"
    assert config_from_mapping({"metrics_listen": "localhost:9776"}).metrics_listen == "localhost:9776"
