"""Client load of the chaos soak: worker threads, and the tally every request ends up in.

Each worker owns one ``Client`` (a client's sockets belong to one thread) and keeps it across
daemon restarts: reconnecting is the client's job, and a restart must not need a new client.
Every request goes through ``Tally.run`` with the timeout it was given; it ends in exactly one of

* ``succeeded`` — an answer, checked where it can be (echo text, inference result, store digest);
* ``failed_clear_error`` — a ``MicrokernelError`` with a code (``RemoteError``, ``CallTimeout``,
  ``KernelUnavailable`` …), counted by code and by operation, with the first reason seen for
  each operation and code (so a rare code in a long soak can be traced to what said it);
* ``hung`` — returned more than ``grace`` seconds after its timeout, or never (still in flight at
  the end);
* ``failed_unclear`` — anything else: an exception without a code, or a wrong answer.

The store worker remembers every acknowledged write (key, version, sha256); ``StoreLedger.verify``
reads all of them back at the end.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from microkernel.client import Client, KernelUnavailable
from protocols.errors import ErrorCode, MicrokernelError

T = TypeVar("T")

# How many (operation, code) pairs keep the first reason they were given (the report stays short).
ERROR_SAMPLES = 40

# A reconnect attempt while the daemon is down (its socket is stale): retry pacing, not a wait.
RECONNECT_PAUSE_S = 0.2
# After a failed request: do not spin on an error that comes back at once (not_ready, unavailable).
ERROR_PAUSE_S = 0.05


class WrongAnswer(Exception):
    """A reply came, but not the one the request must get (counted as ``failed_unclear``)."""


@dataclass
class Tally:
    """Thread-safe outcome counters of every request of the soak."""

    grace: float
    requests: int = 0
    succeeded: int = 0
    failed_clear_error: int = 0
    hung: int = 0
    failed_unclear: int = 0
    by_op: Counter[str] = field(default_factory=Counter)
    by_op_code: Counter[tuple[str, str]] = field(default_factory=Counter)
    error_samples: dict[str, str] = field(default_factory=dict)  # "op code" -> the first reason
    unclear: Counter[str] = field(default_factory=Counter)
    hung_calls: list[dict[str, Any]] = field(default_factory=list)
    slowest_over_timeout_s: float = 0.0
    slowest_op: str = ""
    _failed: dict[int, bool] = field(default_factory=dict)
    _inflight: dict[int, tuple[str, float, float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, op: str, timeout: float, fn: Callable[[], T]) -> T | None:
        """Run one request that was given ``timeout`` seconds; returns its result, or None if it failed."""
        ident = threading.get_ident()
        t0 = time.monotonic()
        with self._lock:
            self._inflight[ident] = (op, t0, timeout)
        result: T | None = None
        code: str | None = None
        reason = ""
        unclear: str | None = None
        try:
            result = fn()
        except MicrokernelError as exc:
            code = exc.code.value
            reason = exc.reason
        except WrongAnswer as exc:
            unclear = f"wrong_answer:{op}: {exc}"[:200]
        except Exception as exc:  # noqa: BLE001 — anything without a code is what we are looking for
            unclear = f"{type(exc).__name__}:{op}: {exc}"[:200]
        elapsed = time.monotonic() - t0
        with self._lock:
            del self._inflight[ident]
            self._failed[ident] = code is not None or unclear is not None
            self.requests += 1
            self.by_op[op] += 1
            if elapsed - timeout > self.slowest_over_timeout_s:
                self.slowest_over_timeout_s = elapsed - timeout
                self.slowest_op = f"{op} ({code or unclear or 'ok'})"
            if elapsed > timeout + self.grace:
                self.hung += 1
                self.hung_calls.append({"op": op, "timeout_s": timeout, "elapsed_s": round(elapsed, 2),
                                        "outcome": code or unclear or "ok"})
            elif unclear is not None:
                self.failed_unclear += 1
                self.unclear[unclear] += 1
            elif code is not None:
                self.failed_clear_error += 1
                self.by_op_code[op, code] += 1
                sample = f"{op} {code}"
                if sample not in self.error_samples and len(self.error_samples) < ERROR_SAMPLES:
                    self.error_samples[sample] = reason[:200]
            else:
                self.succeeded += 1
        return None if code or unclear else result

    def last_failed(self) -> bool:
        """Whether the calling thread's latest request failed."""
        with self._lock:
            return self._failed.get(threading.get_ident(), False)

    def close_inflight(self) -> None:
        """At the end: requests still in flight past their timeout + grace never returned (hung)."""
        now = time.monotonic()
        with self._lock:
            for op, t0, timeout in self._inflight.values():
                if now - t0 > timeout + self.grace:
                    self.requests += 1
                    self.hung += 1
                    self.hung_calls.append({"op": op, "timeout_s": timeout, "elapsed_s": round(now - t0, 2),
                                            "outcome": "never returned"})

    def summary(self) -> dict[str, Any]:
        with self._lock:
            by_op: dict[str, dict[str, int]] = {}
            by_code: Counter[str] = Counter()
            for (op, code), n in sorted(self.by_op_code.items()):
                by_op.setdefault(op, {})[code] = n
                by_code[code] += n
            return {
                "requests": self.requests,
                "succeeded": self.succeeded,
                "failed_clear_error": self.failed_clear_error,
                "failed_clear_error_by_code": dict(sorted(by_code.items())),
                "failed_clear_error_by_op": by_op,
                "failed_clear_error_reasons": dict(sorted(self.error_samples.items())),
                "hung": self.hung,
                "failed_unclear": self.failed_unclear,
                "failed_unclear_kinds": dict(self.unclear.most_common(10)),
                "hung_calls": self.hung_calls[:10],
                "requests_by_op": dict(sorted(self.by_op.items())),
                "slowest_over_timeout_s": round(self.slowest_over_timeout_s, 2),
                "slowest_op": self.slowest_op,
            }


