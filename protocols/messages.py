"""Every message of protocol version 1, as typed frozen dataclasses.

Naming: requests are ``<action>_request`` answered by ``<action>_reply``; one-way messages are
bare nouns (``heartbeat``); events are ``<noun>.<past-verb>`` and travel on the event bus.
Nested structures (replica status, exit reasons) are msgpack maps documented in
``docs/protocol.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from protocols.registry import message

_frozen = dataclass(frozen=True, slots=True, kw_only=True)


# --- errors ----------------------------------------------------------------------------------


@message("error_reply")
@_frozen
class ErrorReply:
    """The body of every reply whose header has ``status = "error"``."""

    code: str
    reason: str
    details: dict[str, Any] = field(default_factory=dict)


# --- control plane: clients -> kernel ----------------------------------------------------------


@message("ping_request")
@_frozen
class PingRequest:
    """Liveness probe of the kernel; the cheapest control round trip."""


@message("ping_reply")
@_frozen
class PingReply:
    """The kernel's identity."""

    version: str
    pid: int
    uptime_s: float


@message("status_request")
@_frozen
class StatusRequest:
    """Status of one service (``service`` set) or of the whole kernel; ``brief``: states only."""

    service: str | None = None
    brief: bool = False


@message("status_reply")
@_frozen
class StatusReply:
    """Kernel summary plus one map per service (see *ServiceStatus* in the spec)."""

    kernel: dict[str, Any]
    services: list[dict[str, Any]]


@message("list_request")
@_frozen
class ListRequest:
    """The configured services and their specs."""


@message("list_reply")
@_frozen
class ListReply:
    """One map per configured service (see *ServiceSummary* in the spec)."""

    services: list[dict[str, Any]]


@message("start_request")
@_frozen
class StartRequest:
    """Start a stopped or failed service (all its replicas)."""

    service: str
    wait: bool = True


@message("start_reply")
@_frozen
class StartReply:
    """The service's state once the start completed (or was initiated, with ``wait = false``)."""

    service: str
    state: str


@message("stop_request")
@_frozen
class StopRequest:
    """Stop every replica of a service: SIGTERM to the process tree, SIGKILL after the grace."""

    service: str


@message("stop_reply")
@_frozen
class StopReply:
    """The service after the stop."""

    service: str
    state: str


@message("restart_request")
@_frozen
class RestartRequest:
    """Stop then start a service."""

    service: str
    wait: bool = True


@message("restart_reply")
@_frozen
class RestartReply:
    """The service after the restart."""

    service: str
    state: str


@message("scale_request")
@_frozen
class ScaleRequest:
    """Change the number of replicas of a service."""

    service: str
    replicas: int
    wait: bool = True


@message("scale_reply")
@_frozen
class ScaleReply:
    """The new and previous replica counts."""

    service: str
    replicas: int
    previous: int


@message("lookup_request")
@_frozen
class LookupRequest:
    """Where a service's data plane is: the name-service query."""

    service: str


@message("lookup_reply")
@_frozen
class LookupReply:
    """Data-plane endpoints of the ready replicas and the RPC methods they serve."""

    service: str
    endpoints: list[str]
    methods: list[str]
    ready: int
    replicas: int


@message("events_request")
@_frozen
class EventsRequest:
    """Kernel events from the history ring with ``seq >= since_seq`` matching ``pattern``."""

    since_seq: int = 0
    pattern: str = "*"
    limit: int = 1000


@message("events_reply")
@_frozen
class EventsReply:
    """Past kernel events plus where to subscribe for the live stream."""

    endpoint: str
    events: list[dict[str, Any]]
    next_seq: int


@message("shutdown_request")
@_frozen
class ShutdownRequest:
    """Stop every service in reverse dependency order, then the kernel."""


@message("shutdown_reply")
@_frozen
class ShutdownReply:
    """Sent before the kernel begins stopping services."""

    services: int


@message("reload_request")
@_frozen
class ReloadRequest:
    """Re-read the kernel's configuration file and apply the difference to the running services."""


@message("reload_reply")
@_frozen
class ReloadReply:
    """What the reload did: services started, stopped, restarted and scaled, by name.

    ``updated`` lists services whose new spec was recorded without starting them (not running, or
    ``autostart = false``); ``warnings`` says what was not applied (kernel settings that need a
    restart of the daemon, a new service whose memory budget does not fit).
    """

    source: str
    started: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    restarted: list[str] = field(default_factory=list)
    scaled: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: int = 0
    warnings: list[str] = field(default_factory=list)


@message("add_service_request")
@_frozen
class AddServiceRequest:
    """Add (and, unless ``options.autostart`` is false, start) a service that is not configured yet.

    Exactly one of ``entry`` and ``command``. ``options`` holds any other service key of the
    configuration file (``restart``, ``depends_on``, ``memory`` …), validated the same way. An
    ``operator`` may add an entry already configured for a service or one of the
    ``microkernel.services`` entry points; a ``command``, another ``module:Class``, or the keys
    ``python``, ``env``, ``cwd`` need ``admin``.
    """

    name: str
    entry: str | None = None
    command: list[str] | None = None
    replicas: int = 1
    config: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)


