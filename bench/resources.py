"""Resource enforcement costs: budget kill latency, lease round trips, sampling CPU.

Usage::

    .venv/bin/python bench/resources.py            # full run (a few minutes)
    .venv/bin/python bench/resources.py --quick    # CI smoke run (< 60 s)

Three figures, each with a baseline measured in the same run, on the same machine:

* ``budget_kill_latency_ms_p50`` — a hog grows past its hard memory budget; latency from the
  moment its RSS crossed the budget (the hog writes the time down) to the kernel's
  ``service.exited`` with reason ``budget``. Baseline: the same service killed by an outside
  ``kill -9`` → ``service.exited`` (what exit detection costs by itself); the sampling interval
  is the other floor (a crossing waits half an interval for the next sample on average).
* ``lease_ops_per_s`` — acquire + release pairs of one shared GPU lease (declared devices) through
  the kernel, from ``--clients`` client processes at once, each one pair after the other with the
  blocking ``Client`` (one Python client saturates well before the kernel does). Baseline: pairs of
  ``ping`` round trips in exactly the same way — the cheapest control request, so the ceiling. The
  same two figures with a single client are reported too.
* ``sampling_cpu_pct`` — the daemon's CPU with N idle services sampled every 250 ms. Baseline:
  the same N services with sampling disabled (``memory_sample_interval = 0``).

One JSON line on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sys
import time
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from services.base import Service, rpc

MIB = 1024 * 1024
GROW_CHUNK = 2 * MIB
HOG_HARD = "160MiB"


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Hog(Service):
    """Grows until its RSS is above ``hard`` bytes, writes down when, then holds on (until killed)."""

    @rpc
    def grow(self, hard: int, mark: str) -> int:
        # After the reply is on its way: the growth blocks the loop until the crossing.
        asyncio.get_running_loop().call_soon(self._grow, hard, mark)
        return os.getpid()

    def _grow(self, hard: int, mark: str) -> None:
        self.blocks = []
        while _rss() <= hard:
            self.blocks.append(bytearray(b"\x01") * GROW_CHUNK)  # written, so resident
        crossed = time.time_ns()
        fd = os.open(mark, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, str(crossed).encode())
        finally:
            os.close(fd)


# --- the measurements ---------------------------------------------------------------------------


def _wait_event(stream: Any, matches: Any, what: str, ceiling: float, seen: list[Any] | None = None) -> Any:
    """The first event from ``stream`` for which ``matches(env)`` holds; RuntimeError after ``ceiling``."""
    deadline = time.monotonic() + ceiling
    while True:
        left = deadline - time.monotonic()
        env = stream.next_event(left) if left > 0 else None
        if env is None:
            raise RuntimeError(f"{what} within {ceiling:g}s")
        if seen is not None:
            seen.append(env)
        if matches(env):
            return env


def _wait_exit(stream: Any, pid: int, ceiling: float = 30.0, seen: list[Any] | None = None) -> Any:
    return _wait_event(stream, lambda e: e.msg_type == "service.exited" and e.message.pid == pid,
                       f"no service.exited for pid {pid}", ceiling, seen)


def _wait_ready(stream: Any, incarnation: int, ceiling: float = 60.0) -> None:
    _wait_event(stream, lambda e: e.msg_type == "service.ready" and e.message.incarnation >= incarnation,
                f"hog incarnation {incarnation} not ready", ceiling)


def bench_kill(runs: int) -> dict[str, Any]:
    from bench.harness import Daemon, log, percentile
    from microkernel.client import Client

    services = {"hog": {"entry": "bench.resources:Hog", "memory": {"hard": HOG_HARD}, "intensity": 10_000,
                        "backoff": {"initial": "1ms", "max": "1ms"}}}  # fmt: skip
    hard = 160 * MIB
    budget_ms: list[float] = []
    detect_ms: list[float] = []
    outside_ms: list[float] = []
    with Daemon(services) as daemon, Client(daemon.control, timeout=30.0, name="bench-kill") as c:
        interval = c.status()["kernel"]["resources"]["memory"]["sample_interval_s"]
        c.wait_ready("hog", timeout=60.0)
        incarnation = 1
        mark = os.path.join(daemon.tmp, "crossed")
        with c.events("service.*", "budget.*") as stream:
            for i in range(runs):
                # The baseline: an outside SIGKILL of the same replica.
                pid = _pid(c)
                sent = time.time_ns()
                os.kill(pid, signal.SIGKILL)
                exited = _wait_exit(stream, pid)
                outside_ms.append((exited.header.ts_ns - sent) / 1e6)
                incarnation += 1
                _wait_ready(stream, incarnation)
                # The figure: a crossing of the hard budget, at a random moment of the sampling period
                # (the restart above would otherwise put every crossing at about the same phase).
                if os.path.exists(mark):
                    os.unlink(mark)
                time.sleep(random.uniform(0.0, interval))
                pid = _call_hog(c, "grow", hard=hard, mark=mark)
                seen: list[Any] = []
                exited = _wait_exit(stream, pid, seen=seen)
                exceeded = [e for e in seen if e.msg_type == "budget.exceeded" and e.message.limit == "hard"]
                reason = exited.message.reason
                if reason["kind"] != "budget":
                    raise RuntimeError(f"the hog exited with {reason}, not budget")
                with open(mark) as f:
                    crossed = int(f.read())
                budget_ms.append((exited.header.ts_ns - crossed) / 1e6)
                detect_ms.append((exceeded[0].header.ts_ns - crossed) / 1e6)
                incarnation += 1
                _wait_ready(stream, incarnation)
                log(f"  run {i + 1}/{runs}: budget kill {budget_ms[-1]:.0f} ms (detected after {detect_ms[-1]:.0f} ms), "
                    f"outside kill {outside_ms[-1]:.1f} ms")
    p50 = percentile(budget_ms, 50)
    return {
        "budget_kill_latency_ms_p50": round(p50, 1),
        "budget_kill_latency_ms_p90": round(percentile(budget_ms, 90), 1),
        "budget_kill_latency_ms_max": round(max(budget_ms), 1),
        "kill_detect_ms_p50": round(percentile(detect_ms, 50), 1),
        "kill_runs": runs,
        "baseline_outside_kill_ms_p50": round(percentile(outside_ms, 50), 1),
        "sampling_interval_ms": round(interval * 1000, 1),
        "kill_latency_over_interval": round(p50 / (interval * 1000), 2),
        "kill_latency_over_outside_kill": round(p50 / max(percentile(outside_ms, 50), 1e-3), 1),
    }


def _pid(c: Any) -> int:
    return c.status("hog")["services"][0]["replicas"][0]["pid"]


def _call_hog(c: Any, method: str, **args: Any) -> Any:
    """Call the hog's current incarnation at its own endpoint (it is replaced after every run)."""
    import zmq

    from protocols import messages
    from protocols.transport import SyncRequester

    endpoint = c.status("hog")["services"][0]["replicas"][0]["endpoint"]
    requester = SyncRequester(zmq.Context.instance(), [endpoint], sender="bench-kill")
    try:
        return requester.request(messages.RpcRequest(method=method, args=args), timeout=30.0).message.result
    finally:
        requester.close()


