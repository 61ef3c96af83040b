"""Signals: SIGTERM/SIGINT stop services dependents first, within kernel.shutdown_timeout."""

from __future__ import annotations

import signal
from pathlib import Path

import psutil
import pytest

from microkernel.client import Client
from tests.integration.sd_notify import CEILING, run_daemon

# Each service notes its own graceful stop in a shared file: the file's line order is the stop
# order (the kernel stops a service only once its dependents' processes have exited).
def recorder(name: str, file: Path, depends_on: tuple[str, ...] = ()) -> str:
    deps = "depends_on = [" + ", ".join(f'"{d}"' for d in depends_on) + "]\n"
    return (f'[services.{name}]\nentry = "tests.fixtures.stop_recorder:StopRecorder"\n{deps}'
            f'[services.{name}.config]\nfile = "{file}"\nname = "{name}"\n')


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_services_stop_in_reverse_dependency_order(short_tmp: str, signum: int) -> None:
    order = Path(short_tmp) / "order.txt"
    # Declared in an order unlike the dependency order, so config order cannot pass for it.
    config = "\n".join([
        recorder("db", order),
        recorder("web", order, ("api", "cache")),
        recorder("api", order, ("db",)),
        recorder("cache", order, ("db",)),
        recorder("lone", order),
    ])
    with run_daemon(short_tmp, config) as d:
        with Client(runtime_dir=d.runtime_dir) as c:
            assert {s["name"]: s["state"] for s in c.status()["services"]} == dict.fromkeys(
                ["db", "api", "cache", "web", "lone"], "ready")
        d.proc.send_signal(signum)
        assert d.proc.wait(timeout=CEILING) == 0
    stopped = order.read_text().split()
    assert sorted(stopped) == ["api", "cache", "db", "lone", "web"]
    position = {name: i for i, name in enumerate(stopped)}
    assert position["web"] < position["api"] < position["db"]
    assert position["web"] < position["cache"] < position["db"]


def test_shutdown_timeout_bounds_a_stubborn_service(short_tmp: str) -> None:
    # The service ignores SIGTERM and its own grace is longer than the test's ceiling: only the
    # kernel's shutdown deadline can end it in time.
    config = ('[kernel]\nshutdown_timeout = "2s"\n\n'
              '[services.stubborn]\nentry = "tests.fixtures.stubborn:Stubborn"\nstop_timeout = "1h"\n')
    with run_daemon(short_tmp, config) as d:
        with Client(runtime_dir=d.runtime_dir) as c:
            pid = c.status("stubborn")["services"][0]["replicas"][0]["pid"]
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(timeout=CEILING) == 0
    assert "shutdown deadline passed" in d.output.read_text()
    assert gone(pid)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # dead, not reaped yet
    except psutil.NoSuchProcess:
        return True