@message("add_service_reply")
@_frozen
class AddServiceReply:
    """The added service and its state (``starting`` once its replicas were launched, else ``stopped``)."""

    name: str
    state: str


@message("remove_service_request")
@_frozen
class RemoveServiceRequest:
    """Stop every replica of a service and forget it (until the next reload re-adds a configured one)."""

    name: str


@message("remove_service_reply")
@_frozen
class RemoveServiceReply:
    """The service is gone."""

    name: str


# --- control plane: resources (clients and services -> kernel) -----------------------------------


@message("lease_acquire_request")
@_frozen
class LeaseAcquireRequest:
    """Ask for a GPU lease at run time: ``count`` devices with ``memory`` bytes each (0 = whole devices).

    The holder is the sender: a service replica (its lease is bound to the replica's process) or a
    client connection. ``timeout`` (seconds) bounds the wait in the queue: ``None`` waits until
    shortly before the request's deadline, ``0`` only tries now. ``pid`` binds a client's lease to
    one of its processes: the kernel releases it when that process exits.
    """

    count: int = 1
    memory: int = 0
    mode: str = "exclusive"
    priority: int = 0
    timeout: float | None = None
    pid: int | None = None


@message("lease_acquire_reply")
@_frozen
class LeaseAcquireReply:
    """The granted lease, and the environment that makes it real in a process started with it."""

    lease: dict[str, Any]
    env: dict[str, str]


@message("lease_release_request")
@_frozen
class LeaseReleaseRequest:
    """Give a lease back (any holder may release a lease by id)."""

    lease_id: str


@message("lease_release_reply")
@_frozen
class LeaseReleaseReply:
    """Whether the lease was held (false: unknown or already released)."""

    released: bool


@message("leases_request")
@_frozen
class LeasesRequest:
    """The GPU inventory, every lease and every queued request (``mkctl leases``)."""


@message("leases_reply")
@_frozen
class LeasesReply:
    """Devices with their usage, leases, holders and waiters; ``source`` is where the devices came from."""

    source: str
    devices: list[dict[str, Any]]
    leases: list[dict[str, Any]]
    holders: dict[str, Any]
    waiters: list[dict[str, Any]]
    skipped: dict[str, Any] = field(default_factory=dict)


# --- control plane: service logs ----------------------------------------------------------------


@message("logs_request")
@_frozen
class LogsRequest:
    """Records of a service's captured stdout/stderr (``mkctl logs``).

    Without ``cursor``: the last ``lines`` records. With the ``cursor`` of a previous reply: the
    records appended since (following); when there are none yet the kernel holds the request up
    to ``wait_s`` seconds (capped, and bounded by the request's deadline) and answers as soon as
    new records are written. ``replica`` keeps only that replica's records.
    """

    service: str
    lines: int = 100
    replica: int | None = None
    cursor: dict[str, int] | None = None
    wait_s: float = 0.0


@message("logs_reply")
@_frozen
class LogsReply:
    """Records, oldest first, each ``<time> <replica> <out|err> <text>``, and where to continue."""

    service: str
    lines: list[str]
    cursor: dict[str, int]
    path: str = ""


# --- control plane: services -> kernel ---------------------------------------------------------


@message("heartbeat")
@_frozen
class Heartbeat:
    """One-way liveness signal from a service replica (no reply)."""

    service: str
    replica: int
    incarnation: int


@message("ready_request")
@_frozen
class ReadyRequest:
    """A replica announces it is ready, with its data-plane endpoint and RPC methods."""

    service: str
    replica: int
    incarnation: int
    endpoint: str
    methods: list[str]
    pid: int


@message("ready_reply")
@_frozen
class ReadyReply:
    """Acknowledges readiness."""

    state: str


@message("progress_request")
@_frozen
class ProgressRequest:
    """A starting replica reports progress and extends its start timeout by ``extend_s``."""

    service: str
    replica: int
    incarnation: int
    message: str = ""
    extend_s: float = 0.0


@message("progress_reply")
@_frozen
class ProgressReply:
    """Seconds left before the start timeout fires."""

    deadline_in_s: float


# --- data plane --------------------------------------------------------------------------------


@message("rpc_request")
@_frozen
class RpcRequest:
    """Call ``method`` on a service with keyword arguments ``args``."""

    method: str
    args: dict[str, Any] = field(default_factory=dict)


@message("rpc_reply")
@_frozen
class RpcReply:
    """The handler's return value (any msgpack value, tensors and buffers as extra frames)."""

    result: Any = None


# --- events ------------------------------------------------------------------------------------


@message("kernel.started")
@_frozen
class KernelStarted:
    """The kernel bound its sockets and began starting services."""

    seq: int = 0
    pid: int
    version: str
    control: str
    events: str


