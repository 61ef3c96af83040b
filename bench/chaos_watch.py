"""What the chaos soak watches while it runs: processes, shared memory, leases, events, the daemon.

* ``ProcessLedger`` — every process ever seen in the daemon's tree (status replies, events and
  psutil walks of the daemon), keyed by pid *and* start time so a recycled pid is never blamed.
* ``our_segments`` — the names in /dev/shm that belong to this run (a kernel pid or an owner pid of
  ours); other runs on the same machine have their own.
* ``check_leases`` — leases held per device against the device's capacity.
* ``EventMonitor`` — ``service.exited`` reasons (restarts by reason), budget kills and replica pids,
  from the event stream of each daemon lifetime (replayed from ``seq`` 1, de-duplicated).
* ``Sampler`` — every half second: status (pids), leases (over-allocation), the daemon's open fds
  and RSS (for growth over a lifetime).
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import psutil

from microkernel.client import Client, KernelUnavailable
from protocols import shm, wire
from protocols.errors import MicrokernelError

SAMPLE_INTERVAL_S = 0.5
# The warm-up point of a daemon lifetime: this long after all its services were ready.
WARMUP_S = 8.0
EVENT_PATTERNS = ("service.*", "budget.*", "memory.*", "lease.*", "supervisor.*")


class ProcessLedger:
    """Every process seen in the daemon's tree during the run."""

    def __init__(self) -> None:
        self._seen: dict[tuple[int, float], str] = {}
        self._lock = threading.Lock()

    def add(self, pid: int | None, origin: str) -> None:
        if not pid or pid == os.getpid():
            return
        try:
            proc = psutil.Process(pid)
            key = (pid, proc.create_time())
        except psutil.Error:
            return  # already gone: it cannot be left behind
        with self._lock:
            self._seen.setdefault(key, origin)

    def add_tree(self, root: int) -> list[int]:
        """The root and its descendants; returns their pids."""
        try:
            procs = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
        except psutil.Error:
            return []
        for p in procs:
            self.add(p.pid, "tree")
        return [p.pid for p in procs]

    def owner_pids(self) -> set[int]:
        with self._lock:
            return {pid for pid, _ in self._seen}

    def __len__(self) -> int:
        return len(self._seen)

    def alive(self) -> list[dict[str, Any]]:
        """Processes seen in the daemon's tree that still run (zombies count as gone)."""
        with self._lock:
            seen = dict(self._seen)
        left = []
        for (pid, created), origin in seen.items():
            try:
                proc = psutil.Process(pid)
                if proc.create_time() != created or proc.status() == psutil.STATUS_ZOMBIE:
                    continue
                left.append({"pid": pid, "origin": origin, "cmdline": " ".join(proc.cmdline())[:160]})
            except psutil.Error:
                continue
        return left


def our_segments(kernel_pids: set[int], owner_pids: set[int]) -> list[str]:
    """Shared-memory segments of this run: made under one of our kernels, or by a process of ours."""
    try:
        names = os.listdir(shm.SHM_DIR)
    except FileNotFoundError:
        return []
    mine = []
    for name in names:
        if not shm.valid_name(name):
            continue
        _, kernel, owner, _ = name.split(".", 3)
        if int(kernel) in kernel_pids or int(owner) in owner_pids:
            mine.append(name)
    return sorted(mine)


def check_leases(leases: dict[str, Any]) -> list[str]:
    """Over-allocations in a ``leases`` reply: an exclusive device shared, or budgets above capacity."""
    capacity = {d["uuid"]: int(d["memory_total"]) for d in leases.get("devices") or ()}
    shared: Counter[str] = Counter()
    exclusive: Counter[str] = Counter()
    others: Counter[str] = Counter()
    problems = []
    for lease in leases.get("leases") or ():
        for uuid in lease.get("devices") or ():
            if uuid not in capacity:
                problems.append(f"{lease['id']} on unknown device {uuid}")
                continue
            if lease.get("mode") == "exclusive":
                exclusive[uuid] += 1
            else:
                shared[uuid] += int(lease.get("memory") or 0)
                others[uuid] += 1
    for uuid, total in capacity.items():
        if exclusive[uuid] > 1 or (exclusive[uuid] and others[uuid]):
            problems.append(f"{uuid}: {exclusive[uuid]} exclusive + {others[uuid]} shared leases")
        if shared[uuid] > total:
            problems.append(f"{uuid}: {shared[uuid]} bytes leased of {total}")
    return problems


