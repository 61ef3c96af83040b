"""sd_notify against a real datagram socket: READY, STATUS, WATCHDOG, RELOADING, STOPPING."""

from __future__ import annotations

import signal

from microkernel.client import Client
from tests.integration.sd_notify import CEILING, run_daemon

CONFIG = """
[services.store]
entry = "tests.fixtures.echo:Echo"

[services.api]
entry = "tests.fixtures.echo:Echo"
depends_on = ["store"]
replicas = 2
"""


def test_ready_status_watchdog_reloading_stopping(short_tmp: str) -> None:
    with run_daemon(short_tmp, CONFIG, env={"WATCHDOG_USEC": "200000"}) as d:
        ready = d.notify.received[-1]
        # READY=1 comes once the autostart services are up, with the counts.
        assert ready["READY"] == "1"
        assert ready["STATUS"] == "2 services: 2 running; 3 replicas ready"
        with Client(runtime_dir=d.runtime_dir) as c:
            states = {s["name"]: (s["state"], s["ready_replicas"]) for s in c.status()["services"]}
            # The socket is the daemon's: replicas do not inherit it (nor the watchdog settings).
            seen = c.call("store", "origin", names=["NOTIFY_SOCKET", "WATCHDOG_USEC"])["env"]
        assert states == {"store": ("ready", 1), "api": ("ready", 2)}
        assert seen == {"NOTIFY_SOCKET": None, "WATCHDOG_USEC": None}

        watchdogs = 0
        while watchdogs < 3:
            watchdogs += "WATCHDOG" in d.notify.wait_for("WATCHDOG")

        d.proc.send_signal(signal.SIGHUP)
        reloading = d.notify.wait_for("RELOADING")
        assert int(reloading["MONOTONIC_USEC"]) > 0
        again = d.notify.wait_for("READY")
        assert again["STATUS"] == "2 services: 2 running; 3 replicas ready"

        d.proc.send_signal(signal.SIGTERM)
        stopping = d.notify.wait_for("STOPPING")
        assert stopping["STATUS"] == "stopping: SIGTERM"
        assert d.proc.wait(timeout=CEILING) == 0


def test_status_follows_a_failure_and_watchdog_pid_is_respected(short_tmp: str) -> None:
    config = CONFIG + '\n[services.w]\nentry = "tests.fixtures.crashy:Crashy"\n'
    # WATCHDOG_PID names another process: this daemon must not ping.
    with run_daemon(short_tmp, config, env={"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}) as d:
        assert d.notify.received[-1]["STATUS"].startswith("3 services: 3 running")
        with Client(runtime_dir=d.runtime_dir) as c:
            c.stop("w")
            status = d.notify.wait_for("STATUS")
            while status["STATUS"] != "3 services: 2 running, 1 stopped; 3 replicas ready":
                status = d.notify.wait_for("STATUS")
        d.proc.send_signal(signal.SIGTERM)
        d.notify.wait_for("STOPPING")
        assert d.proc.wait(timeout=CEILING) == 0
        assert not any("WATCHDOG" in fields for fields in d.notify.received)
