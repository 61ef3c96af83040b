"""RPC, pipelining, events, control and restart figures of our stack against raw pyzmq, one run.

Usage::

    .venv/bin/python bench/rpc.py            # full run (~1-2 minutes)
    .venv/bin/python bench/rpc.py --quick    # CI smoke run (< ~30 s)

Prints exactly one JSON line on stdout (progress on stderr). What is measured:

* ``rpc_*``: ``Client.call("echo", "echo", text=...)`` — the SDK's sync client, DEALER connected
  directly to the echo replica's data-plane ROUTER (``bench.numpy_echo:Echo``), ~100-byte
  msgpack payload, over ipc. The reply is ``{"text": text}``, as the raw servers' is.
* ``raw_sync_*``: a blocking pyzmq ROUTER echo in its own process (recv, unpack, pack, send) and a
  blocking DEALER client (pack, send, recv, unpack). The ceiling for Python.
* ``raw_async_*``: the same client against a uvloop server that watches the zmq FD with
  ``loop.add_reader`` and drains with NOBLOCK (the fastest asyncio pattern).
  Latency rounds of the three are interleaved, so background load hits all of them alike.
* ``*_pipelined_per_s``: one client keeping a window of 100 requests in flight (ours: the frames
  ``SyncRequester.call`` sends, ``wire.RpcRequestEncoder``, and its decoding of the replies,
  ``wire.decode_rpc_reply``, on a DEALER connected to the endpoint from a lookup; raw: msgpack).
* ``call_many_pipelined_per_s``: the same window through the public API, ``Client.call_many``
  (its ratio to raw sync as ``call_many_vs_raw_sync``; informational).
* ``events_per_s``: ``bench.services:Publisher.burst`` publishes from inside an RPC handler
  (``Service.publish`` in a loop) through the kernel's XSUB/XPUB proxy to a
  ``protocols.subscription.SyncSubscriber`` that decodes every event; ``raw_pubsub_per_s``: a
  PUB process packing the same payload with msgpack to a SUB that unpacks it. Rates are taken at
  the receiver between its first and last event; best of the rounds for both.
* ``control_status_p50_us``: ``Client.status()`` with a handful of services configured.
* ``restart_to_ready_ms_p50``: kill -9 of the ready ``bench.services:Pong`` replica (a plain
  service: no imports of its own beyond the SDK, no torch) → its ``service.ready`` event (received
  by a subscriber), median of >= 10. Backoff is configured to 0 s so the figure measures the restart
  mechanism, not the (configurable) backoff policy. Each kill waits until the kernel's warm standby
  has done its imports (steady state: restarts are rare next to its warm-up).
  ``restart_to_ready_numpy_ms_p50``: the same for the echo service, whose module imports numpy
  (the service's own import time is in it). ``restart_to_ready_cold_ms_p50``: Pong with its own
  ``PYTHONHASHSEED``, which the standby cannot serve: interpreter start + imports every time.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import threading
import time
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import zmq

from bench import raw
from bench.harness import PAYLOAD_TEXT, Daemon, Helper, emit, exit_cleanly_on_sigterm, log, ratio, summary_us

WINDOW = 100
EVENT_SIZE = 80  # {"seq": i, "data": 80 chars} ≈ 95 bytes of msgpack

RESTART_POLICY = {"backoff": {"initial": "0s"}, "intensity": 1000, "period": "60s"}


def services_config() -> dict[str, dict[str, Any]]:
    return {
        "echo": {"entry": "bench.numpy_echo:Echo", **RESTART_POLICY},
        "pong": {"entry": "bench.services:Pong", **RESTART_POLICY},
        # The same service with an interpreter setting of its own: the warm standby cannot serve it,
        # so its restarts show the cold path (interpreter start + imports) in the same run.
        "pong-cold": {"entry": "bench.services:Pong", "env": {"PYTHONHASHSEED": "0"}, **RESTART_POLICY},
        "publisher": {"entry": "bench.services:Publisher"},
        "idle-a": {"entry": "bench.services:Idle"},
        "idle-b": {"entry": "bench.services:Idle"},
        "idle-c": {"entry": "bench.services:Idle"},
    }


class Plan:
    def __init__(self, quick: bool) -> None:
        self.quick = quick
        # Many short interleaved latency rounds: the VM's scheduling state (and other tenants' load)
        # shifts within seconds; every variant must see the same mix of conditions.
        self.rounds = 20 if quick else 60
        self.per_round = 150 if quick else 500
        self.warmup = 300 if quick else 2000
        self.pipelined_n = 8_000 if quick else 50_000
        self.pipelined_rounds = 2 if quick else 3
        self.async_client_n = 2_000 if quick else 20_000
        self.events_n = 15_000 if quick else 100_000
        self.events_rounds = 2 if quick else 3
        self.status_n = 300 if quick else 2000
        self.restarts = 10 if quick else 20
        self.restarts_extra = 5 if quick else 10


# --- latency -------------------------------------------------------------------------------------


def latency_ours(client: Any, n: int) -> list[int]:
    call = client.call
    clock = time.perf_counter_ns
    out = []
    for _ in range(n):
        t0 = clock()
        reply = call("echo", "echo", text=PAYLOAD_TEXT)
        out.append(clock() - t0)
    assert reply["text"] == PAYLOAD_TEXT
    return out


def pipelined_ours(ctx: zmq.Context, endpoints: list[str], n: int, window: int) -> float:
    """Messages/s with ``window`` rpc_requests in flight on one DEALER, with the SDK's codec and
    frame I/O: the frames and the reply decoding of ``SyncRequester.call``."""
    from protocols import transport, wire

    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    for ep in endpoints:
        sock.connect(ep)
    encode = wire.RpcRequestEncoder("bench").encode
    decode_usual, decode = wire.decode_rpc_reply, wire.decode
    send_message, recv_message = transport.send_message, transport.recv_reply
    new_msg_id, time_ns = wire.new_msg_id, time.time_ns

    def request() -> None:
        send_message(sock, encode("echo", {"text": PAYLOAD_TEXT}, new_msg_id(), time_ns() + 30_000_000_000))

    def recv() -> Any:
        frames = recv_message(sock)
        usual = decode_usual(frames, None)
        return usual[1] if usual is not None else decode(frames).message.result

    request()
    recv()  # connected and served
    t0 = time.perf_counter()
    sent = 0
    for _ in range(min(window, n)):
        request()
        sent += 1
    for _ in range(n):
        result = recv()
        if sent < n:
            request()
            sent += 1
    elapsed = time.perf_counter() - t0
    assert result["text"] == PAYLOAD_TEXT
    sock.close()
    return n / elapsed


def pipelined_call_many(client: Any, n: int, window: int) -> float:
    """Calls/s of ``Client.call_many`` with ``window`` calls in flight: the public pipelining API."""
    calls = ({"text": PAYLOAD_TEXT} for _ in range(n))
    t0 = time.perf_counter()
    for result in client.call_many("echo", "echo", calls, window=window):
        pass
    elapsed = time.perf_counter() - t0
    assert result["text"] == PAYLOAD_TEXT
    return n / elapsed


def pipelined_async_client(control: str, n: int, window: int) -> float:
    """Calls/s of ``AsyncClient.call`` with ``window`` calls in flight (uvloop). Informational."""
    import asyncio

    import uvloop

    from microkernel.client import AsyncClient

    async def main() -> float:
        async with AsyncClient(control, timeout=30.0, name="bench-async") as client:
            await client.call("echo", "echo", text=PAYLOAD_TEXT)
            remaining = n

            async def worker() -> None:
                nonlocal remaining
                while remaining > 0:
                    remaining -= 1
                    await client.call("echo", "echo", text=PAYLOAD_TEXT)

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(window)))
            return n / (time.perf_counter() - t0)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


# --- events --------------------------------------------------------------------------------------


def events_ours(client_factory: Any, events_endpoint: str, n: int, size: int, rounds: int) -> dict[str, Any]:
    from protocols.subscription import SyncSubscriber

    ctx = zmq.Context.instance()
    sub = SyncSubscriber(ctx, events_endpoint, ["bench.*"], timeout=30.0)
    results = []
    try:
        for _ in range(rounds):
            errors: list[BaseException] = []

            def fire() -> None:
                try:
                    with client_factory() as c:  # one client per thread
                        c.call("publisher", "burst", n=n, size=size, timeout=120.0)
                except BaseException as exc:  # reported below
                    errors.append(exc)

            thread = threading.Thread(target=fire, name="burst")
            thread.start()
            res = raw.subscribe_count(lambda: sub.next_event(2.0), lambda env: env.message.data["seq"], n)
            thread.join()
            if errors:
                raise errors[0]
            results.append(res)
            log(f"  events round: {res['received']}/{n} received, {res['per_s']:.0f}/s")
    finally:
        sub.close()
    return max(results, key=lambda r: r["per_s"])


# --- control and restart -------------------------------------------------------------------------


def control_status(client: Any, n: int) -> list[int]:
    clock = time.perf_counter_ns
    out = []
    for _ in range(n):
        t0 = clock()
        client.status()
        out.append(clock() - t0)
    return out


def wait_standby_warm(client: Any, sub: Any) -> None:
    """Return once the kernel's warm standby has finished its imports (at once without one)."""
    while True:
        standby = client.status()["kernel"].get("standby")
        if not standby or not standby.get("enabled") or standby.get("warm"):
            return
        env = sub.next_event(30.0)  # a standby.ready (or another event: then look again)
        if env is None:
            raise RuntimeError("the kernel's standby did not become ready within 30 s")