def lease_worker(work: str, control: str, pairs: int) -> int:
    """One client process of :func:`bench_leases`: ready line, wait for "go", run, print the seconds."""
    from microkernel.client import Client

    with Client(control, timeout=10.0, name=f"bench-{work}") as c:
        for _ in range(100):  # warm-up: connection, route, code paths
            _pair(c, work)
        print("ready", flush=True)
        sys.stdin.readline()
        t0 = time.perf_counter()
        for _ in range(pairs):
            _pair(c, work)
        print(time.perf_counter() - t0, flush=True)
    return 0


def _pair(c: Any, work: str) -> None:
    if work == "lease":
        c.release_lease(c.acquire_lease(1, 1 << 30, "shared", timeout=0)["lease"]["id"])
    else:
        c.ping()
        c.ping()


def _run_clients(control: str, work: str, clients: int, pairs: int) -> float:
    """Pairs per second of ``clients`` client processes started together, ``pairs`` in total."""
    from bench.harness import Helper

    share = pairs // clients
    helpers = [Helper([__file__, "--worker", work, "--control", control, "--lease-pairs", str(share)])
               for _ in range(clients)]  # fmt: skip
    try:
        for h in helpers:
            assert h.proc.stdin is not None
            h.proc.stdin.write(b"go\n")
            h.proc.stdin.flush()
        elapsed = max(float(h.read_line()) for h in helpers)
    finally:
        for h in helpers:
            h.stop()
    return share * clients / elapsed