@dataclass
class Lifetime:
    """One daemon process, from its start to its kill or stop."""

    index: int
    pid: int
    started: float
    ready_at: float | None = None
    ended: float | None = None
    warm: tuple[int, float] | None = None  # (fds, rss MiB) at the warm-up point
    last: tuple[int, float] | None = None  # latest sample
    end_reason: str = ""

    def growth(self) -> dict[str, Any] | None:
        if self.warm is None or self.last is None:
            return None
        return {"lifetime": self.index, "fds": self.last[0] - self.warm[0],
                "rss_mib": round(self.last[1] - self.warm[1], 1),
                "window_s": round((self.ended or time.monotonic()) - (self.ready_at or self.started) - WARMUP_S, 1),
                "end": self.end_reason}


@dataclass
class RunState:
    """Shared between the sampler, the monitor and the chaos driver."""

    control: str
    processes: ProcessLedger = field(default_factory=ProcessLedger)
    lifetimes: list[Lifetime] = field(default_factory=list)
    lease_problems: list[str] = field(default_factory=list)
    lease_samples: int = 0
    leases_seen_max: int = 0  # most leases held at once in a sample: the check is not vacuous
    restarts_by_reason: Counter[str] = field(default_factory=Counter)
    # Per heartbeat kill: how long the replica had been silent when the kernel noticed (its exit
    # reason's detail, "silent for 3.2 s"): liveness x interval plus how late the check ran.
    heartbeat_silences_s: list[float] = field(default_factory=list)
    exits_by_service: Counter[str] = field(default_factory=Counter)
    budget_kills: int = 0
    events_seen: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Set while a daemon is up and its services were ready once; cleared around a daemon kill.
    up: threading.Event = field(default_factory=threading.Event)

    @property
    def current(self) -> Lifetime:
        return self.lifetimes[-1]

    def kernel_pids(self) -> set[int]:
        return {lt.pid for lt in self.lifetimes}


def _exit_reason(reason: dict[str, Any]) -> str:
    return str(reason.get("kind") or reason.get("text") or "unknown")


def _silence_s(reason: dict[str, Any]) -> float | None:
    """The silence a heartbeat kill's detail reports ("silent for 3.2 s"), else None."""
    detail = reason.get("detail")
    if reason.get("kind") != "heartbeat" or not isinstance(detail, str) or not detail.startswith("silent for "):
        return None
    try:
        return float(detail.split()[2])
    except (IndexError, ValueError):
        return None