def restart_to_ready(client: Any, events_endpoint: str, service: str, n: int) -> dict[str, Any]:
    """kill -9 the ready replica, wait for its next service.ready; wall ms and the kernel's startup_ms."""
    from protocols.subscription import SyncSubscriber

    ctx = zmq.Context.instance()
    entry = client.status(service)
    entry = entry["services"][0] if "services" in entry else entry
    pid = entry["replicas"][0]["pid"]
    wall_ms, startup_ms = [], []
    sub = SyncSubscriber(ctx, events_endpoint, ["service.ready", "standby.ready"], timeout=30.0)
    try:
        for _ in range(n):
            # Steady state: restarts are rare next to the few hundred ms a standby needs to warm up,
            # so each kill waits until the kernel's standby (if it keeps one) has done its imports.
            wait_standby_warm(client, sub)
            t0 = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            while True:
                env = sub.next_event(30.0)
                if env is None:
                    raise RuntimeError(f"{service} was not ready again within 30 s after kill -9 of pid {pid}")
                msg = env.message
                if env.msg_type == "service.ready" and msg.service == service and msg.pid != pid:
                    break
            wall_ms.append((time.perf_counter() - t0) * 1000.0)
            startup_ms.append(msg.startup_ms)
            pid = msg.pid
    finally:
        sub.close()
    return {
        "p50": round(statistics.median(wall_ms), 1),
        "min": round(min(wall_ms), 1),
        "max": round(max(wall_ms), 1),
        "startup_ms_p50": round(statistics.median(startup_ms), 1),
    }


