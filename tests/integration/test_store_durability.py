"""An acknowledged write survives ``kill -9`` of the store and of the daemon; no partial blob is ever visible.

A client thread runs a write storm and records every acknowledged (key, version, digest); the
store replica (then the daemon) is SIGKILLed mid-storm; afterwards every acknowledged version
reads back intact, and every blob file on disk is whole (its content hashes to its name).
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from microkernel.client import Client, KernelUnavailable
from protocols import wire
from protocols.errors import MicrokernelError
from tests.integration.conftest import start_kernel
from tests.processes import assert_all_gone

CEILING = 60.0
CONFIG = """
[services.store]
entry = "services.store:Store"
"""


@dataclass
class Storm:
    """A write storm in a thread: puts until stopped, recording each acknowledged write."""

    runtime_dir: Path
    acked: list[tuple[str, int, str]] = field(default_factory=list)
    failures: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    progress: threading.Condition = field(default_factory=threading.Condition)

    def run(self) -> None:
        rng = random.Random(4)
        try:
            client = Client(runtime_dir=self.runtime_dir, timeout=3.0)
        except KernelUnavailable:
            return
        with client:
            i = 0
            while not self.stop.is_set():
                key = f"storm/k{i % 25}"
                data = rng.randbytes(rng.choice([10, 3_000, 70_000, 300_000]))
                i += 1
                try:
                    reply = client.call("store", "put", key=key, data=data, timeout=3.0)
                except MicrokernelError:  # not ready, timed out, kernel gone: not acknowledged
                    self.failures += 1
                    continue
                assert reply["digest"] == hashlib.sha256(data).hexdigest()
                with self.progress:
                    self.acked.append((key, reply["version"], reply["digest"]))
                    self.progress.notify_all()

    def wait_for(self, count: int) -> None:
        with self.progress:
            assert self.progress.wait_for(lambda: len(self.acked) >= count, timeout=CEILING), \
                f"only {len(self.acked)} writes acknowledged ({self.failures} failed)"


def verify(client: Client, acked: list[tuple[str, int, str]], root: Path) -> None:
    """Every acknowledged version reads back with its digest; every blob file is whole; no temp file is left."""
    for key, version, digest in acked:
        got = client.call("store", "get", key=key, version=version, timeout=CEILING)
        assert got["digest"] == digest and hashlib.sha256(got["data"]).hexdigest() == digest, (key, version)
    generation = root / (root / "CURRENT").read_text().strip()
    for path in (generation / "blobs").glob("*/*"):
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name, f"partial blob {path}"
    assert list((generation / "tmp").iterdir()) == []


def store_pid(client: Client) -> int:
    return client.status("store")["services"][0]["replicas"][0]["pid"]


def test_acknowledged_writes_survive_kill_9_of_the_store(short_tmp: str) -> None:
    with start_kernel(CONFIG, short_tmp) as k, Client(runtime_dir=k.runtime_dir, timeout=CEILING) as c:
        c.wait_ready("store", timeout=CEILING)
        storm = Storm(k.runtime_dir)
        writer = threading.Thread(target=storm.run, name="storm")
        with c.events("service.ready") as ready_events:
            writer.start()
            try:
                storm.wait_for(40)
                victim = store_pid(c)
                os.kill(victim, signal.SIGKILL)
                while True:  # the kernel restarts the store: a new ready replica
                    env = ready_events.next_event(CEILING)
                    assert env is not None, "the store was not restarted"
                    if wire.body_of(env.message).get("service") == "store":
                        break
                storm.wait_for(len(storm.acked) + 40)  # writes go on against the new replica
            finally:
                storm.stop.set()
                writer.join(CEILING)
        assert store_pid(c) != victim
        verify(c, storm.acked, Path(short_tmp) / "store")


def test_acknowledged_writes_survive_kill_9_of_the_daemon(short_tmp: str) -> None:
    storm: Storm
    with start_kernel(CONFIG, short_tmp) as k, Client(runtime_dir=k.runtime_dir, timeout=CEILING) as c:
        c.wait_ready("store", timeout=CEILING)
        storm = Storm(k.runtime_dir)
        writer = threading.Thread(target=storm.run, name="storm")
        writer.start()
        try:
            storm.wait_for(40)
            victim = store_pid(c)
            children = [p.pid for p in psutil.Process(k.proc.pid).children(recursive=True)]
            os.kill(k.proc.pid, signal.SIGKILL)
            k.proc.wait(CEILING)
            assert_all_gone([victim, *children], CEILING)  # the store dies with its kernel
        finally:
            storm.stop.set()
            writer.join(CEILING)
    assert storm.acked
    # A new daemon on the same runtime dir and store root.
    with start_kernel(CONFIG, short_tmp) as k, Client(runtime_dir=k.runtime_dir, timeout=CEILING) as c:
        c.wait_ready("store", timeout=CEILING)
        verify(c, storm.acked, Path(short_tmp) / "store")
        assert c.call("store", "put", key="storm/after", data=b"alive")["version"] == 1
