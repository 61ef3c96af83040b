"""The supervisor's vocabulary as data: what to run, how to restart it, and how services are grouped.

These are the OTP child spec and supervisor flags, plus the systemd-style settings (env, cwd,
timeouts) an ML platform engineer expects. They are plain frozen values: the config loader builds
them (with user-facing validation), the supervisor reads them, and reload compares them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

from microkernel.resources.budgets import ServiceResources
from microkernel.supervisor.distributed import DistributedSpec

__all__ = [
    "BackoffSpec",
    "GroupSpec",
    "ReadyMode",
    "RestartType",
    "ServiceSpec",
    "Strategy",
]


class RestartType(StrEnum):
    """When a replica that exited is started again (OTP restart types)."""

    PERMANENT = "permanent"
    """Always restarted, unless it was stopped on request."""
    TRANSIENT = "transient"
    """Restarted only after an abnormal exit (anything but ``exit(0)`` or a requested stop)."""
    TEMPORARY = "temporary"
    """Never restarted."""


class Strategy(StrEnum):
    """What else restarts when one service of a group fails (OTP supervisor strategies)."""

    ONE_FOR_ONE = "one_for_one"
    """Only the failed service."""
    ONE_FOR_ALL = "one_for_all"
    """Every service in the group."""
    REST_FOR_ONE = "rest_for_one"
    """The failed service and those listed after it in the group."""


class ReadyMode(StrEnum):
    """How the supervisor learns that a replica is ready."""

    MESSAGE = "message"
    """The replica sends a ``ready`` message through the SDK (never a timer)."""
    SPAWN = "spawn"
    """The replica counts as running once spawned: for plain commands that do not speak the protocol."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BackoffSpec:
    """Exponential restart backoff, in seconds.

    The first restart after a failure is immediate; the following ones wait ``initial``,
    ``initial * factor``, … capped at ``max``. A replica that stayed up for ``reset_after``
    seconds counts as stable and its failure count starts over.
    """

    initial: float = 0.1
    factor: float = 2.0
    max: float = 30.0
    reset_after: float = 30.0

    def __post_init__(self) -> None:
        if self.initial < 0 or self.max < 0 or self.reset_after < 0:
            raise ValueError(f"backoff durations must not be negative: {self!r}")
        if self.factor < 1:
            raise ValueError(f"backoff factor must be >= 1, got {self.factor!r}")
        if self.max < self.initial:
            raise ValueError(f"backoff max ({self.max!r}) must be >= initial ({self.initial!r})")


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceSpec:
    """How to run one service (all of its replicas) and how to supervise it.

    Exactly one of ``entry`` (``"module:Class"`` or an entry-point name in the
    ``microkernel.services`` group, run by the service runner) and ``command`` (a plain argv)
    must be given. ``ready`` and ``heartbeat`` default from that choice: an entry speaks the
    protocol (``message`` readiness, heartbeats on); a command does not (``spawn``, off).
    """

    name: str
    entry: str | None = None
    command: tuple[str, ...] | None = None
    replicas: int = 1
    restart: RestartType = RestartType.PERMANENT
    depends_on: tuple[str, ...] = ()
    start_timeout: float = 30.0
    stop_timeout: float = 10.0
    """Grace period between SIGTERM and SIGKILL of the replica's process tree."""
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    autostart: bool = True
    intensity: int = 5
    period: float = 60.0
    backoff: BackoffSpec = field(default_factory=BackoffSpec)
    # None here means "derive from entry/command"; __post_init__ always replaces it, so readers
    # see a ReadyMode/bool. Typing the field as the resolved type keeps every reader free of
    # None checks; the ignore is the price of an entry/command-dependent default.
    ready: ReadyMode = None  # type: ignore[assignment]
    heartbeat: bool = None  # type: ignore[assignment]
    config: dict[str, Any] = field(default_factory=dict)
    """Free-form settings handed to the service."""
    group: str | None = None
    python: str | None = None
    """Interpreter for entries; ``None`` means the daemon's own ``sys.executable``."""
    resources: ServiceResources = field(default_factory=ServiceResources)
    """Memory budget, priority, CPUs and GPU lease (see ``docs/resources.md``)."""
    distributed: DistributedSpec | None = None
    """When set, the replicas are the ranks of one torch.distributed group (see ``distributed.py``)."""

    def __post_init__(self) -> None:
        if (self.entry is None) == (self.command is None):
            raise ValueError(f"service {self.name!r}: exactly one of entry and command must be given")
        if self.command is not None:
            # Accept any sequence from programmatic callers, but store an immutable tuple.
            object.__setattr__(self, "command", tuple(self.command))
            if not self.command:
                raise ValueError(f"service {self.name!r}: command must not be empty")
        if self.replicas < 0:
            raise ValueError(f"service {self.name!r}: replicas must be >= 0, got {self.replicas!r}")
        if self.intensity < 0:
            raise ValueError(f"service {self.name!r}: intensity must be >= 0, got {self.intensity!r}")
        if self.period <= 0:
            raise ValueError(f"service {self.name!r}: period must be > 0, got {self.period!r}")
        if self.start_timeout <= 0 or self.stop_timeout < 0:
            raise ValueError(f"service {self.name!r}: timeouts must be positive")
        object.__setattr__(self, "depends_on", tuple(self.depends_on))
        object.__setattr__(self, "restart", RestartType(self.restart))
        # Copies: the spec is frozen, so it must not share mutable state with its caller.
        object.__setattr__(self, "env", dict(self.env))
        object.__setattr__(self, "config", dict(self.config))
        is_entry = self.entry is not None
        if self.ready is None:
            object.__setattr__(self, "ready", ReadyMode.MESSAGE if is_entry else ReadyMode.SPAWN)
        else:
            object.__setattr__(self, "ready", ReadyMode(self.ready))
        if self.heartbeat is None:
            object.__setattr__(self, "heartbeat", is_entry)

    def differs_from(self, other: ServiceSpec) -> bool:
        """True when running replicas must be restarted to move from ``self`` to ``other``.

        ``replicas`` is ignored: a change in count is applied by scaling, not by restarting.
        """
        return any(getattr(self, f.name) != getattr(other, f.name) for f in fields(ServiceSpec) if f.name != "replicas")


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupSpec:
    """Services supervised together under one strategy and one restart-intensity window.

    ``services`` is ordered: for ``rest_for_one``, a failure restarts the failed service and
    every service listed after it.
    """

    name: str
    strategy: Strategy = Strategy.ONE_FOR_ONE
    services: tuple[str, ...] = ()
    intensity: int = 10
    period: float = 60.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "strategy", Strategy(self.strategy))
        object.__setattr__(self, "services", tuple(self.services))
        if self.intensity < 0:
            raise ValueError(f"group {self.name!r}: intensity must be >= 0, got {self.intensity!r}")
        if self.period <= 0:
            raise ValueError(f"group {self.name!r}: period must be > 0, got {self.period!r}")
