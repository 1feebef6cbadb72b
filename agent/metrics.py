"""Prometheus metrics: every LUN's routing, map and members, for node_exporter's textfile collector or an endpoint.

The values are computed when collected, from the orchestrator's LunStates:
no metric object is updated as things happen, so nothing here can drift
from what `status` shows. The daemon writes the exposition to
`metrics_textfile` after every reconcile and every poll round (the
convention of smartmon and other host scripts: node_exporter's textfile
collector serves it and adds `node_textfile_mtime_seconds`, which shows a
daemon that stopped writing), and serves it at `metrics_listen` if set.

Series (docs in the HELP texts below; README "Prometheus" for the wiring):

    switch_agent_lun_routed{wwid,name}             switch_agent_member_paths{wwid,member,state}
    switch_agent_map_generation{wwid}              switch_agent_reconciles_total{wwid,result}
    switch_agent_map_age_seconds{wwid}             switch_agent_map_fetch_seconds{wwid}
    switch_agent_member_pages{wwid,member}         switch_agent_upload_bytes_total{wwid}
    switch_agent_errors_total{wwid,kind}            switch_agent_poll_interval_seconds

    switch_agent_member_sessions{wwid,member,state} switch_agent_login_failures_total{wwid,member}
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Callable, Iterable, Iterator
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.config import Config, split_listen_address
from agent.lun import LunState, State
from protocol.pagemap import PageMap
from protocol.errors import SwitchAgentError

LOG = logging.getLogger(__name__)

LABEL_MAX_CHARS = 128
"""Longest label value kept. WWIDs (33 characters for an NAA designator) and member names (28 bytes in
the page map) fit well inside; the cap only keeps a broken array or udev database from putting
kilobytes into every series, every alert and Prometheus' index. Escaping is the library's."""

RESULTS = ("ok", "error")
"""Every LUN shows both, from 0: a counter that first appears at 1 hides that increase from rate()."""

PATH_STATES = ("active", "failed")

SCRAPE_TIMEOUT_S = 10.0
"""Longest an HTTP scrape waits for the event loop to compute the values."""

WRITE_EVERY_S = 1.0
"""Reconciles that end within this long of a write share the next one: with 64 LUNs appearing at
once, a write per reconcile (each over every LUN) would be 4096 LUN collections on the event loop."""


class MetricsEndpointError(SwitchAgentError):
    """The metrics endpoint could not listen: the daemon goes on routing without it."""

    def __init__(self, address: str, reason: str) -> None:
        self.address = address
        self.reason = reason
        super().__init__(f"metrics endpoint {address}: {reason}")


def label(value: str) -> str:
    """A label value from the array or udev, capped at LABEL_MAX_CHARS (the tail marked with "...")."""
    return value if len(value) <= LABEL_MAX_CHARS else value[:LABEL_MAX_CHARS - 3] + "..."


class LunCollector(Collector):
    """The series of every LUN the daemon knows, computed from its LunStates at each collection."""

    def __init__(self, luns: Callable[[], Iterable[LunState]], clock: Callable[[], float],
                 poll_interval_s: float) -> None:
        self._luns = luns
        self._clock = clock
        self._poll_interval_s = poll_interval_s
        self._pages: dict[str, tuple[PageMap, dict[int, int]]] = {}
        """wwid -> (the map, its pages per member id): counted once per map, not at every collection."""

    def collect(self) -> Iterator[Metric]:
        now = self._clock()
        routed = GaugeMetricFamily(
            "switch_agent_lun_routed",
            "1 while the LUN's routed device serves I/O through its dm-switch, 0 while it is not "
            "(not set up yet, failing to set up, or suspended); name is multipathd's map name",
            labels=["wwid", "name"])
        generation = GaugeMetricFamily(
            "switch_agent_map_generation", "Generation of the page map the routed device follows (the array's "
                                           "counter: it moves when pages move or the volume changes)",
            labels=["wwid"])
        age = GaugeMetricFamily(
            "switch_agent_map_age_seconds",
            "Seconds since the array last confirmed the routed map current (a fetch, or a poll that found "
            "the generation unchanged); steady below the poll interval while polls get answers",
            labels=["wwid"])
        pages = GaugeMetricFamily(
            "switch_agent_member_pages", "Pages of the LUN that the array member owns in the routed map",
            labels=["wwid", "member"])
        paths = GaugeMetricFamily(
            "switch_agent_member_paths", "The member's paths (SCSI disks) by state as the last reconcile saw "
                                         "them; no active path means its pages' I/O is forwarded by other members",
            labels=["wwid", "member", "state"])
        reconciles = CounterMetricFamily(
            "switch_agent_reconciles", "Reconciles of the LUN (discover, fetch the map, program the kernel) by "
                                       "result", labels=["wwid", "result"])
        fetch = GaugeMetricFamily(
            "switch_agent_map_fetch_seconds", "Seconds the last successful reconcile spent fetching the map",
            labels=["wwid"])
        upload = CounterMetricFamily(
            "switch_agent_upload_bytes", "Bytes of region mappings sent to the LUN's dm-switch devices",
            labels=["wwid"])
        poll = GaugeMetricFamily(
            "switch_agent_poll_interval_seconds", "Seconds between the daemon's polls of each map generation "
                                                  "(poll_interval_s): the scale of switch_agent_map_age_seconds",
            value=self._poll_interval_s)
        errors = CounterMetricFamily(
            "switch_agent_errors", "Failed reconciles by error type (the log and `switch-agent status` say "
                                   "what failed)", labels=["wwid", "kind"])
        sessions = GaugeMetricFamily(
            "switch_agent_member_sessions",
            "iSCSI sessions to the member kept by the agent: logged_in, failed (iscsid reconnecting) and "
            "want (what the settings and caps give it); only for LUNs whose sessions are managed",
            labels=["wwid", "member", "state"])
        login_failures = CounterMetricFamily(
            "switch_agent_login_failures", "Failed iSCSI logins to the member since the daemon started "
                                           "(`switch-agent status` shows the last error)",
            labels=["wwid", "member"])
        for lun in sorted(self._luns(), key=lambda lun: lun.wwid):
            wwid = label(lun.wwid)
            if lun.sessions is not None and lun.sessions.managed:
                names = {m.member_id: m.name for m in lun.stack.page_map.members} if lun.stack else {}
                for m in lun.sessions.members:
                    who = label(names.get(m.member_id, f"id{m.member_id}"))
                    for state, value in (("logged_in", m.logged_in), ("failed", m.failed), ("want", m.want)):
                        sessions.add_metric([wwid, who, state], value)
                    login_failures.add_metric([wwid, who], m.login_failures)
            routed.add_metric([wwid, label(lun.topology.mpath_name if lun.topology else "")],
                              1 if lun.state == State.ROUTED else 0)
            for result in RESULTS:
                reconciles.add_metric([wwid, result], lun.reconciles.get(result, 0))
            for kind, count in sorted(lun.errors.items()):
                errors.add_metric([wwid, label(kind)], count)
            upload.add_metric([wwid], lun.message_bytes_sent)
            if "fetch_s" in lun.last_reconcile:
                fetch.add_metric([wwid], lun.last_reconcile["fetch_s"])
            stack = lun.stack
            if stack is None:
                continue
            page_map = stack.page_map
            generation.add_metric([wwid], page_map.generation)
            confirmed = lun.map_confirmed_at if lun.map_confirmed_at is not None else stack.fetched_at
            age.add_metric([wwid], round(max(0.0, now - confirmed), 3))
            owned = self._pages_per_member(lun.wwid, page_map)
            for member in page_map.members:
                name = label(member.name)
                pages.add_metric([wwid, name], owned[member.member_id])
                states = [p.usable for p in lun.topology.paths_of_member(member.member_id)] if lun.topology else []
                paths.add_metric([wwid, name, "active"], states.count(True))
                paths.add_metric([wwid, name, "failed"], states.count(False))
        yield from (routed, generation, age, pages, paths, reconciles, fetch, upload, errors, poll, sessions,
                    login_failures)

    def _pages_per_member(self, wwid: str, page_map: PageMap) -> dict[int, int]:
        cached = self._pages.get(wwid)
        if cached is None or cached[0] is not page_map:
            cached = self._pages[wwid] = (page_map, page_map.pages_per_member())
        return cached[1]


class _OnLoop(Collector):
    """A collector read from another thread (the HTTP endpoint's) on the event loop that owns its state."""

    def __init__(self, collector: Collector, loop: asyncio.AbstractEventLoop) -> None:
        self._collector = collector
        self._loop = loop

    def collect(self) -> Iterator[Metric]:
        async def collect() -> list[Metric]:
            return list(self._collector.collect())
        return iter(asyncio.run_coroutine_threadsafe(collect(), self._loop).result(SCRAPE_TIMEOUT_S))


class Metrics:
    """The daemon's metrics: the textfile it rewrites and the endpoint it may serve."""

    def __init__(self, config: Config, luns: Callable[[], Iterable[LunState]], clock: Callable[[], float]) -> None:
        self.collector = LunCollector(luns, clock, config.poll_interval_s)
        self.registry = CollectorRegistry()
        self.registry.register(self.collector)
        self.textfile = Path(config.metrics_textfile) if config.metrics_textfile else None
        self.listen = config.metrics_listen
        self._server: WSGIServer | None = None
        self._missing_dir_logged = False
        self._written_at = float("-inf")
        self._pending: asyncio.TimerHandle | None = None

    def write_soon(self) -> None:
        """Rewrite the textfile at once, or WRITE_EVERY_S after the last write; call from the event loop."""
        if self._pending is None and self.textfile is not None:
            delay = max(0.0, self._written_at + WRITE_EVERY_S - time.monotonic())
            self._pending = asyncio.get_running_loop().call_later(delay, self.write)

    def write(self) -> bool:
        """Rewrite the textfile (atomically) if one is configured and its directory exists; True if written."""
        if self._pending is not None:  # this write includes what the pending one would have written
            self._pending.cancel()
            self._pending = None
        if self.textfile is None:
            return False
        if not self.textfile.parent.is_dir():
            if not self._missing_dir_logged:  # node_exporter not installed: say so once, not every round
                LOG.info("%s does not exist: metrics are not written there", self.textfile.parent)
                self._missing_dir_logged = True
            return False
        self._missing_dir_logged = False
        self._written_at = time.monotonic()
        try:
            write_atomically(self.textfile, generate_latest(self.registry))
        except OSError as exc:
            LOG.warning("cannot write metrics to %s: %s", self.textfile, exc)
            return False
        return True

    def start_endpoint(self) -> None:
        """Serve /metrics at `metrics_listen` (if set) on a thread; call from the daemon's event loop.

        Raises MetricsEndpointError when the address cannot be listened on.
        """
        if not self.listen:
            return
        host, port = split_listen_address(self.listen)
        registry = CollectorRegistry()
        registry.register(_OnLoop(self.collector, asyncio.get_running_loop()))
        server_class = _ThreadingServer6 if ":" in host else _ThreadingServer
        try:
            self._server = make_server(host, port, make_wsgi_app(registry), server_class, _QuietHandler)
        except OSError as exc:
            raise MetricsEndpointError(self.listen, exc.strerror or str(exc)) from exc
        threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True).start()
        LOG.info("metrics served at http://%s/metrics", self.listen)

    async def close(self) -> None:
        """No more writes; stop serving, returning once the server's thread has let go of its socket."""
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        server, self._server = self._server, None
        if server is not None:
            await asyncio.to_thread(server.shutdown)
            server.server_close()


def write_atomically(path: Path, data: bytes) -> None:
    """Write a file whole or not at all: a temporary file beside it, renamed over it.

    node_exporter reads only names ending in .prom, so it never sees the
    temporary file; the file is made readable by all (mode 0644) whatever the
    daemon's umask, as node_exporter runs as its own user.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            os.fchmod(f.fileno(), 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    """One thread per scrape: a slow client does not hold up the next."""

    daemon_threads = True


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    """Requests go to the debug log, not to stderr (journald) once per scrape."""

    def log_message(self, format: str, *args: object) -> None:
        LOG.debug("metrics endpoint: " + format, *args)
