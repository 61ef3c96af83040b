"""The replica lifecycle as an explicit state table.

Every state change the supervisor makes goes through :func:`check_transition`, so an impossible
sequence (say, ``ready`` straight to ``starting`` without an exit) is a loud bug, not a silent
inconsistency in ``mkctl status``.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "ALIVE",
    "TRANSITIONS",
    "IllegalTransition",
    "ReplicaState",
    "check_transition",
    "is_alive",
]


class ReplicaState(StrEnum):
    """Where one replica of a service is in its lifecycle."""

    STOPPED = "stopped"
    """Not running and not scheduled to run."""
    WAITING = "waiting"
    """Scheduled, waiting for its dependencies to be ready."""
    STARTING = "starting"
    """Spawned (or being spawned); not yet running."""
    RUNNING = "running"
    """Process up; for ``ready = "message"`` services, readiness not yet announced."""
    READY = "ready"
    """Announced readiness: serving."""
    STOPPING = "stopping"
    """Asked to stop; within its grace period before SIGKILL."""
    EXITED = "exited"
    """The process is gone; the restart policy decides what is next."""
    BACKOFF = "backoff"
    """Waiting out the restart backoff delay."""
    FAILED = "failed"
    """Gave up: the restart intensity was exceeded (or the service may not restart)."""


_S = ReplicaState

TRANSITIONS: dict[ReplicaState, frozenset[ReplicaState]] = {
    _S.STOPPED: frozenset({_S.WAITING, _S.STARTING}),
    _S.WAITING: frozenset({_S.STARTING, _S.STOPPED}),
    _S.STARTING: frozenset({_S.RUNNING, _S.READY, _S.STOPPING, _S.EXITED}),
    _S.RUNNING: frozenset({_S.READY, _S.STOPPING, _S.EXITED}),
    _S.READY: frozenset({_S.STOPPING, _S.EXITED}),
    _S.STOPPING: frozenset({_S.STOPPED, _S.EXITED}),
    _S.EXITED: frozenset({_S.BACKOFF, _S.WAITING, _S.STARTING, _S.STOPPED, _S.FAILED}),
    _S.BACKOFF: frozenset({_S.STARTING, _S.STOPPED, _S.WAITING}),
    _S.FAILED: frozenset({_S.STARTING, _S.STOPPED, _S.WAITING}),
}
"""Legal transitions: ``new in TRANSITIONS[old]``. Staying in the same state is not a transition."""

ALIVE: frozenset[ReplicaState] = frozenset({_S.STARTING, _S.RUNNING, _S.READY, _S.STOPPING})
"""States in which the replica may have a live process that must be stopped or awaited."""


class IllegalTransition(Exception):
    """A state change the transition table does not allow: a supervisor bug."""

    def __init__(self, old: ReplicaState, new: ReplicaState) -> None:
        self.old = old
        self.new = new
        allowed = ", ".join(sorted(TRANSITIONS.get(old, frozenset()))) or "nothing"
        super().__init__(f"illegal replica transition {old} -> {new} (from {old} allowed: {allowed})")


def check_transition(old: ReplicaState, new: ReplicaState) -> None:
    """Raise :class:`IllegalTransition` unless ``old -> new`` is in :data:`TRANSITIONS`."""
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(old, new)


def is_alive(state: ReplicaState) -> bool:
    """True when a replica in ``state`` may have a live process."""
    return state in ALIVE