@message("kernel.stopping")
@_frozen
class KernelStopping:
    """The kernel began its shutdown."""

    seq: int = 0
    reason: str


@message("kernel.reloaded")
@_frozen
class KernelReloaded:
    """A configuration reload was applied (the names of the services it touched)."""

    seq: int = 0
    source: str
    started: list[str]
    stopped: list[str]
    restarted: list[str]
    scaled: list[str]


@message("service.starting")
@_frozen
class ServiceStarting:
    """A replica is about to be spawned."""

    seq: int = 0
    service: str
    replica: int
    incarnation: int


@message("service.started")
@_frozen
class ServiceStarted:
    """A replica's process was spawned."""

    seq: int = 0
    service: str
    replica: int
    incarnation: int
    pid: int


@message("standby.ready")
@_frozen
class StandbyReady:
    """A warm standby runner has finished its imports: the next eligible replica start will use it."""

    seq: int = 0
    pid: int


@message("service.progress")
@_frozen
class ServiceProgress:
    """A starting replica reported progress (and extended its start timeout)."""

    seq: int = 0
    service: str
    replica: int
    incarnation: int
    message: str


@message("service.ready")
@_frozen
class ServiceReady:
    """A replica announced readiness (or, for ``ready = "spawn"`` commands, was spawned)."""

    seq: int = 0
    service: str
    replica: int
    incarnation: int
    pid: int
    endpoint: str
    startup_ms: float


@message("service.exited")
@_frozen
class ServiceExited:
    """A replica's process exited; ``reason`` is an ExitReason map."""

    seq: int = 0
    service: str
    replica: int
    incarnation: int
    pid: int
    reason: dict[str, Any]
    uptime_s: float
    will_restart: bool


@message("service.backoff")
@_frozen
class ServiceBackoff:
    """A replica waits ``delay_s`` before its next start."""

    seq: int = 0
    service: str
    replica: int
    delay_s: float
    consecutive: int


@message("service.stopping")
@_frozen
class ServiceStopping:
    """A replica is being stopped: SIGTERM sent, SIGKILL after ``grace_s``."""

    seq: int = 0
    service: str
    replica: int
    incarnation: int
    pid: int
    grace_s: float


@message("service.stopped")
@_frozen
class ServiceStopped:
    """A service was stopped on request (every replica is down)."""

    seq: int = 0
    service: str


@message("service.failed")
@_frozen
class ServiceFailed:
    """A service gave up: its restart intensity was exceeded."""

    seq: int = 0
    service: str
    reason: str


@message("service.scaled")
@_frozen
class ServiceScaled:
    """The replica count of a service changed."""

    seq: int = 0
    service: str
    replicas: int
    previous: int


@message("supervisor.escalated")
@_frozen
class SupervisorEscalated:
    """A group's restart intensity was exceeded; the whole group is marked failed."""

    seq: int = 0
    group: str
    service: str
    reason: str


@message("budget.exceeded")
@_frozen
class BudgetExceeded:
    """A replica's process tree went above its soft (``limit = "soft"``, an early warning) or hard
    (``limit = "hard"``, the replica is killed: ``action = "kill"``) memory budget. Sizes in bytes."""

    seq: int = 0
    service: str
    replica: int
    incarnation: int
    pid: int
    rss: int
    soft: int | None = None
    hard: int | None = None
    limit: str
    action: str


@message("budget.cleared")
@_frozen
class BudgetCleared:
    """A replica above its soft budget fell back below it (minus the hysteresis band)."""

    seq: int = 0
    service: str
    replica: int
    incarnation: int
    pid: int
    rss: int
    soft: int | None = None
    hard: int | None = None


@message("memory.pressure")
@_frozen
class MemoryPressure:
    """Host RAM in use went above ``kernel.memory_pressure``: the guard kills this victim."""

    seq: int = 0
    service: str
    replica: int
    incarnation: int
    pid: int
    priority: int
    rss: int
    soft: int | None = None
    hard: int | None = None
    budget: int | None = None
    excess: int
    host_total: int
    host_available: int
    used_fraction: float
    threshold_fraction: float
    candidates: int
    reason: str


@message("lease.violated")
@_frozen
class LeaseViolated:
    """NVML shows a replica on a device it does not lease, or above its lease's budget there."""

    seq: int = 0
    kind: str
    holder: str
    pids: list[int]
    device: str
    used: int
    budget: int
    slack: int
    over: int
    leases: list[str]
    action: str


@message("lease.free_timed_out")
@_frozen
class LeaseFreeTimedOut:
    """A dead replica's device memory was still held after ``gpu.free_timeout``; ``action`` says
    whether its replacement starts anyway (``start``) or the service fails (``fail``)."""

    seq: int = 0
    service: str
    replica: int
    devices: dict[str, int]
    waited_s: float
    action: str
    error: str = ""


@message("kernel.welcome")
@_frozen
class KernelWelcome:
    """Answer to a subscriber's probe topic: its subscriptions before the probe are live."""

    seq: int = 0
    next_seq: int
