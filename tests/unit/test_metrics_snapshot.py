"""The metrics plumbing: exit counters from events, snapshots built only on the kernel's loop."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from protocols import messages as m
from microkernel.config_observability import MetricsSettings
from microkernel.metrics.server import SnapshotCollector
from microkernel.metrics.snapshot import ExitCounters, Family, Snapshot
from microkernel.supervisor.reasons import ExitReason


def exited(service: str, kind: str, will_restart: bool) -> m.ServiceExited:
    reason = ExitReason(kind=kind, signal=9 if kind == "signal" else None, code=1 if kind == "exit" else None)
    return m.ServiceExited(service=service, replica=0, incarnation=1, pid=1, reason=reason.to_wire(), uptime_s=1.0,
                           will_restart=will_restart)


def test_exit_counters_count_exits_and_restarts_by_service_and_reason() -> None:
    counters = ExitCounters()
    for event in (exited("a", "signal", True), exited("a", "signal", True), exited("a", "stopped", False),
                  exited("b", "heartbeat", True), m.ServiceStopped(service="a")):
        counters(event)
    assert counters.restarts == {("a", "signal"): 2, ("b", "heartbeat"): 1}
    assert counters.exits == {("a", "signal"): 2, ("a", "stopped"): 1, ("b", "heartbeat"): 1}


@pytest.fixture
def loop_thread() -> Iterator[tuple[asyncio.AbstractEventLoop, threading.Thread]]:
    """An event loop running in a thread of its own, like the kernel's."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop, thread
    if loop.is_running():
        loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    loop.close()


def parse(registry: CollectorRegistry) -> dict[str, float]:
    text = generate_latest(registry).decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_snapshots_are_built_on_the_loop_thread_and_fresh_for_each_scrape(loop_thread) -> None:
    loop, thread = loop_thread
    builders: list[int] = []

    def build() -> Snapshot:
        builders.append(threading.get_ident())
        fam = Family(name="builds", kind="counter", help="snapshots built", samples=(((), float(len(builders))),))
        return Snapshot(taken=time.monotonic(), families=(fam,))

    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(loop, build))
    assert parse(registry)["microkernel_builds_total"] == 1.0
    assert parse(registry)["microkernel_builds_total"] == 2.0
    assert builders == [thread.ident, thread.ident]


def test_a_busy_or_closed_loop_gets_the_previous_snapshot_not_a_hang(loop_thread) -> None:
    loop, thread = loop_thread
    calls = 0

    def build() -> Snapshot:
        nonlocal calls
        calls += 1
        fam = Family(name="value", kind="gauge", help="which snapshot", samples=(((), float(calls)),))
        return Snapshot(taken=time.monotonic(), families=(fam,))

    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(loop, build))
    assert parse(registry)["microkernel_value"] == 1.0
    release = threading.Event()
    loop.call_soon_threadsafe(release.wait, 30)  # the loop is stuck in a callback
    stale = parse(registry)
    release.set()
    assert stale["microkernel_value"] == 1.0 and stale["microkernel_metrics_snapshot_age_seconds"] > 0
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert parse(registry)["microkernel_value"] >= 1.0


def test_metrics_settings_know_loopback_addresses() -> None:
    assert MetricsSettings().loopback and MetricsSettings(address="::1").loopback
    assert MetricsSettings(address="localhost").loopback
    assert not MetricsSettings(address="0.0.0.0").loopback and not MetricsSettings(address="10.1.2.3").loopback
    assert MetricsSettings(address="::1", port=9100).url == "http://[::1]:9100/metrics"
