"""``bench/peers.py``'s phases 2 and 3: a worker past its memory limit → running again, and each
supervisor's own CPU and RSS with many idle workers."""

from __future__ import annotations

import os
import signal
import statistics
import time
from contextlib import ExitStack
from typing import Any

import psutil

from bench.harness import Daemon, log
from bench.peers_workers.drivers import Circus, PeersVenv, WorkerSpec
from bench.peers_workers.notify import Listener
from bench.peers_workers.stage import (
    MEM_LIMIT, MIB, Plan, Stage, make_peer, ms_between, ours_hog_config, subscriber, wait_ready_event,
)

def memlimit(plan: Plan, venv: PeersVenv | None, root: str, notify: Listener) -> dict[str, Any]:
    """Phase 2: a worker allocating past 128 MiB → running again, round-robin over the daemons."""
    out: dict[str, Any] = {}
    with ExitStack() as stack:
        stage = Stage(stack)
        peers: dict[str, str] = {}  # label -> the hog worker's tag
        if venv is not None:
            plugin_tuned = {"max_mem": f"{MEM_LIMIT // MIB}M", "loop_rate": 0.1}
            stage.peer(Circus("circus_tuned_mem", os.path.join(root, "circus_tuned_mem"), venv, notify.path,
                              [WorkerSpec(name="hog", tag="circus_tuned.hog", hog_limit=MEM_LIMIT)],
                              check_delay=0.1, memory_plugin=plugin_tuned))
            peers["circus_tuned"] = "circus_tuned.hog"
            if plan.slow_memlimit:
                stage.peer(Circus("circus_mem", os.path.join(root, "circus_mem"), venv, notify.path,
                                  [WorkerSpec(name="hog", tag="circus.hog", hog_limit=MEM_LIMIT)],
                                  memory_plugin={"max_mem": f"{MEM_LIMIT // MIB}M"}))
                peers["circus"] = "circus.hog"
        ours: dict[str, tuple[Daemon, Any]] = {}
        settings = {"ours": {}, "ours_tuned": {"memory_sample_interval": "100ms"}}
        daemons = stage.ours_many([Daemon(ours_hog_config(notify.path, f"{label}.hog"), kernel=kernel)
                                   for label, kernel in settings.items()])
        for label, daemon in zip(settings, daemons):
            ours[label] = (daemon, stack.enter_context(subscriber(daemon, ["service.ready"])))
        current = {label: notify.wait("up", tag, 60.0) for label, tag in peers.items()}
        for label in ours:
            current[label] = notify.wait("up", f"{label}.hog", 60.0)
        log(f"memory-limit daemons up: {', '.join(current)}")

        def trial(label: str, tag: str, timeout: float) -> tuple[float, float]:
            """SIGUSR1 → crossing → the replacement's up (and, for ours, its service.ready)."""
            old = current[label]
            os.kill(old.pid, signal.SIGUSR1)
            cross = notify.wait("cross", tag, 30.0)
            t_ready = wait_ready_event(ours[label][1], "hog", old.pid, timeout)[0] if label in ours else None
            new = notify.wait("up", tag, timeout, not_pid=old.pid)
            current[label] = new
            up_ms = ms_between(cross.t_ns, new.t_ns)
            return (ms_between(cross.t_ns, t_ready) if t_ready is not None else up_ms), up_ms

        fast = [label for label in ("circus_tuned", "ours", "ours_tuned") if label in current]
        results: dict[str, list[tuple[float, float]]] = {label: [] for label in current}
        for i in range(plan.memlimit):
            for label in fast:
                tag = peers.get(label, f"{label}.hog")
                results[label].append(trial(label, tag, 30.0))
            log(f"  memory-limit round {i + 1}/{plan.memlimit}: "
                + ", ".join(f"{k} {results[k][-1][0]:.0f}" for k in fast) + " ms")
        if "circus" in peers:
            log("  circus with the plugin's default loop_rate (60 s, max_count 3): one sample, ~4 minutes")
            results["circus"].append(trial("circus", "circus.hog", 600.0))
        for label, rs in results.items():
            out[f"{label}_memlimit_restart_ms_p50"] = round(statistics.median(r[0] for r in rs), 1) if rs else None
            if label.startswith("ours") and rs:
                out[f"{label}_memlimit_up_ms_p50"] = round(statistics.median(r[1] for r in rs), 1)
    return out


# --- idle cost --------------------------------------------------------------------------------------


def measure_idle(pid: int, seconds: float) -> dict[str, float]:
    """The process's own CPU % (user + system, children excluded) over ``seconds``, and its RSS."""
    proc = psutil.Process(pid)
    c0 = proc.cpu_times()
    w0 = time.perf_counter()
    time.sleep(seconds)  # the measurement window itself
    wall = time.perf_counter() - w0
    c1 = proc.cpu_times()
    cpu = (c1.user - c0.user) + (c1.system - c0.system)
    return {"cpu_pct": round(cpu / wall * 100.0, 2), "rss_mib": round(proc.memory_info().rss / MIB, 1)}


def idle(plan: Plan, venv: PeersVenv | None, root: str, notify: Listener) -> dict[str, Any]:
    """Phase 3: each supervisor alone with N idle workers; its own CPU and RSS once all are up."""
    from bench.scale import services_config, wait_all_ready

    n = plan.idle_workers
    out: dict[str, Any] = {}
    # One supervisord configuration is enough here: startsecs only matters while a process starts.
    for label in ("circus", "circus_tuned", "supervisord") if venv is not None else ():
        assert venv is not None
        workers = [WorkerSpec(name=f"i{i}", tag=f"{label}.idle.i{i}") for i in range(n)]
        with ExitStack() as stack:
            t0 = time.perf_counter()
            peer = Stage(stack).peer(make_peer(label, venv, os.path.join(root, "idle"), notify, workers))
            got = notify.wait_up_count(f"{label}.idle.", n, 300.0)
            if got < n:
                raise RuntimeError(f"{label}: only {got}/{n} idle workers up:\n{peer.log_tail()}")
            startup = time.perf_counter() - t0
            time.sleep(plan.idle_settle)  # same settle for everyone: start-up stragglers are not idle cost
            m = measure_idle(peer.pid, plan.idle_seconds)
            log(f"  idle {n} under {label}: up in {startup:.1f}s, {m}")
        out.update({f"{label}_idle{n}_cpu_pct": m["cpu_pct"], f"{label}_idle{n}_rss_mib": m["rss_mib"],
                    f"{label}_idle{n}_startup_s": round(startup, 2)})
    with ExitStack() as stack:
        config = services_config(n, "120s")
        t0 = time.perf_counter()
        daemon = Stage(stack).ours(Daemon(config, kernel={"heartbeat_interval": "1s"}, ready_timeout=60.0))
        ready = wait_all_ready(daemon, set(config), timeout=600.0)["ready"]
        if ready < n:
            raise RuntimeError(f"ours: only {ready}/{n} idle services ready:\n{daemon.log_tail()}")
        startup = time.perf_counter() - t0
        time.sleep(plan.idle_settle)
        m = measure_idle(daemon.pid, plan.idle_seconds)
        log(f"  idle {n} under ours: up in {startup:.1f}s, {m}")
        out.update({f"ours_idle{n}_cpu_pct": m["cpu_pct"], f"ours_idle{n}_rss_mib": m["rss_mib"],
                    f"ours_idle{n}_startup_s": round(startup, 2)})
    return out
