"""The Prometheus endpoint end to end: off by default; when on, its figures follow reality.

Scrapes go through urllib and the text format is parsed with prometheus-client's own parser.
Every wait is on a kernel event or a reply, with a generous ceiling.
"""

from __future__ import annotations

import os
import signal
import urllib.request

import psutil
from prometheus_client.parser import text_string_to_metric_families

from microkernel.client import Client
from microkernel.supervisor.distributed import free_port
from tests.integration.conftest import start_kernel
from tests.integration.test_supervisor import CEILING, is_event, wait_event

ECHO = """
[services.echo]
entry = "tests.fixtures.echo:Echo"
backoff = { initial = "0s" }
memory = { soft = "1KiB" }
"""

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=CEILING) as response:
        assert response.status == 200
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def listening_ports(pid: int) -> list[int]:
    return [conn.laddr.port for conn in psutil.Process(pid).net_connections(kind="inet")
            if conn.status == psutil.CONN_LISTEN]


def test_metrics_are_off_by_default_nothing_listens(short_tmp: str) -> None:
    with start_kernel(ECHO, short_tmp) as k, Client(runtime_dir=k.runtime_dir, timeout=CEILING) as c:
        c.wait_ready("echo", timeout=CEILING)
        assert listening_ports(k.proc.pid) == []


def test_metrics_follow_states_restarts_scaling_and_resources(short_tmp: str) -> None:
    port = free_port()
    config = f"[metrics]\nenabled = true\nport = {port}\n" + ECHO
    with start_kernel(config, short_tmp) as k, Client(runtime_dir=k.runtime_dir, timeout=CEILING) as c:
        c.wait_ready("echo", timeout=CEILING)
        assert listening_ports(k.proc.pid) == [port]
        s = scrape(port)
        assert value(s, "microkernel_replica_state", service="echo", replica="0", state="ready") == 1.0
        assert value(s, "microkernel_replica_state", service="echo", replica="0", state="stopped") == 0.0
        assert value(s, "microkernel_service_replicas_desired", service="echo") == 1.0
        assert value(s, "microkernel_service_replicas_up", service="echo") == 1.0
        assert value(s, "microkernel_restarts_total", service="echo", reason="signal") == 0.0
        assert value(s, "microkernel_uptime_seconds") > 0
        requests_before = value(s, "microkernel_control_requests_total")
        assert requests_before is not None and requests_before > 0

        pid = c.call("echo", "origin", names=[])["pid"]
        with c.events("service.*") as stream:
            os.kill(pid, signal.SIGKILL)
            wait_event(stream, is_event("service.ready", "echo", incarnation=2))
        s = scrape(port)
        assert value(s, "microkernel_restarts_total", service="echo", reason="signal") == 1.0
        assert value(s, "microkernel_replica_exits_total", service="echo", reason="signal") == 1.0
        assert value(s, "microkernel_restarts_total", service="echo", reason="exit") == 0.0
        assert value(s, "microkernel_events_published_total", topic="service.exited") == 1.0
        assert value(s, "microkernel_control_requests_total") > requests_before

        c.scale("echo", 2)
        s = scrape(port)
        assert value(s, "microkernel_service_replicas_desired", service="echo") == 2.0
        assert value(s, "microkernel_service_replicas_up", service="echo") == 2.0
        assert value(s, "microkernel_replica_state", service="echo", replica="1", state="ready") == 1.0

        # Resource figures are the sampler's. The soft budget of 1 KiB makes the kernel announce its
        # first sample of each replica (budget.exceeded), so there is an event to wait for.
        with c.events("budget.*", since_seq=0) as stream:
            sampled = wait_event(stream, is_event("budget.exceeded", "echo", replica=0, incarnation=2)).message
        s = scrape(port)
        rss = value(s, "microkernel_replica_rss_bytes", service="echo", replica="0")
        # Sampled every 250 ms (the replica has a budget): close to what the OS says right now.
        now = psutil.Process(sampled.pid).memory_info().rss
        assert rss is not None and now / 2 <= rss <= now * 2
        assert value(s, "microkernel_replica_threads", service="echo", replica="0") >= 1
        cpu = value(s, "microkernel_replica_cpu_seconds_total", service="echo", replica="0")
        own = psutil.Process(sampled.pid).cpu_times()
        assert cpu is not None and 0 < cpu <= own.user + own.system + own.children_user + own.children_system + 0.05
        daemon_rss = value(s, "microkernel_process_resident_memory_bytes")
        assert daemon_rss is not None and daemon_rss > 0
        log_lines = value(s, "microkernel_log_lines_total", service="echo", stream="err")
        assert log_lines is not None and log_lines > 0  # the replicas' start-up log lines

    assert k.proc.returncode is not None
