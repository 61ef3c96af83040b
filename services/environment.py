"""The replica's place in the system, read from the ``MK_*`` environment the kernel sets.

The kernel makes a service real through its child's environment (see ``docs/protocol.md`` and the
kernel's ``supervisor/launch.py``); this module is the one place that reads it back, validates it
and reports every problem at once, naming the variables. That includes the replica's resources:
its GPU lease (``MK_GPU_LEASE``, ``MK_GPU_MEMORY_FRACTION``) and its CPU budget (``MK_CPU_THREADS``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from protocols.credentials import TOKEN_ENV

LEASE_ENV = "MK_GPU_LEASE"
FRACTION_ENV = "MK_GPU_MEMORY_FRACTION"
CPU_THREADS_ENV = "MK_CPU_THREADS"

REQUIRED = (
    "MK_SERVICE",
    "MK_REPLICA",
    "MK_INCARNATION",
    "MK_CONTROL_ENDPOINT",
    "MK_EVENTS_IN_ENDPOINT",
    "MK_EVENTS_OUT_ENDPOINT",
    "MK_ENDPOINT",
)
DEFAULT_HEARTBEAT_INTERVAL = 1.0


class EnvironmentProblem(Exception):
    """The ``MK_*`` environment is missing variables or has invalid values (one line per problem)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaEnvironment:
    """Everything a replica learns from the kernel at start."""

    service: str
    replica: int
    incarnation: int
    control_endpoint: str
    events_in_endpoint: str
    events_out_endpoint: str
    endpoint: str
    runtime_dir: str | None = None
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    config: dict[str, Any] = field(default_factory=dict)
    max_message_size: int | None = None
    kernel_pid: int | None = None
    log_level: str = "INFO"
    heartbeat_board: str | None = None
    """Path of the kernel's heartbeat board (same-host liveness without messages), if any."""
    heartbeat_slot: int | None = None
    control_token: str = ""
    """The kernel's secret for this replica (``MK_CONTROL_TOKEN``), sent with its control requests."""

    @property
    def identity(self) -> str:
        """``svc:<service>.<replica>.<incarnation>``: the control DEALER identity and the wire sender."""
        return f"svc:{self.service}.{self.replica}.{self.incarnation}"

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> "ReplicaEnvironment":
        """Parse and validate ``environ``; raises ``EnvironmentProblem`` listing every problem."""
        problems: list[str] = []
        missing = [name for name in REQUIRED if not environ.get(name)]
        if missing:
            problems.append(f"missing environment variable{'s' if len(missing) > 1 else ''}: {', '.join(missing)}")

        def integer(name: str, minimum: int = 0) -> int | None:
            raw = environ.get(name)
            if not raw:
                return None
            try:
                value = int(raw)
            except ValueError:
                problems.append(f"{name}={raw!r} is not an integer")
                return None
            if value < minimum:
                problems.append(f"{name}={raw!r} must be >= {minimum}")
                return None
            return value

        replica = integer("MK_REPLICA")
        incarnation = integer("MK_INCARNATION")
        max_size = integer("MK_MAX_MESSAGE_SIZE", minimum=1)
        kernel_pid = integer("MK_KERNEL_PID", minimum=1)
        heartbeat_slot = integer("MK_HEARTBEAT_SLOT")

        interval = DEFAULT_HEARTBEAT_INTERVAL
        raw_interval = environ.get("MK_HEARTBEAT_INTERVAL")
        if raw_interval:
            try:
                interval = float(raw_interval)
                if not math.isfinite(interval) or interval <= 0:
                    raise ValueError
            except ValueError:
                problems.append(f"MK_HEARTBEAT_INTERVAL={raw_interval!r} must be a positive number of seconds")

        config: dict[str, Any] = {}
        raw_config = environ.get("MK_CONFIG")
        if raw_config:
            try:
                parsed = json.loads(raw_config)
            except json.JSONDecodeError as exc:
                problems.append(f"MK_CONFIG is not valid JSON: {exc}")
            else:
                if isinstance(parsed, dict):
                    config = parsed
                else:
                    problems.append(f"MK_CONFIG must be a JSON object, got {type(parsed).__name__}")

        if problems:
            raise EnvironmentProblem(problems)
        assert replica is not None and incarnation is not None  # guaranteed by REQUIRED
        return cls(
            service=environ["MK_SERVICE"],
            replica=replica,
            incarnation=incarnation,
            control_endpoint=environ["MK_CONTROL_ENDPOINT"],
            events_in_endpoint=environ["MK_EVENTS_IN_ENDPOINT"],
            events_out_endpoint=environ["MK_EVENTS_OUT_ENDPOINT"],
            endpoint=environ["MK_ENDPOINT"],
            runtime_dir=environ.get("MK_RUNTIME_DIR") or None,
            heartbeat_interval=interval,
            config=config,
            max_message_size=max_size,
            kernel_pid=kernel_pid,
            log_level=environ.get("MK_LOG_LEVEL") or "INFO",
            heartbeat_board=environ.get("MK_HEARTBEAT_BOARD") or None,
            heartbeat_slot=heartbeat_slot,
            control_token=environ.get(TOKEN_ENV, ""),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuLease:
    """A GPU lease as a replica sees it (``Service.lease``, ``Service.acquire_lease``).

    ``devices`` are UUIDs in ``CUDA_VISIBLE_DEVICES`` order (``cuda:i`` is ``devices[i]`` in a
    process started with :attr:`env`); ``memory[i]`` is the byte budget on ``devices[i]`` and
    ``fractions[i]`` that budget as a share of the device. ``env`` is the environment that makes
    the lease real in a process started with it.
    """

    id: str
    devices: tuple[str, ...]
    memory: tuple[int, ...]
    mode: str
    fractions: tuple[float, ...] = ()
    env: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A plain (JSON- and msgpack-ready) form."""
        return {"id": self.id, "devices": list(self.devices), "memory": list(self.memory), "mode": self.mode,
                "fractions": list(self.fractions), "env": dict(self.env)}


def gpu_lease(environ: Mapping[str, str]) -> GpuLease | None:
    """The lease described by ``environ`` (``MK_GPU_LEASE`` and ``MK_GPU_MEMORY_FRACTION``); ``None``
    without one. Raises ``ValueError`` when the variables are malformed."""
    raw = environ.get(LEASE_ENV, "")
    if not raw:
        return None
    try:
        data = json.loads(raw)
        devices = tuple(str(d) for d in data["devices"])
        memory = tuple(int(b) for b in data["memory"])
        lease_id, mode = str(data["id"]), str(data["mode"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{LEASE_ENV}={raw!r} is not a lease: {exc}") from None
    fractions_raw = environ.get(FRACTION_ENV, "")
    try:
        fractions = tuple(float(f) for f in fractions_raw.split(",")) if fractions_raw else ()
    except ValueError:
        raise ValueError(f"{FRACTION_ENV}={fractions_raw!r} is not a list of fractions") from None
    keys = ("CUDA_VISIBLE_DEVICES", LEASE_ENV, FRACTION_ENV)
    env = {k: environ[k] for k in keys if k in environ}
    return GpuLease(id=lease_id, devices=devices, memory=memory, mode=mode, fractions=fractions, env=env)


def cpu_threads(environ: Mapping[str, str]) -> int | None:
    """The replica's CPU budget in threads (``MK_CPU_THREADS``), ``None`` without one."""
    raw = environ.get(CPU_THREADS_ENV, "")
    try:
        value = int(raw) if raw else None
    except ValueError:
        return None
    return value if value is not None and value > 0 else None
