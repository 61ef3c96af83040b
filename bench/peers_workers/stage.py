"""What ``bench/peers.py``'s phases share: the plan, the peer configurations, our daemons' service
configurations, event waits and ``Stage`` (what a phase started, stopped together)."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from typing import Any

import zmq

from bench.harness import Daemon, log, percentile
from bench.peers_workers.drivers import Circus, PeerDaemon, PeersVenv, Supervisord, WorkerSpec
from bench.peers_workers.notify import Listener
from bench.rpc import RESTART_POLICY

MIB = 1024 * 1024
WORKERS = 5  # per daemon in the restart and control phases
MEM_LIMIT = 128 * MIB
PEER_LABELS = ("circus", "circus_tuned", "supervisord", "supervisord_default")
# The period of the timer that decides when each peer notices an exit: circus reaps and respawns
# in its check_delay callback (5 s is the ini default); supervisord respawns on the loop turn after
# the reap, and its loop waits up to 1 s in poll().
TIMER_PERIOD_S = {"circus": 5.0, "circus_tuned": 0.1, "supervisord": 1.0, "supervisord_default": 1.0}


class Plan:
    """How many samples of everything: full or ``--quick``."""

    def __init__(self, quick: bool, slow_memlimit: bool) -> None:
        self.quick = quick
        self.slow_memlimit = slow_memlimit
        self.restarts = 2 if quick else 20
        self.control_rounds = 4 if quick else 20
        self.control_per_round = 50 if quick else 100
        self.control_warmup = 50 if quick else 200
        self.memlimit = 2 if quick else 10
        self.idle_workers = 10 if quick else 200
        self.idle_seconds = 3.0 if quick else 30.0
        self.idle_settle = 0.5 if quick else 3.0


# --- small pieces --------------------------------------------------------------------------------


def ms_between(t0_ns: int, t1_ns: int) -> float:
    return (t1_ns - t0_ns) / 1e6


def stats_ms(samples: list[float]) -> dict[str, float | None]:
    if not samples:
        return {"p50": None, "p90": None}
    return {"p50": round(statistics.median(samples), 1), "p90": round(percentile(samples, 90), 1)}


def ours_restart_config(notify: str) -> dict[str, dict[str, Any]]:
    """Five services like the peers' five workers: the restarted NotifyPong and four Idle."""
    services: dict[str, dict[str, Any]] = {
        "pong": {"entry": "bench.peers_workers.services:NotifyPong", **RESTART_POLICY,
                 "config": {"notify": notify, "tag": "ours.pong"}},
    }
    for i in range(1, WORKERS):
        services[f"idle-{i}"] = {"entry": "bench.services:Idle"}
    return services


def ours_hog_config(notify: str, tag: str) -> dict[str, dict[str, Any]]:
    return {"hog": {"entry": "bench.peers_workers.services:Hog", "memory": f"{MEM_LIMIT // MIB}MiB", **RESTART_POLICY,
                    "config": {"notify": notify, "tag": tag, "limit": MEM_LIMIT}}}


@contextmanager
def subscriber(daemon: Daemon, patterns: list[str]) -> Iterator[Any]:
    from protocols.subscription import SyncSubscriber

    sub = SyncSubscriber(zmq.Context.instance(), daemon.events, patterns, timeout=30.0)
    try:
        yield sub
    finally:
        sub.close()


def wait_ready_event(sub: Any, service: str, old_pid: int, timeout: float = 30.0) -> tuple[int, dict[str, int]]:
    """Block until ``service.ready`` of ``service`` from a pid other than ``old_pid``.

    Returns the monotonic receipt time and the kernel's publication times (``time.time_ns`` of the
    event headers) of that ``service.ready`` and of the old pid's ``service.exited``, if seen.
    """
    deadline = time.monotonic() + timeout
    published: dict[str, int] = {}
    while True:
        env = sub.next_event(max(0.0, deadline - time.monotonic()))
        if env is None:
            raise TimeoutError(f"{service} was not ready again within {timeout:g}s")
        msg = env.message
        if env.msg_type == "service.exited" and msg.service == service and msg.pid == old_pid:
            published["exited"] = env.header.ts_ns
        elif env.msg_type == "service.ready" and msg.service == service and msg.pid != old_pid:
            published["ready"] = env.header.ts_ns
            return time.monotonic_ns(), published


class Stage:
    """What one phase started; all of it is stopped, concurrently, when the phase ends (or fails).

    Concurrent because supervisord's orderly stop takes a second per tick of its loop and ours
    stops 200 services in order: one after the other, tear-downs would dominate the run.
    """

    def __init__(self, stack: ExitStack) -> None:
        self._stops: list[Callable[[], None]] = []
        stack.callback(self._stop_all)

    def _stop_all(self) -> None:
        with ThreadPoolExecutor(max(1, len(self._stops))) as pool:
            futures = [pool.submit(stop) for stop in self._stops]
        self._stops.clear()
        for f in futures:
            f.result()  # re-raise a failed tear-down after every other one ran

    def peer(self, daemon: PeerDaemon) -> PeerDaemon:
        self._stops.append(daemon.stop)
        return daemon.start()

    def ours(self, daemon: Daemon) -> Daemon:
        def stop() -> None:
            code = daemon.stop(timeout=120.0)
            if code not in (0, None):
                log(f"our daemon exited with {code}:\n{daemon.log_tail()}")

        self._stops.append(stop)
        return daemon.start()

    def ours_many(self, daemons: list[Daemon]) -> list[Daemon]:
        """Start several of our daemons at once (each start waits for its ready line)."""
        with ThreadPoolExecutor(len(daemons)) as pool:
            futures = [pool.submit(self.ours, d) for d in daemons]
        return [f.result() for f in futures]


def make_peer(label: str, venv: PeersVenv, root: str, notify: Listener, workers: list[WorkerSpec]) -> PeerDaemon:
    """The daemon of one peer configuration (``PEER_LABELS``), in ``root/<label>``."""
    where = os.path.join(root, label)
    if label == "circus":
        return Circus(label, where, venv, notify.path, workers)
    if label == "circus_tuned":
        return Circus(label, where, venv, notify.path, workers, check_delay=0.1)
    if label == "supervisord":
        return Supervisord(label, where, venv, notify.path, workers, startsecs=0)
    if label == "supervisord_default":
        return Supervisord(label, where, venv, notify.path, workers, startsecs=None)
    raise ValueError(f"unknown peer configuration {label!r}")