class EventMonitor(threading.Thread):
    """Follows each daemon lifetime's events; the driver ``pause``s it around a daemon kill."""

    def __init__(self, state: RunState, stop: threading.Event) -> None:
        super().__init__(name="chaos-events", daemon=True)
        self.state = state
        self.stop_event = stop
        self._seen: set[tuple[int, int]] = set()
        self._pause = threading.Event()
        self._paused = threading.Event()

    def pause(self, ceiling: float = 10.0) -> None:
        """Catch up with the current daemon's history, then stop following it (before its kill)."""
        self._pause.set()
        self._paused.wait(ceiling)

    def resume(self) -> None:
        self._paused.clear()
        self._pause.clear()

    def _absorb(self, lifetime: int, env: wire.Envelope) -> None:
        body = wire.body_of(env.message)
        seq = body.get("seq")
        if isinstance(seq, int) and seq > 0:
            if (lifetime, seq) in self._seen:
                return
            self._seen.add((lifetime, seq))
        st = self.state
        with st.lock:
            st.events_seen += 1
            topic = env.topic or env.msg_type
            if topic == "service.exited":
                reason = body.get("reason") or {}
                st.restarts_by_reason[_exit_reason(reason)] += 1
                silence = _silence_s(reason)
                if silence is not None:
                    st.heartbeat_silences_s.append(silence)
                st.exits_by_service[str(body.get("service"))] += 1
            elif topic == "budget.exceeded" and body.get("action") == "kill":
                st.budget_kills += 1
        if topic in ("service.started", "service.ready", "service.exited"):
            st.processes.add(body.get("pid"), topic)

    def _follow(self, lifetime: int, client: Client) -> None:
        last_seq = 0
        with client.events(*EVENT_PATTERNS, since_seq=1) as stream:
            while not self.stop_event.is_set() and not self._pause.is_set():
                if self.state.current.index != lifetime:
                    return
                env = stream.next_event(0.25)
                if env is not None:
                    seq = wire.body_of(env.message).get("seq")
                    last_seq = max(last_seq, seq if isinstance(seq, int) else 0)
                    self._absorb(lifetime, env)
        if self._pause.is_set():
            # Everything the kernel published up to now, from its history (kernel events only).
            with client.events(*EVENT_PATTERNS, since_seq=last_seq + 1) as stream:
                while (env := stream.next_event(0.2)) is not None:
                    self._absorb(lifetime, env)

    def run(self) -> None:
        while not self.stop_event.is_set():
            if self._pause.is_set():
                self._paused.set()
                self.stop_event.wait(0.1)  # waiting for the driver's resume
                continue
            if not self.state.up.wait(0.5):
                continue
            lifetime = self.state.current.index
            try:
                with Client(self.state.control, timeout=3.0, name="chaos-events") as client:
                    self._follow(lifetime, client)
            except (KernelUnavailable, MicrokernelError):
                self.stop_event.wait(0.2)  # the daemon went away under us: try the next one
            if self._pause.is_set():
                self._paused.set()


class Sampler(threading.Thread):
    """Status, leases and the daemon's own fds/RSS, every ``SAMPLE_INTERVAL_S``."""

    def __init__(self, state: RunState, stop: threading.Event) -> None:
        super().__init__(name="chaos-sampler", daemon=True)
        self.state = state
        self.stop_event = stop

    def sample_daemon(self, lifetime: Lifetime) -> None:
        try:
            proc = psutil.Process(lifetime.pid)
            sample = (proc.num_fds(), proc.memory_info().rss / 2**20)
        except psutil.Error:
            return
        self.state.processes.add_tree(lifetime.pid)
        now = time.monotonic()
        if lifetime.ready_at is not None and lifetime.ended is None:
            if lifetime.warm is None and now - lifetime.ready_at >= WARMUP_S:
                lifetime.warm = sample
            if lifetime.warm is not None:
                lifetime.last = sample

    def sample_kernel(self, client: Client) -> None:
        status = client.status()
        for service in status.get("services") or ():
            for rep in service.get("replicas") or ():
                self.state.processes.add(rep.get("pid"), f"status:{service.get('name')}")
        standby = (status.get("kernel") or {}).get("standby") or {}
        self.state.processes.add(standby.get("pid"), "status:standby")
        leases = client.leases()
        problems = check_leases(leases)
        with self.state.lock:
            self.state.lease_samples += 1
            self.state.leases_seen_max = max(self.state.leases_seen_max, len(leases.get("leases") or ()))
            self.state.lease_problems.extend(problems)

    def run(self) -> None:
        client: Client | None = None
        try:
            while not self.stop_event.wait(SAMPLE_INTERVAL_S):
                if not self.state.lifetimes:
                    continue
                lifetime = self.state.current
                if lifetime.ended is None:
                    self.sample_daemon(lifetime)
                if not self.state.up.is_set():
                    continue
                try:
                    if client is None:
                        client = Client(self.state.control, timeout=3.0, name="chaos-sampler")
                    self.sample_kernel(client)
                except KernelUnavailable:
                    if client is not None:
                        client.close()
                    client = None
                except MicrokernelError:
                    pass  # a timeout while the daemon is killed or busy: the next round asks again
        finally:
            if client is not None:
                client.close()
