"""The supervisor's mutable state: one record per service and per replica.

Every state change goes through ``ReplicaRecord.set_state``, which enforces the explicit
transition table of ``states.py``; the records also build the status maps the control plane
returns.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from microkernel.supervisor.backoff import Backoff
from microkernel.supervisor.intensity import RestartWindow
from microkernel.supervisor.reasons import ExitReason
from microkernel.supervisor.spec import ReadyMode, ServiceSpec
from microkernel.supervisor.states import ReplicaState, check_transition

if TYPE_CHECKING:
    from microkernel.resources.manager import ExitFacts

S = ReplicaState

class ChangeCounter:
    """Counts changes to the fields the status shows, so that status replies can be cached."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


status_changes = ChangeCounter()
"""Bumped by every assignment to a field of a replica or service record that the status shows."""

_REPLICA_STATUS_FIELDS = frozenset({
    "state", "incarnation", "pid", "endpoint", "started_at_ns", "ready_at_ns", "restarts", "last_exit", "detail",
})  # fmt: skip
_SERVICE_STATUS_FIELDS = frozenset({"spec", "desired", "replicas", "failed", "restarts"})

# Which replica state represents a service best when replicas disagree (first wins).
_AGGREGATE_PRIORITY = (S.FAILED, S.STOPPING, S.STARTING, S.BACKOFF, S.WAITING, S.EXITED, S.RUNNING, S.READY, S.STOPPED)


@dataclass(eq=False)
class ReplicaRecord:
    """One replica slot of a service; its process changes at every (re)start (incarnation)."""

    service: str
    index: int
    backoff: Backoff
    state: ReplicaState = S.STOPPED
    incarnation: int = 0
    proc: asyncio.subprocess.Process | None = None
    pid: int | None = None
    endpoint: str | None = None
    methods: list[str] = field(default_factory=list)
    started_at_ns: int | None = None
    ready_at_ns: int | None = None
    started_mono: float = 0.0
    start_deadline: float = 0.0
    restarts: int = 0
    last_exit: ExitReason | None = None
    kill_reason: str | None = None
    kill_detail: str = ""
    exit_facts: ExitFacts | None = None
    """What the resource manager released when the last process exited (restart-after-free)."""
    stop_requested: bool = False
    task: asyncio.Task[None] | None = None
    ready_event: asyncio.Event = field(default_factory=asyncio.Event)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    detail: str = ""
    board_slot: int | None = None
    board_seen_ns: int = 0
    holds_start_slot: bool = False

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if name in _REPLICA_STATUS_FIELDS:
            status_changes.value += 1

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.service, self.index, self.incarnation)

    @property
    def name(self) -> str:
        return f"{self.service}[{self.index}]"

    def set_state(self, new: ReplicaState, detail: str = "") -> None:
        """Move to ``new``; raises IllegalTransition when the table forbids it."""
        if new is not self.state:
            check_transition(self.state, new)
            self.state = new
        self.detail = detail

    def is_up(self, spec: ServiceSpec) -> bool:
        """Ready to serve: announced readiness, or spawned when readiness is ``spawn``."""
        return self.state is S.READY or (self.state is S.RUNNING and spec.ready is ReadyMode.SPAWN)

    def to_status(self) -> dict[str, Any]:
        now_ns = time.time_ns()
        alive = self.state in (S.STARTING, S.RUNNING, S.READY, S.STOPPING)
        return {
            "replica": self.index,
            "incarnation": self.incarnation,
            "state": self.state.value,
            "detail": self.detail,
            "pid": self.pid if alive else None,
            "endpoint": self.endpoint if self.state is S.READY else None,
            "started_at_ns": self.started_at_ns,
            "ready_at_ns": self.ready_at_ns,
            "restarts": self.restarts,
            "last_exit": self.last_exit.to_wire() if self.last_exit else None,
            "uptime_s": (now_ns - self.started_at_ns) / 1e9 if alive and self.started_at_ns else 0.0,
        }


@dataclass(eq=False)
class ServiceRecord:
    """A configured service: its spec, its replica slots and its supervision bookkeeping."""

    spec: ServiceSpec
    window: RestartWindow
    desired: int
    replicas: list[ReplicaRecord] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    up_event: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    failed: bool = False
    restarts: int = 0
    rendezvous_port: int | None = None
    """A distributed service's rendezvous port, chosen at its first spawn and kept across restarts."""

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if name in _SERVICE_STATUS_FIELDS:
            status_changes.value += 1

    @property
    def name(self) -> str:
        return self.spec.name

    def up_count(self) -> int:
        return sum(1 for r in self.replicas if r.is_up(self.spec))

    def refresh(self) -> None:
        """Recompute the readiness event after any replica state change and wake waiters."""
        status_changes.value += 1  # also covers in-place changes of ``replicas`` (scaling)
        if self.up_count() > 0:
            self.up_event.set()
        else:
            self.up_event.clear()
        self.changed.set()
        self.changed = asyncio.Event()

    def aggregate_state(self) -> str:
        if self.failed:
            return S.FAILED.value
        active = self.replicas[: self.desired]
        if not active:
            return S.STOPPED.value
        if all(r.is_up(self.spec) for r in active):
            return S.READY.value if self.spec.ready is ReadyMode.MESSAGE else S.RUNNING.value
        states = {r.state for r in self.replicas}
        for candidate in _AGGREGATE_PRIORITY:
            if candidate in states:
                return candidate.value
        return S.STOPPED.value

    def to_status(self, replica_extra: Callable[[ReplicaRecord], dict[str, Any]] | None = None) -> dict[str, Any]:
        """The *ServiceStatus* map; ``replica_extra`` adds fields to each replica's map (resources)."""
        spec = self.spec
        replicas = [r.to_status() for r in self.replicas]
        if replica_extra is not None:
            for rep, entry in zip(self.replicas, replicas, strict=True):
                entry.update(replica_extra(rep))
        return {
            "name": spec.name,
            "state": self.aggregate_state(),
            "desired_replicas": self.desired,
            "ready_replicas": self.up_count(),
            "restarts": self.restarts,
            "group": spec.group,
            "depends_on": list(spec.depends_on),
            "entry": spec.entry if spec.entry is not None else " ".join(spec.command or ()),
            "resources": spec.resources.to_wire(),
            "replicas": replicas,
        }

    def to_brief(self) -> dict[str, Any]:
        """The brief *ServiceStatus*: what a health check or a dashboard polls."""
        return {
            "name": self.spec.name,
            "state": self.aggregate_state(),
            "desired_replicas": self.desired,
            "ready_replicas": self.up_count(),
            "restarts": self.restarts,
        }

    def to_summary(self) -> dict[str, Any]:
        spec = self.spec
        return {
            "name": spec.name,
            "entry": spec.entry,
            "command": list(spec.command) if spec.command else None,
            "replicas": self.desired,
            "restart": spec.restart.value,
            "group": spec.group,
            "depends_on": list(spec.depends_on),
            "autostart": spec.autostart,
            "ready": spec.ready.value,
        }
