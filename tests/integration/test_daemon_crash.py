"""``kill -9`` of microkerneld with a store, a dependency chain and shared memory in use, then a restart.

What is already covered elsewhere and not repeated here: acknowledged store writes under a write
storm survive the daemon's ``kill -9`` (``test_store_durability.py``), and grandchildren and
plain commands die with the daemon (``test_supervisor.py::test_kill_9_of_the_daemon_leaves_no_process_behind``).
This module covers them together, plus what neither checks:

* every child of the killed daemon dies — replicas, their children, the sentinel, the standby;
* shared-memory segments of the dead daemon's replicas (one a replica made on purpose, one from
  the store's read pool) are gone: the sentinel unlinks ``mk.<daemon pid>.*`` once it has killed
  the daemon's processes (``test_segments_of_a_killed_daemon_go_without_a_restart``), and a new
  daemon unlinks the segments of dead owners when it starts (the safety net);
* after the restart the store's data is intact and the chain ``store → a → b → c``
  (``depends_on``) comes back to ready in dependency order: each service is *started* only after
  its dependency announced *ready* (checked on the new kernel's event history, by ``seq``).
"""

from __future__ import annotations

import hashlib
import os
import select
import signal
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from microkernel.client import Client
from protocols import handover, shm, wire
from tests.integration.conftest import KernelHandle, start_kernel
from tests.processes import assert_all_gone

CEILING = 60.0
CHAIN = ["store", "a", "b", "c"]
CONFIG = """
[services.store]
entry = "services.store:Store"

[services.a]
entry = "tests.fixtures.echo:Echo"
depends_on = ["store"]

[services.b]
entry = "tests.fixtures.echo:Echo"
depends_on = ["a"]

[services.c]
entry = "tests.fixtures.echo:Echo"
depends_on = ["b"]

[services.shm]
entry = "tests.fixtures.echo:Echo"
"""
# Above the store's shared-memory threshold (16 MiB): a get of it is read into a pooled segment.
LARGE = 17 * 1024 * 1024


def segments_of_kernel(kernel_pid: int) -> set[str]:
    """Names in /dev/shm made under this kernel (``mk.<kernel pid>.<owner pid>.<id>``)."""
    prefix = f"mk.{kernel_pid}."
    return {n for n in os.listdir(shm.SHM_DIR) if n.startswith(prefix)}


def fill_store(client: Client) -> dict[tuple[str, int], str]:
    """Writes of a few shapes (small, large, tensors, several versions); acknowledged (key, version) → sha256."""
    acked: dict[tuple[str, int], str] = {}
    rng = np.random.default_rng(3)
    payloads = [("crash/small", b"hello"), ("crash/small", b"hello again"),
                ("crash/mid", rng.bytes(300_000)), ("crash/large", rng.bytes(LARGE))]
    for key, data in payloads:
        reply = client.call("store", "put", key=key, data=data, timeout=CEILING)
        assert reply["digest"] == hashlib.sha256(data).hexdigest()
        acked[(key, reply["version"])] = reply["digest"]
    reply = client.call("store", "put", key="crash/tensors", tensors={"w": np.arange(12, dtype=np.float32).reshape(3, 4)},
                        timeout=CEILING)
    acked[("crash/tensors", reply["version"])] = reply["digest"]
    return acked


def use_shared_memory(client: Client, kernel_pid: int) -> set[str]:
    """Leave segments owned by two replicas: one made on purpose, one in the store's read pool."""
    made = client.call("shm", "make_segment", size=1 << 20)
    got = client.call("store", "get", key="crash/large", timeout=CEILING)  # read into a pooled store segment
    assert len(got["data"]) == LARGE
    del got
    handover.release_all()  # the test process's own side (what it received is unlinked on claim)
    segments = segments_of_kernel(kernel_pid)
    assert made in segments
    assert len(segments) >= 2, segments  # the store's pooled read segment too
    return segments


def kill_daemon(k: KernelHandle, client: Client) -> list[int]:
    """``kill -9`` of the daemon; returns every pid of its tree (all must be gone)."""
    pids = {r["pid"] for s in client.status()["services"] for r in s["replicas"] if r["pid"]}
    pids |= {p.pid for p in psutil.Process(k.proc.pid).children(recursive=True)}
    os.kill(k.proc.pid, signal.SIGKILL)
    k.proc.wait(CEILING)
    return sorted(pids)


def first_seq(events: list[wire.Envelope], topic: str, service: str) -> int:
    seqs = [wire.body_of(e.message)["seq"] for e in events
            if e.msg_type == topic and wire.body_of(e.message).get("service") == service]
    assert seqs, f"no {topic} of {service} in the new kernel's history"
    return min(seqs)


