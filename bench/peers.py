"""microkernel side by side with circus and supervisord: restarts, control, idle cost, memory limits.

Usage::

    .venv/bin/python bench/peers.py             # full run (~7 minutes)
    .venv/bin/python bench/peers.py --quick     # smoke run (< 60 s on a quiet host; fewer samples, 10 idle workers)

Prints exactly one JSON line on stdout (progress on stderr). circus and supervisord are benchmark
peers only: they run from their own virtualenv (``$MK_PEERS_VENV``, else ``.peers-venv/``), created
on first use with ``pip install circus supervisor``; when that fails their keys are null and
``peers_error`` says why, and our figures are still reported.

Every supervisor runs the same trivial worker (``bench/peers_workers/worker.py``: announce, then
``signal.pause()``); ours runs its SDK equivalent (``bench/peers_workers/services.py``:
``NotifyPong`` is ``bench.services:Pong`` plus the same announcement). A worker announces itself
with a datagram ``up TAG PID T_NS`` to a unix socket of the benchmark (``T_NS`` from the host's
monotonic clock), so "running again" is one signal for everyone, seen without polling anyone.

Peer configurations (``<peer>`` in the keys):

* ``circus`` — circusd with its default ``check_delay`` (5 s in an ini file), one watcher per worker;
* ``circus_tuned`` — ``check_delay = 0.1``;
* ``supervisord`` — ``startsecs = 0`` (RUNNING as soon as spawned), one ``[program:x]`` per worker;
* ``supervisord_default`` — supervisord's default ``startsecs = 1``;
* ``ours`` — ``microkerneld`` with ``backoff = { initial = "0s" }`` as in ``bench/rpc.py``.

What is measured, in this order, all in one run on one machine:

* ``<peer>_restart_ms_p50/_p90``: ``kill -9`` of worker 0 of 5 → its replacement's ``up``
  datagram. Ours: → the replacement's ``service.ready`` event (received by a subscriber), which
  comes after its ``up`` (``ours_restart_up_ms_*``). Kills go round-robin over the five daemons
  (all running at once), so background load hits every configuration alike. A peer's kill comes
  after a random pause of up to the period of the timer that notices exits there (circus's
  ``check_delay``, supervisord's 1 s poll), so kills land at random phases of it, not at one phase
  fixed by the round-robin. Before each kill ours waits for its warm standby to be warm (as
  ``bench/rpc.py``) and ``supervisord_default`` for RUNNING (its 1 s STARTING would otherwise turn
  the kill into a failed start).
* ``<peer>_control_us_p50/_p99``: each supervisor's own client round trip, request built and
  reply decoded: circus ``status`` on its ZeroMQ control endpoint as circus's ``CircusClient.call``
  does it (a fresh id, the JSON request, send, poll, receive, ``json.loads``, the id checked; from a
  plain pyzmq DEALER), supervisord ``supervisor.getAllProcessInfo`` over XML-RPC on its unix socket
  (``xmlrpc.client``), ours ``Client.status(brief=True)`` (what circus's ``status`` answers: each
  one's state) and, as ``ours_full_control_us_*``, the full ``Client.status()`` (every replica with
  its pid, endpoint, resources: more than ``getAllProcessInfo`` tells); 5 workers each, interleaved
  rounds. ``raw_zmq_control_us_*``: the floor, a raw pyzmq DEALER → ROUTER echo (``bench/raw.py
  serve-sync``) in the same rounds; ``circus*_bytes_control_us_*``: circus's floor, one request
  encoded once and the reply's bytes not decoded (no client work; not a peer configuration).
* ``<peer>_memlimit_restart_ms_p50``: a worker told (``SIGUSR1``) to allocate until its RSS passes
  128 MiB → its replacement's ``up`` (ours: and ``service.ready``). circus: its
  ``resource_watcher`` plugin, ``max_mem = 128M``, CPU/health checks off, ``loop_rate = 0.1``
  with ``check_delay = 0.1`` (``circus_tuned``); with the plugin's default ``loop_rate`` (60 s,
  ``max_count`` 3) only with ``--slow-memlimit`` (one sample takes ~4 minutes). Ours: ``memory =
  "128MiB"`` with the default ``memory_sample_interval`` (250 ms; ``ours_``) and 100 ms
  (``ours_tuned_memlimit_*``). supervisord has no memory limit (superlance's memmon is a separate
  plugin): null.
* ``<peer>_idle<N>_cpu_pct/_rss_mib``: one daemon at a time supervising N idle workers (200; 10
  with ``--quick``), after all are up and a short settle: the daemon process's own CPU (psutil
  ``cpu_times`` delta / wall, children excluded) over 30 s (3 s quick), and its RSS. Ours as in
  ``bench/scale.py`` (``bench.services:Idle`` services, the kernel process only).

``restart_vs_best_peer`` = ours restart p50 / the fastest peer configuration's restart p50;
``control_vs_best_peer`` likewise for the control p50 (ours brief); ``control_full_vs_best_peer``
with our full status. Bar: both <= 0.5. ``control_vs_circus_bytes``: ours brief against circus's
floor (the faster of ``circus*_bytes_control_us_p50``), for reference.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psutil
import zmq

from bench import raw
from bench.harness import Daemon, Helper, emit, exit_cleanly_on_sigterm, log, percentile, short_tmp
from bench.peers_workers.drivers import Circus, PeerDaemon, PeersVenv, Supervisord, WorkerSpec, ensure_peers_venv
from bench.peers_workers.notify import Listener
from bench.peers_workers.phases import idle, memlimit
from bench.peers_workers.stage import (
    PEER_LABELS, TIMER_PERIOD_S, WORKERS, Plan, Stage, make_peer, ms_between, ours_restart_config, stats_ms,
    subscriber, wait_ready_event,
)
from bench.rpc import wait_standby_warm

# --- restarts and control -------------------------------------------------------------------------


def restart_and_control(plan: Plan, venv: PeersVenv | None, root: str, notify: Listener) -> dict[str, Any]:
    """Phase 1: all five daemons with 5 workers each; restarts round-robin, then control rounds."""
    from microkernel.client import Client

    with ExitStack() as stack:
        stage = Stage(stack)
        peers: dict[str, PeerDaemon] = {}
        for label in PEER_LABELS if venv is not None else ():
            assert venv is not None
            workers = [WorkerSpec(name=f"w{i}", tag=f"{label}.w{i}") for i in range(WORKERS)]
            peers[label] = stage.peer(make_peer(label, venv, root, notify, workers))
        ours = stage.ours(Daemon(ours_restart_config(notify.path)))
        client = Client(ours.control, timeout=30.0, name="bench-peers")
        stack.callback(client.close)
        for name in ours_restart_config(notify.path):
            client.wait_ready(name, timeout=60.0)
        for label in peers:
            got = notify.wait_up_count(f"{label}.", WORKERS, 60.0)
            if got < WORKERS:
                raise RuntimeError(f"{label}: only {got}/{WORKERS} workers up:\n{peers[label].log_tail()}")
        log(f"restart/control daemons up: {', '.join([*peers, 'ours'])}")
        sub = stack.enter_context(subscriber(ours, ["service.ready", "service.exited", "standby.ready"]))
        out = restarts(plan, peers, client, sub, notify)
        out.update(control(plan, peers, client, stack, root))
    return out


def restarts(plan: Plan, peers: dict[str, PeerDaemon], client: Any, sub: Any, notify: Listener) -> dict[str, Any]:
    """``kill -9`` of worker 0, round-robin over the daemons → running again (ours: → ready)."""
    current = {label: notify.wait("up", f"{label}.w0", 30.0) for label in peers}
    current["ours"] = notify.wait("up", "ours.pong", 30.0)
    samples: dict[str, list[float]] = {label: [] for label in current}
    ours_up: list[float] = []
    ours_published: dict[str, list[float]] = {"exited": [], "ready": []}
    rng = random.Random(6)  # the same kill phases in every run
    for i in range(plan.restarts):
        for label, old in list(current.items()):
            if label == "ours":
                wait_standby_warm(client, sub)
            else:
                peer = peers[label]
                if label == "supervisord_default":
                    assert isinstance(peer, Supervisord)
                    peer.wait_running("w0", old.pid, 10.0)  # a kill while STARTING is a failed start
                # A kill at a random phase of the peer's periodic timer: in a fixed round-robin
                # the kills would land at one phase of circus's 5 s check_delay and bias it.
                time.sleep(rng.uniform(0.0, TIMER_PERIOD_S[label]))
            t0_wall = time.time_ns()  # the kernel stamps its events with time.time_ns
            t0 = time.monotonic_ns()
            os.kill(old.pid, signal.SIGKILL)
            if label == "ours":
                t_ready, published = wait_ready_event(sub, "pong", old.pid)
                new = notify.wait("up", "ours.pong", 30.0, not_pid=old.pid)
                samples[label].append(ms_between(t0, t_ready))
                ours_up.append(ms_between(t0, new.t_ns))
                ours_published["ready"].append(ms_between(t0_wall, published["ready"]))
                if "exited" in published:
                    ours_published["exited"].append(ms_between(t0_wall, published["exited"]))
            else:
                new = notify.wait("up", f"{label}.w0", 30.0, not_pid=old.pid)
                samples[label].append(ms_between(t0, new.t_ns))
            current[label] = new
        log(f"  restart round {i + 1}/{plan.restarts}: "
            + ", ".join(f"{k} {v[-1]:.1f}" for k, v in samples.items()) + f" (ours up {ours_up[-1]:.1f}) ms")
    out: dict[str, Any] = {}
    for label, s in samples.items():
        st = stats_ms(s)
        out[f"{label}_restart_ms_p50"], out[f"{label}_restart_ms_p90"] = st["p50"], st["p90"]
    st = stats_ms(ours_up)
    out["ours_restart_up_ms_p50"], out["ours_restart_up_ms_p90"] = st["p50"], st["p90"]
    # Where our restart goes: the kernel publishing the exit, then the replacement running its
    # setup (up), then the kernel publishing service.ready, then its delivery to the subscriber.
    out["ours_restart_exited_published_ms_p50"] = stats_ms(ours_published["exited"])["p50"]
    out["ours_restart_ready_published_ms_p50"] = stats_ms(ours_published["ready"])["p50"]
    return out


def control(plan: Plan, peers: dict[str, PeerDaemon], client: Any, stack: ExitStack, root: str) -> dict[str, Any]:
    """Control round trips, interleaved rounds: circus status, getAllProcessInfo, Client.status (brief, full)."""
    calls: dict[str, Callable[[], Any]] = {}
    for label, peer in peers.items():
        if isinstance(peer, Circus):
            peer.call("status")  # connects
            calls[label] = peer.status_fn()
            calls[f"{label}_bytes"] = peer.bytes_status_fn()
        elif isinstance(peer, Supervisord):
            calls[label] = peer.rpc.getAllProcessInfo
    calls["ours"] = lambda: client.status(brief=True)
    calls["ours_full"] = client.status
    calls["raw_zmq"] = raw_round_trip(stack, root)
    clock = time.perf_counter_ns
    lat: dict[str, list[int]] = {label: [] for label in calls}
    for fn in calls.values():
        for _ in range(plan.control_warmup):
            fn()
    for _ in range(plan.control_rounds):
        for label, fn in calls.items():
            bucket = lat[label]
            for _ in range(plan.control_per_round):
                t0 = clock()
                fn()
                bucket.append(clock() - t0)
    out: dict[str, Any] = {}
    for label, s in lat.items():
        us = [x / 1000.0 for x in s]
        out[f"{label}_control_us_p50"] = round(percentile(us, 50), 1)
        out[f"{label}_control_us_p99"] = round(percentile(us, 99), 1)
    log("control us p50: " + ", ".join(f"{k} {out[f'{k}_control_us_p50']}" for k in lat))
    return out


def raw_round_trip(stack: ExitStack, root: str) -> Callable[[], Any]:
    """One raw pyzmq DEALER → ROUTER echo round trip (``bench/raw.py serve-sync``): the floor.

    Any control request of any supervisor over a ZeroMQ socket costs at least this much.
    """
    import msgpack

    helper = stack.enter_context(Helper([raw.__file__, "serve-sync", f"ipc://{root}/raw.sock"]))
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(f"ipc://{root}/raw.sock")
    stack.callback(sock.close)
    assert helper.ready_line
    request = msgpack.packb({"text": "status"})
    send, recv = sock.send, sock.recv

    def round_trip() -> bytes:
        send(request)
        return recv()

    return round_trip


# --- memory limit → restart -----------------------------------------------------------------------


# --- the run ----------------------------------------------------------------------------------------


def null_peer_keys(plan: Plan) -> dict[str, Any]:
    """Every key of every peer configuration, null: what is left when a peer was not measured."""
    n = plan.idle_workers
    out: dict[str, Any] = {}
    for label in PEER_LABELS:
        for key in ("restart_ms_p50", "restart_ms_p90", "control_us_p50", "control_us_p99",
                    f"idle{n}_cpu_pct", f"idle{n}_rss_mib", "memlimit_restart_ms_p50"):
            out[f"{label}_{key}"] = None
    return out


def best(result: dict[str, Any], suffix: str) -> tuple[str | None, float | None]:
    values = [(result.get(f"{label}_{suffix}"), label) for label in PEER_LABELS]
    measured = [(v, label) for v, label in values if v is not None]
    if not measured:
        return None, None
    v, label = min(measured)
    return label, v


def kill_leftovers(token: str) -> int:
    """SIGKILL any process whose command line names this run's directory (a last safety net)."""
    me = os.getpid()
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.info["pid"] != me and any(token in part for part in (p.info["cmdline"] or [])):
                p.kill()
                found.append(p)
        except psutil.Error:
            pass
    psutil.wait_procs(found, timeout=5)
    return len(found)