@dataclass
class StoreLedger:
    """Every acknowledged store write, and what reads found."""

    acked: list[tuple[str, int, str]] = field(default_factory=list)
    corrupted_reads: int = 0
    acked_not_found_midrun: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def ack(self, key: str, version: int, digest: str) -> None:
        with self._lock:
            self.acked.append((key, version, digest))

    def pick(self, rng: random.Random) -> tuple[str, int, str] | None:
        with self._lock:
            return rng.choice(self.acked) if self.acked else None

    def corrupted(self) -> None:
        with self._lock:
            self.corrupted_reads += 1

    def verify(self, client: Client, timeout: float, ceiling: float) -> dict[str, Any]:
        """Read every acknowledged write back; ``lost`` are versions the store no longer has.

        Transient errors (the store restarting) are retried until ``ceiling``; a version that is
        ``not_found`` is lost, one whose bytes do not hash to the acknowledged digest corrupted.
        """
        lost: list[str] = []
        corrupted: list[str] = []
        unreadable: list[str] = []
        deadline = time.monotonic() + ceiling
        for key, version, digest in list(self.acked):
            while True:
                try:
                    got = client.call("store", "get", key=key, version=version, timeout=timeout)
                except MicrokernelError as exc:
                    if exc.code == ErrorCode.NOT_FOUND:
                        lost.append(f"{key}@{version}")
                    elif exc.code == ErrorCode.CORRUPTED:
                        corrupted.append(f"{key}@{version}")
                    elif time.monotonic() < deadline:
                        continue  # the store may be restarting: ask again (each call has a timeout)
                    else:
                        unreadable.append(f"{key}@{version}: {exc.code.value}")
                    break
                data = got["data"]
                if got["digest"] != digest or hashlib.sha256(data).hexdigest() != digest:
                    corrupted.append(f"{key}@{version}")
                del got, data  # a large read maps a shared-memory segment: let it go now
                break
        return {"checked": len(self.acked), "lost": lost, "corrupted": corrupted, "unreadable": unreadable}


class Worker(threading.Thread):
    """One client thread: ``step`` issues one or a few tallied requests, until ``stop`` is set."""

    pace_s = 0.0

    def __init__(self, name: str, control: str, tally: Tally, stop: threading.Event, seed: int) -> None:
        super().__init__(name=name, daemon=True)  # daemon: a hung call can never keep the bench alive
        self.control = control
        self.tally = tally
        self.stop_event = stop
        self.rng = random.Random(seed)
        self.client_errors = 0

    def run(self) -> None:
        client: Client | None = None
        try:
            while not self.stop_event.is_set():
                if client is None:
                    try:
                        client = Client(self.control, timeout=5.0, name=self.name)
                    except KernelUnavailable:
                        self.stop_event.wait(RECONNECT_PAUSE_S)  # the daemon is being restarted
                        continue
                self.step(client)
                self.stop_event.wait(ERROR_PAUSE_S if self.tally.last_failed() else self.pace_s)
        finally:
            if client is not None:
                client.close()

    def step(self, client: Client) -> None:
        raise NotImplementedError


class EchoWorker(Worker):
    """Echo calls with short deadlines; some ask the service to outlast their deadline on purpose."""

    pace_s = 0.002

    def step(self, client: Client) -> None:
        roll = self.rng.random()
        if roll < 0.08:
            # The service sleeps past the caller's deadline: a clear `timeout`, on time.
            self.tally.run("echo.sleep_past_deadline", 0.5,
                           lambda: client.call("echo", "sleep", seconds=1.5, timeout=0.5))
        elif roll < 0.2:
            self.tally.run("echo.sleep", 2.0, lambda: client.call("echo", "sleep", seconds=0.1, timeout=2.0))
        else:
            text = f"chaos-{self.rng.getrandbits(48):x}"

            def echo() -> Any:
                reply = client.call("echo", "echo", text=text, timeout=2.0)
                if reply["text"] != text:
                    raise WrongAnswer(f"echo returned {reply['text']!r} for {text!r}")
                return reply

            self.tally.run("echo.echo", 2.0, echo)


