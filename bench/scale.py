"""Kernel overhead with many idle supervised services.

Usage::

    .venv/bin/python bench/scale.py                          # 200 services, 30 s window
    .venv/bin/python bench/scale.py --services 20 --seconds 5  # CI smoke run

Starts a daemon whose config declares N ``bench.services:Idle`` services (all autostart, so they
all start concurrently when the kernel starts), waits until every one is ready (counting
``service.ready`` events, after a status snapshot so none is missed), then measures the daemon's
own CPU time (psutil ``cpu_times`` delta / wall time) over a window of S seconds, while the
services only heartbeat (default interval 1 s). Prints one JSON line: ``services``,
``kernel_cpu_pct``, ``kernel_rss_mib``, ``startup_s`` (daemon spawn → all ready), plus the
services' total RSS and CPU for context.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psutil
import zmq

from bench.harness import Daemon, emit, exit_cleanly_on_sigterm, log

MIB = 1024 * 1024


def services_config(n: int, start_timeout: str) -> dict[str, dict[str, Any]]:
    width = len(str(n - 1))
    return {f"idle-{i:0{width}d}": {"entry": "bench.services:Idle", "start_timeout": start_timeout} for i in range(n)}


def wait_all_ready(daemon: Daemon, names: set[str], timeout: float) -> dict[str, Any]:
    """Block until every service in ``names`` has its replica ready (events, not polling).

    Returns ``{ready, subscribe_live_s}``; ``ready`` < len(names) when the ceiling passed.
    """
    from microkernel.client import Client
    from protocols.subscription import SyncSubscriber

    ctx = zmq.Context.instance()
    t_sub = time.perf_counter()
    sub = SyncSubscriber(ctx, daemon.events, ["service.ready", "service.failed"], timeout=timeout)
    live_s = time.perf_counter() - t_sub
    log(f"  event subscription live after {live_s:.1f}s")
    try:
        with Client(daemon.control, timeout=timeout, name="bench-scale") as client:
            status = client.status()
        ready = {s["name"] for s in status["services"] if s["state"] == "ready"} & names
        deadline = time.monotonic() + timeout
        last_report = time.monotonic()
        while ready != names:
            left = deadline - time.monotonic()
            env = sub.next_event(left) if left > 0 else None
            if env is None:
                log(f"  only {len(ready)}/{len(names)} services ready within {timeout:g}s")
                break
            msg = env.message
            if env.msg_type == "service.failed":
                log(f"  service {msg.service} failed: {msg.reason}")
                continue
            ready.add(msg.service)
            if time.monotonic() - last_report > 2.0:
                last_report = time.monotonic()
                log(f"  {len(ready)}/{len(names)} ready")
    finally:
        sub.close()
    return {"ready": len(ready), "subscribe_live_s": round(live_s, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", type=int, default=200, help="idle services to supervise (default 200)")
    parser.add_argument("--seconds", type=float, default=30.0, help="measurement window (default 30)")
    parser.add_argument("--heartbeat", default="1s", help="kernel.heartbeat_interval (default 1s)")
    parser.add_argument("--start-timeout", default="120s",
                        help="services' start_timeout (default 120s: N interpreters start at once on 2 cores)")
    parser.add_argument("--ready-ceiling", type=float, default=600.0, help="give up waiting for readiness after this many s")
    args = parser.parse_args(argv)
    exit_cleanly_on_sigterm()

    config = services_config(args.services, args.start_timeout)
    names = set(config)
    t0 = time.perf_counter()
    daemon = Daemon(config, kernel={"heartbeat_interval": args.heartbeat}, ready_timeout=60.0)
    try:
        daemon.start()
        log(f"daemon {daemon.pid} up; waiting for {args.services} services")
        readiness = wait_all_ready(daemon, names, timeout=args.ready_ceiling)
        startup_s = time.perf_counter() - t0
        log(f"{readiness['ready']}/{args.services} ready after {startup_s:.1f}s; measuring for {args.seconds:g}s")

        kernel = psutil.Process(daemon.pid)
        children = kernel.children(recursive=True)
        c0 = kernel.cpu_times()
        ch0 = {}
        for p in children:
            try:
                ch0[p.pid] = sum(p.cpu_times()[:2])
            except psutil.Error:
                pass
        w0 = time.perf_counter()
        time.sleep(args.seconds)  # the measurement window itself
        wall = time.perf_counter() - w0
        c1 = kernel.cpu_times()
        cpu_s = (c1.user - c0.user) + (c1.system - c0.system)
        rss = kernel.memory_info().rss
        ch_cpu = 0.0
        ch_rss = 0
        for p in children:
            try:
                ch_cpu += sum(p.cpu_times()[:2]) - ch0.get(p.pid, 0.0)
                ch_rss += p.memory_info().rss
            except psutil.Error:
                pass
        result = {
            "bench": "scale",
            "services": args.services,
            "seconds": round(wall, 1),
            "heartbeat_interval": args.heartbeat,
            "kernel_cpu_pct": round(cpu_s / wall * 100.0, 2),
            "kernel_user_pct": round((c1.user - c0.user) / wall * 100.0, 2),
            "kernel_sys_pct": round((c1.system - c0.system) / wall * 100.0, 2),
            "kernel_rss_mib": round(rss / MIB, 1),
            "kernel_threads": kernel.num_threads(),
            "startup_s": round(startup_s, 2) if readiness["ready"] == args.services else None,
            "services_ready": readiness["ready"],
            "events_subscribe_live_s": readiness["subscribe_live_s"],
            "services_rss_mib_total": round(ch_rss / MIB),
            "services_rss_mib_each": round(ch_rss / MIB / max(1, len(children)), 1),
            "services_cpu_pct_total": round(ch_cpu / wall * 100.0, 2),
            "loadavg_1m": round(os.getloadavg()[0], 2),
        }
        result["pass"] = result["kernel_cpu_pct"] < 2.0 and readiness["ready"] == args.services
        t_stop = time.perf_counter()
    finally:
        code = daemon.stop(timeout=120.0)
        if code not in (0, None):
            log(f"daemon exited with {code}:\n{daemon.log_tail()}")
    result["shutdown_s"] = round(time.perf_counter() - t_stop, 2)
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