def bench_leases(pairs: int, clients: int) -> dict[str, Any]:
    from bench.harness import Daemon, log
    from microkernel.client import Client

    devices = "\n".join(f'[[gpu.device]]\nuuid = "GPU-bench-{i}"\nmemory = "64GiB"\n' for i in range(2))
    daemon = Daemon({})
    with open(daemon.config_path, "a") as f:  # the harness renders [kernel] and services only
        f.write("\n" + devices)
    with daemon, Client(daemon.control, timeout=10.0, name="bench-leases") as c:
        assert len(c.leases()["devices"]) == 2
        one = {work: _run_clients(daemon.control, work, 1, pairs) for work in ("ping", "lease")}
        many = {work: _run_clients(daemon.control, work, clients, pairs) for work in ("ping", "lease")}
        assert c.leases()["leases"] == []
    log(f"  {clients} clients: {many['lease']:.0f} lease pairs/s vs {many['ping']:.0f} ping pairs/s; "
        f"one client: {one['lease']:.0f} vs {one['ping']:.0f}")
    return {
        "lease_ops_per_s": round(many["lease"]),
        "lease_pairs": pairs,
        "lease_clients": clients,
        "baseline_ping_pairs_per_s": round(many["ping"]),
        "lease_ops_over_ping_pairs": round(many["lease"] / many["ping"], 2),
        "lease_ops_per_s_one_client": round(one["lease"]),
        "baseline_ping_pairs_per_s_one_client": round(one["ping"]),
        "lease_ops_over_ping_pairs_one_client": round(one["lease"] / one["ping"], 2),
    }


def _kernel_cpu(services: int, interval: str, seconds: float) -> dict[str, Any]:
    import psutil

    from bench.harness import Daemon, log
    from bench.scale import services_config, wait_all_ready

    config = services_config(services, "300s")
    daemon = Daemon(config, kernel={"memory_sample_interval": interval}, ready_timeout=60.0)
    with daemon:
        ready = wait_all_ready(daemon, set(config), timeout=600.0)["ready"]
        kernel = psutil.Process(daemon.pid)
        c0 = kernel.cpu_times()
        w0 = time.perf_counter()
        time.sleep(seconds)  # the measurement window itself
        wall = time.perf_counter() - w0
        c1 = kernel.cpu_times()
    pct = ((c1.user - c0.user) + (c1.system - c0.system)) / wall * 100.0
    log(f"  {services} services, sampling {interval}: kernel CPU {pct:.2f} % ({ready} ready)")
    return {"pct": pct, "ready": ready}


def bench_sampling(services: int, seconds: float) -> dict[str, Any]:
    on = _kernel_cpu(services, "250ms", seconds)
    off = _kernel_cpu(services, "0s", seconds)
    return {
        "sampling_cpu_pct": round(on["pct"], 2),
        "sampling_services": services,
        "sampling_window_s": seconds,
        "baseline_no_sampling_cpu_pct": round(off["pct"], 2),
        "sampling_cost_pct": round(on["pct"] - off["pct"], 2),
        "sampling_services_ready": min(on["ready"], off["ready"]),
    }


def main(argv: list[str] | None = None) -> int:
    from bench.harness import emit, exit_cleanly_on_sigterm, log

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run in under a minute")
    parser.add_argument("--kill-runs", type=int, help="budget kills to time (default 20, quick 3)")
    parser.add_argument("--lease-pairs", type=int, help="acquire+release pairs (default 5000, quick 500)")
    parser.add_argument("--clients", type=int, default=2, help="client processes for the lease figure (default 2)")
    parser.add_argument("--worker", choices=["lease", "ping"], help=argparse.SUPPRESS)
    parser.add_argument("--control", help=argparse.SUPPRESS)
    parser.add_argument("--services", type=int, help="sampled services (default 50, quick 10)")
    parser.add_argument("--seconds", type=float, help="CPU measurement window (default 20, quick 3)")
    args = parser.parse_args(argv)
    if args.worker:
        return lease_worker(args.worker, args.control, args.lease_pairs)
    exit_cleanly_on_sigterm()
    quick = args.quick
    kill_runs = args.kill_runs or (3 if quick else 20)
    pairs = args.lease_pairs or (500 if quick else 5000)
    services = args.services or (10 if quick else 50)
    seconds = args.seconds or (3.0 if quick else 20.0)

    started = time.perf_counter()
    result: dict[str, Any] = {"bench": "resources", "quick": quick}
    log(f"budget kill latency ({kill_runs} runs)")
    result.update(bench_kill(kill_runs))
    log(f"lease round trips ({pairs} pairs)")
    result.update(bench_leases(pairs, args.clients))
    log(f"sampling CPU ({services} services, {seconds:g} s windows)")
    result.update(bench_sampling(services, seconds))
    result["pass"] = (result["budget_kill_latency_ms_p50"] <= 500 and result["lease_ops_per_s"] >= 2000
                      and result["sampling_cpu_pct"] < 5.0)  # fmt: skip
    result["loadavg_1m"] = round(os.getloadavg()[0], 2)
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
