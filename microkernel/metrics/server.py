"""The Prometheus text endpoint: prometheus-client's HTTP server in its own thread.

The server thread never touches the kernel. On a scrape it asks the kernel's loop for a fresh
:class:`~microkernel.metrics.snapshot.Snapshot` (``loop.call_soon_threadsafe``) and waits for it
at most :data:`SNAPSHOT_WAIT_S`; if the loop is too busy to answer in time it serves the previous
snapshot (its age is itself a metric). Concurrent scrapes share one snapshot: a scrape that had to
wait for another one's snapshot uses it, so a burst of scrapers costs the loop one snapshot each
round, not one each.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Final

from prometheus_client import ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from microkernel.config_observability import MetricsSettings
from microkernel.metrics.snapshot import PREFIX, ExitCounters, Snapshot, take_snapshot

__all__ = ["MetricsServer", "SnapshotCollector"]

log = logging.getLogger("microkernel.metrics")

SNAPSHOT_WAIT_S: Final = 2.0
_CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")


class SnapshotCollector(Collector):
    """A prometheus-client collector that serves snapshots built on the kernel's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, build: Callable[[], Snapshot]) -> None:
        self._loop = loop
        self._build = build
        self._snapshot: Snapshot | None = None
        self._lock = threading.Lock()  # one scrape at a time asks the loop

    def publish(self) -> None:
        """Build a snapshot now (on the loop)."""
        try:
            self._snapshot = self._build()
        except Exception:  # a bug here must not take the loop down, only this scrape's freshness
            log.exception("building the metrics snapshot failed")

    def _on_loop(self, done: threading.Event) -> None:
        self.publish()
        done.set()

    def _fresh(self) -> Snapshot | None:
        asked = time.monotonic()
        with self._lock:
            current = self._snapshot
            if current is not None and current.taken >= asked:
                return current  # built for a scrape that came in meanwhile: as fresh as ours would be
            done = threading.Event()
            try:
                self._loop.call_soon_threadsafe(self._on_loop, done)
            except RuntimeError:  # the loop is closed: the kernel is going away
                return current
            done.wait(SNAPSHOT_WAIT_S)
            return self._snapshot

    def collect(self) -> Iterator[Metric]:
        snapshot = self._fresh()
        if snapshot is None:
            return
        age = GaugeMetricFamily(PREFIX + "metrics_snapshot_age_seconds",
                                "How old the figures of this scrape are (large: the kernel's loop was busy).")
        age.add_metric([], max(0.0, time.monotonic() - snapshot.taken))
        yield age
        yield _cpu_seconds(snapshot)
        for family in snapshot.families:
            name = PREFIX + family.name
            metric: Any
            if family.kind == "counter":
                metric = CounterMetricFamily(name, family.help, labels=list(family.labels))
            else:
                metric = GaugeMetricFamily(name, family.help, labels=list(family.labels))
            for labels, value in family.samples:
                metric.add_metric(list(labels), value)
            yield metric


def _cpu_seconds(snapshot: Snapshot) -> Metric:
    """CPU time of each live replica's process and its reaped children, read from /proc here (in
    the HTTP thread, never on the loop). Restarts reset it, as counters of a new process do."""
    metric = CounterMetricFamily(PREFIX + "replica_cpu_seconds",
                                 "CPU seconds (user + system) of a replica's process and the children it waited for.",
                                 labels=["service", "replica"])
    for labels, pid in snapshot.pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            fields = stat[stat.rindex(b")") + 2 :].split()
            ticks = sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime
        except (OSError, ValueError, IndexError):
            continue  # exited since the snapshot
        metric.add_metric(list(labels), ticks / _CLOCK_TICKS)
    return metric


class MetricsServer:
    """Serves ``/metrics`` on ``settings.address:settings.port`` while the kernel runs."""

    def __init__(self, settings: MetricsSettings, kernel: Any) -> None:
        self.settings = settings
        self.kernel = kernel
        self.exits = ExitCounters()
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and start serving (call on the kernel's loop). ``OSError`` if the port cannot be bound."""
        loop = asyncio.get_running_loop()
        self.kernel.bus.observers.append(self.exits)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(SnapshotCollector(loop, lambda: take_snapshot(self.kernel, self.exits)))
        # The daemon's own process_cpu_seconds_total, process_resident_memory_bytes, open fds, ...
        ProcessCollector(namespace="microkernel", registry=registry)
        if not self.settings.loopback:
            log.warning("metrics endpoint bound to non-loopback address %s: anyone who can reach it sees service "
                        "names, states and resource use (no authentication)", self.settings.address)
        self._server, self._thread = start_http_server(self.settings.port, addr=self.settings.address, registry=registry)
        self._thread.name = "mk-metrics"
        log.info("metrics at %s", self.settings.url)

    def stop(self) -> None:
        """Stop serving and release the port (blocks briefly: the server thread finishes its request)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        if self.exits in self.kernel.bus.observers:
            self.kernel.bus.observers.remove(self.exits)