def startup_history(client: Client) -> list[wire.Envelope]:
    """The new kernel's service events from its first one, until every chain member was ready."""
    events: list[wire.Envelope] = []
    waiting = set(CHAIN)
    end = time.monotonic() + CEILING
    with client.events("service.*", since_seq=1) as stream:
        while waiting:
            env = stream.next_event(max(0.0, end - time.monotonic()))
            assert env is not None, f"no service.ready of {sorted(waiting)} within {CEILING:g}s"
            events.append(env)
            if env.msg_type == "service.ready":
                waiting.discard(wire.body_of(env.message).get("service"))
    return events


def test_kill_9_of_the_daemon_then_restart(short_tmp: str) -> None:
    with start_kernel(CONFIG, short_tmp) as k, Client(runtime_dir=k.runtime_dir, timeout=CEILING) as c:
        for name in [*CHAIN, "shm"]:
            c.wait_ready(name, timeout=CEILING)
        acked = fill_store(c)
        segments = use_shared_memory(c, k.proc.pid)
        old_kernel = k.proc.pid
        tree = kill_daemon(k, c)
        assert_all_gone(tree, CEILING)  # replicas, the sentinel, the standby: nothing outlives the daemon
    # Nobody is left to unlink the dead replicas' segments until a daemon starts again.
    still_there = segments_of_kernel(old_kernel)
    assert still_there <= segments

    with start_kernel(CONFIG, short_tmp) as k, Client(runtime_dir=k.runtime_dir, timeout=CEILING) as c:
        # The new daemon swept the segments of dead owners before it started anything.
        assert segments_of_kernel(old_kernel) == set()
        events = startup_history(c)
        for dependency, dependent in zip(CHAIN, CHAIN[1:]):
            assert first_seq(events, "service.ready", dependency) < first_seq(events, "service.started", dependent), \
                f"{dependent} was started before {dependency} was ready"
        for (key, version), digest in acked.items():
            got = c.call("store", "get", key=key, version=version, timeout=CEILING)
            assert got["digest"] == digest, (key, version)
            payload = got["data"] if got["kind"] == "bytes" else None
            if payload is not None:
                assert hashlib.sha256(payload).hexdigest() == digest, (key, version)
            del got, payload
        handover.release_all()
        root = Path(short_tmp) / "store"
        generation = root / (root / "CURRENT").read_text().strip()
        assert list((generation / "tmp").iterdir()) == []  # no half-written blob survived


def wait_exited_unreaped(pids: list[int], timeout: float) -> list[int]:
    """Wait (ceiling) until ``pids`` have exited without reaping them; returns those now zombies of ours.

    A pidfd becomes readable when its process exits, and polling it reaps nothing. After the daemon
    was reaped its children are ours (pytest is a child subreaper, see tests/conftest.py), so
    they stay zombies until we reap them.
    """
    end = time.monotonic() + timeout
    zombies = []
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            readable, _, _ = select.select([fd], [], [], max(0.0, end - time.monotonic()))
            assert readable, f"pid {pid} did not exit within {timeout:g}s"
        finally:
            os.close(fd)
        if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            zombies.append(pid)
    return zombies


def test_restart_sweeps_segments_of_dead_unreaped_replicas(short_tmp: str) -> None:
    """Regression: sweep_orphans() took a zombie owner (os.kill(pid, 0) succeeds for one) for alive,
    so a new daemon left the segments of a killed daemon's replicas that were dead but not yet
    reaped (reparented to a subreaper that reaps late, or to a pid 1 that never reaps)."""
    with start_kernel(CONFIG, short_tmp) as k, Client(runtime_dir=k.runtime_dir, timeout=CEILING) as c:
        c.wait_ready("shm", timeout=CEILING)
        made = c.call("shm", "make_segment", size=1 << 20)
        owner = c.status("shm")["services"][0]["replicas"][0]["pid"]
        old_kernel = k.proc.pid
        tree = kill_daemon(k, c)
    zombies = wait_exited_unreaped(tree, CEILING)
    try:
        assert owner in zombies  # the replica that made the segment is dead, not yet reaped
        with start_kernel(CONFIG, short_tmp) as k, Client(runtime_dir=k.runtime_dir, timeout=CEILING) as c:
            c.wait_ready("shm", timeout=CEILING)
            assert made not in segments_of_kernel(old_kernel)
    finally:
        assert_all_gone(tree, CEILING)  # reaps them
        shm.sweep(kernel_pid=old_kernel)


def test_segments_of_a_killed_daemon_go_without_a_restart(short_tmp: str) -> None:
    """Regression: a kill -9ed daemon's replica segments stayed in /dev/shm until a daemon started
    again; the sentinel now unlinks mk.<kernel pid>.* once it has killed the daemon's processes."""
    with start_kernel(CONFIG, short_tmp) as k, Client(runtime_dir=k.runtime_dir, timeout=CEILING) as c:
        c.wait_ready("shm", timeout=CEILING)
        made = c.call("shm", "make_segment", size=1 << 20)
        old_kernel = k.proc.pid
        tree = kill_daemon(k, c)
        assert_all_gone(tree, CEILING)
    try:
        assert made not in segments_of_kernel(old_kernel)
    finally:
        shm.sweep(kernel_pid=old_kernel)  # do not leave them to the next test