def run(plan: Plan) -> dict[str, Any]:
    t_start = time.perf_counter()
    result: dict[str, Any] = {"bench": "peers", "quick": plan.quick, "cpus": os.cpu_count(),
                              "loadavg_1m_start": round(os.getloadavg()[0], 2)}
    result.update(null_peer_keys(plan))
    result["supervisord_memlimit_note"] = "no memory limit in supervisord itself (superlance memmon: not measured)"
    venv: PeersVenv | None = None
    try:
        venv = ensure_peers_venv(log)
        result.update(circus_version=venv.circus_version, supervisor_version=venv.supervisor_version,
                      peers_venv=str(venv.path), peers_error=None)
        log(f"peers: circus {venv.circus_version}, supervisor {venv.supervisor_version} from {venv.path}")
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        result.update(circus_version=None, supervisor_version=None, peers_venv=None, peers_error=str(exc))
        log(f"peers unavailable, measuring ours only: {exc}")
    root = short_tmp("mk-peers-")
    try:
        with Listener(os.path.join(root, "notify.sock")) as notify:
            log("phase 1: crash → running again, control round trip")
            result.update(restart_and_control(plan, venv, root, notify))
            log("phase 2: memory limit → restart")
            result.update(memlimit(plan, venv, root, notify))
            log(f"phase 3: {plan.idle_workers} idle workers, one supervisor at a time")
            result.update(idle(plan, venv, root, notify))
    finally:
        leftovers = kill_leftovers(root)
        if leftovers:
            log(f"killed {leftovers} leftover process(es) of this run")
        shutil.rmtree(root, ignore_errors=True)
    if not plan.slow_memlimit and venv is not None:
        result["circus_memlimit_note"] = ("default loop_rate (60 s, max_count 3): ~4 minutes per sample, "
                                          "measured only with --slow-memlimit")
    best_restart, best_restart_ms = best(result, "restart_ms_p50")
    best_control, best_control_us = best(result, "control_us_p50")
    ours_restart, ours_control = result.get("ours_restart_ms_p50"), result.get("ours_control_us_p50")
    result.update({
        "best_peer_restart": best_restart,
        "restart_vs_best_peer": round(ours_restart / best_restart_ms, 3) if best_restart_ms and ours_restart else None,
        "best_peer_control": best_control,
        "control_vs_best_peer": round(ours_control / best_control_us, 3) if best_control_us and ours_control else None,
    })
    ours_full = result.get("ours_full_control_us_p50")
    result["control_full_vs_best_peer"] = round(ours_full / best_control_us, 3) if best_control_us and ours_full else None
    # Against circus's floor (its reply's bytes, no client work): not the bar, shown so the client
    # work in each round trip can be told from the daemon's.
    floors = [v for v in (result.get("circus_bytes_control_us_p50"), result.get("circus_tuned_bytes_control_us_p50"))
              if v is not None]
    result["control_vs_circus_bytes"] = round(ours_control / min(floors), 3) if floors and ours_control else None
    bars = [result["restart_vs_best_peer"], result["control_vs_best_peer"]]
    result["pass"] = None if None in bars else all(b <= 0.5 for b in bars)
    result["loadavg_1m"] = round(os.getloadavg()[0], 2)
    result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (< 60 s on a quiet host): fewer samples, 10 idle workers")
    parser.add_argument("--slow-memlimit", action="store_true",
                        help="also one sample of circus's resource_watcher at its default loop_rate (~4 min)")
    args = parser.parse_args(argv)
    exit_cleanly_on_sigterm()
    emit(run(Plan(args.quick, args.slow_memlimit)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