class StoreWorker(Worker):
    """Writes (remembering every acknowledged one) and reads back (checking every byte)."""

    pace_s = 0.02
    SIZES = (64, 4096, 100_000, 400_000)
    # Every so often a payload above the shared-memory threshold (16 MiB): both directions then
    # travel through /dev/shm segments, which must not leak when a side is killed.
    LARGE = 18 * 1024 * 1024

    def __init__(self, *args: Any, ledger: StoreLedger, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ledger = ledger
        self.n = 0

    def step(self, client: Client) -> None:
        self.n += 1
        if self.n % 3 == 0 and self.ledger.acked:
            self.read(client)
        else:
            self.write(client)

    def write(self, client: Client) -> None:
        large = self.n % 60 == 59
        data = self.rng.randbytes(self.LARGE if large else self.rng.choice(self.SIZES))
        key = f"chaos/k{self.n % 40}"
        digest = hashlib.sha256(data).hexdigest()
        timeout = 30.0 if large else 10.0

        def put() -> Any:
            reply = client.call("store", "put", key=key, data=data, timeout=timeout)
            if reply["digest"] != digest:
                self.ledger.corrupted()
                raise WrongAnswer(f"put of {key} acknowledged digest {reply['digest']}, sent {digest}")
            self.ledger.ack(key, int(reply["version"]), digest)
            return reply

        self.tally.run("store.put_large" if large else "store.put", timeout, put)

    def read(self, client: Client) -> None:
        picked = self.ledger.pick(self.rng)
        assert picked is not None
        key, version, digest = picked

        def get() -> None:
            try:
                got = client.call("store", "get", key=key, version=version, timeout=10.0)
            except MicrokernelError as exc:
                if exc.code == ErrorCode.NOT_FOUND:
                    self.ledger.acked_not_found_midrun += 1
                elif exc.code == ErrorCode.CORRUPTED:
                    self.ledger.corrupted()
                raise
            data = got["data"]
            same = got["digest"] == digest and hashlib.sha256(data).hexdigest() == digest
            del got, data  # a large read maps a shared-memory segment: release it at once
            if not same:
                self.ledger.corrupted()
                raise WrongAnswer(f"{key}@{version} read back with another digest")

        self.tally.run("store.get", 10.0, get)


class InferWorker(Worker):
    """Inference requests with a deadline; results are checked against the known weights."""

    pace_s = 0.005

    def __init__(self, *args: Any, expected: Callable[[list[float]], list[float]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.expected = expected

    def step(self, client: Client) -> None:
        x = [float(self.rng.randint(-3, 3)) for _ in range(4)]

        def infer() -> Any:
            got = client.call("inferencer", "infer", input=x, deadline_ms=1500, timeout=3.0)
            want = self.expected(x)
            if len(got) != len(want) or any(abs(a - b) > 1e-3 * (1 + abs(b)) for a, b in zip(got, want)):
                raise WrongAnswer(f"infer({x}) = {got}, expected {want}")
            return got

        self.tally.run("inferencer.infer", 3.0, infer)


class LeaseWorker(Worker):
    """Client-held run-time leases on the declared devices: acquire, hold briefly, release."""

    pace_s = 0.05

    def step(self, client: Client) -> None:
        granted = self.tally.run("lease.acquire", 3.0,
                                 lambda: client.acquire_lease(1, f"{self.rng.randint(1, 6)}GiB", "shared", timeout=1.0))
        if granted is None:
            return
        self.stop_event.wait(self.rng.uniform(0.0, 0.2))  # holding the lease
        lease_id = granted["lease"]["id"]
        self.tally.run("lease.release", 5.0, lambda: client.release_lease(lease_id))


class TrainerWorker(Worker):
    """Keeps a small training job running (a new one when the last ended) and asks its status."""

    pace_s = 1.0
    MODEL = {"n_layers": 1, "d_model": 16, "n_heads": 2, "context": 16, "generate": 4}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.job: str | None = None
        self.jobs = 0

    def step(self, client: Client) -> None:
        if self.job is None:
            job = f"chaos-{self.jobs}"

            def start() -> Any:
                try:
                    return client.call("trainer", "train_start", job=job, config=self.MODEL, steps=60,
                                       batch_size=4, checkpoint_every=10, timeout=20.0)
                except MicrokernelError as exc:
                    if exc.code == ErrorCode.BAD_STATE:  # a reply lost to a crash: the job exists
                        self.job, self.jobs = job, self.jobs + 1
                    raise

            if self.tally.run("trainer.train_start", 20.0, start) is not None:
                self.job, self.jobs = job, self.jobs + 1
            return
        job = self.job

        def status_of() -> Any:
            try:
                return client.call("trainer", "train_status", job=job, timeout=5.0)
            except MicrokernelError as exc:
                if exc.code == ErrorCode.NOT_FOUND:  # bad_state came from another running job
                    self.job = None
                raise

        status = self.tally.run("trainer.train_status", 5.0, status_of)
        if status is not None and status.get("state") in ("finished", "failed", "stopped"):
            self.job = None