# --- the run -------------------------------------------------------------------------------------


def run(plan: Plan) -> dict[str, Any]:
    from microkernel.client import Client

    ctx = zmq.Context.instance()
    result: dict[str, Any] = {"bench": "rpc", "quick": plan.quick, "cpus": os.cpu_count()}
    t_start = time.perf_counter()
    daemon = Daemon(services_config())
    helpers: list[Helper] = []
    socks: list[zmq.Socket] = []
    try:
        daemon.start()
        log(f"daemon {daemon.pid} up in {daemon.tmp}")
        sync_ep = f"ipc://{daemon.tmp}/raw-sync.sock"
        async_ep = f"ipc://{daemon.tmp}/raw-async.sock"
        helpers.append(Helper([raw.__file__, "serve-sync", sync_ep]))
        helpers.append(Helper([raw.__file__, "serve-async", async_ep]))
        raw_sync = ctx.socket(zmq.DEALER)
        raw_async = ctx.socket(zmq.DEALER)
        for s, ep in ((raw_sync, sync_ep), (raw_async, async_ep)):
            s.linger = 0
            s.connect(ep)
            socks.append(s)

        client = Client(daemon.control, timeout=30.0, name="bench")
        try:
            for name in services_config():
                client.wait_ready(name, timeout=60.0)
            log(f"all services ready after {time.perf_counter() - t_start:.1f}s")

            # Latency: interleaved rounds (raw sync, raw async, ours).
            raw.latency_raw(raw_sync, plan.warmup)
            raw.latency_raw(raw_async, plan.warmup)
            latency_ours(client, plan.warmup)
            s_sync: list[int] = []
            s_async: list[int] = []
            s_ours: list[int] = []
            for i in range(plan.rounds):
                s_sync += raw.latency_raw(raw_sync, plan.per_round)
                s_async += raw.latency_raw(raw_async, plan.per_round)
                s_ours += latency_ours(client, plan.per_round)
            lat_sync, lat_async, lat_ours = summary_us(s_sync), summary_us(s_async), summary_us(s_ours)
            log(f"latency us: ours {lat_ours}  raw sync {lat_sync}  raw async {lat_async}")

            # Pipelined: interleaved rounds, best of each.
            endpoints = client.lookup("echo")["endpoints"]
            p_sync, p_async, p_ours, p_many = [], [], [], []
            for _ in range(plan.pipelined_rounds):
                p_sync.append(raw.pipelined_raw(raw_sync, plan.pipelined_n, WINDOW))
                p_async.append(raw.pipelined_raw(raw_async, plan.pipelined_n, WINDOW))
                p_ours.append(pipelined_ours(ctx, endpoints, plan.pipelined_n, WINDOW))
                p_many.append(pipelined_call_many(client, plan.pipelined_n, WINDOW))
            log(f"pipelined/s: ours {[round(x) for x in p_ours]} call_many {[round(x) for x in p_many]} "
                f"raw sync {[round(x) for x in p_sync]} raw async {[round(x) for x in p_async]}")
            p_async_client = pipelined_async_client(daemon.control, plan.async_client_n, WINDOW)
            log(f"pipelined AsyncClient.call/s: {p_async_client:.0f}")

            # Events: ours through the kernel proxy, raw PUB->SUB.
            ev_ours = events_ours(lambda: Client(daemon.control, timeout=30.0, name="bench-burst"),
                                  daemon.events, plan.events_n, EVENT_SIZE, plan.events_rounds)
            ev_raw = raw.raw_pubsub(f"ipc://{daemon.tmp}/raw-pub.sock", plan.events_n, EVENT_SIZE, plan.events_rounds)
            log(f"events/s: ours {ev_ours}  raw {ev_raw}")

            # Control plane.
            control_status(client, min(200, plan.status_n))
            st = summary_us(control_status(client, plan.status_n))
            log(f"status us: {st}")

            # Restart to ready.
            rr = restart_to_ready(client, daemon.events, "pong", plan.restarts)
            log(f"restart pong ms: {rr}")
            rr_numpy = restart_to_ready(client, daemon.events, "echo", plan.restarts_extra)
            log(f"restart echo (imports numpy) ms: {rr_numpy}")
            rr_cold = restart_to_ready(client, daemon.events, "pong-cold", plan.restarts_extra)
            log(f"restart pong-cold (no standby) ms: {rr_cold}")
        finally:
            client.close()

        result.update({
            "rpc_p50_us": lat_ours["p50"],
            "rpc_p99_us": lat_ours["p99"],
            "raw_sync_p50_us": lat_sync["p50"],
            "raw_sync_p99_us": lat_sync["p99"],
            "raw_async_p50_us": lat_async["p50"],
            "raw_async_p99_us": lat_async["p99"],
            "rpc_vs_raw_sync": ratio(lat_ours["p50"], lat_sync["p50"]),
            "rpc_vs_raw_async": ratio(lat_ours["p50"], lat_async["p50"]),
            "rpc_pipelined_per_s": round(max(p_ours)),
            "raw_sync_pipelined_per_s": round(max(p_sync)),
            "raw_async_pipelined_per_s": round(max(p_async)),
            "pipelined_vs_raw_sync": ratio(max(p_ours), max(p_sync)),
            "call_many_pipelined_per_s": round(max(p_many)),
            "call_many_vs_raw_sync": ratio(max(p_many), max(p_sync)),
            "async_client_pipelined_per_s": round(p_async_client),
            "events_per_s": round(ev_ours["per_s"]),
            "events_received_frac": round(ev_ours["received"] / plan.events_n, 3),
            "raw_pubsub_per_s": round(ev_raw["per_s"]),
            "raw_pubsub_received_frac": round(ev_raw["received"] / plan.events_n, 3),
            "events_vs_raw": ratio(ev_ours["per_s"], ev_raw["per_s"]),
            "control_status_p50_us": st["p50"],
            "control_status_p99_us": st["p99"],
            "restart_to_ready_ms_p50": rr["p50"],
            "restart_to_ready_ms_min": rr["min"],
            "restart_kernel_startup_ms_p50": rr["startup_ms_p50"],
            "restart_to_ready_numpy_ms_p50": rr_numpy["p50"],
            "restart_to_ready_cold_ms_p50": rr_cold["p50"],
            "restarts": plan.restarts,
            "loadavg_1m": round(os.getloadavg()[0], 2),
            "elapsed_s": round(time.perf_counter() - t_start, 1),
        })
        return result
    finally:
        for s in socks:
            s.close()
        for h in helpers:
            h.stop()
        code = daemon.stop()
        if code not in (0, None):
            log(f"daemon exited with {code}:\n{daemon.log_tail()}")


TARGETS = {
    "rpc_vs_raw_sync": ("<=", 2.5, 2.0),
    "rpc_vs_raw_async": ("<=", 1.4, 1.2),
    "pipelined_vs_raw_sync": (">=", 0.5, 0.7),
    "events_vs_raw": (">=", 0.5, 0.7),
    "control_status_p50_us": ("<=", 300, 130),
    "restart_to_ready_ms_p50": ("<=", 250, 120),
}


def verdicts(result: dict[str, Any]) -> dict[str, str]:
    out = {}
    for key, (op, bar, aim) in TARGETS.items():
        v = result.get(key)
        if v is None:
            continue
        ok = v <= bar if op == "<=" else v >= bar
        great = v <= aim if op == "<=" else v >= aim
        out[key] = "aim" if great else ("pass" if ok else "FAIL")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations (CI smoke run, < ~30 s)")
    args = parser.parse_args(argv)
    exit_cleanly_on_sigterm()
    result = run(Plan(args.quick))
    result["verdicts"] = verdicts(result)
    result["pass"] = all(v != "FAIL" for v in result["verdicts"].values())
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
