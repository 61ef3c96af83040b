"""What both clients share: errors, where the kernel is, and when a service counts as ready.

Kept free of sockets so the policy (endpoint precedence, readiness verdicts, error texts) is
unit-testable in isolation; ``microkernel.client`` is the public facade.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from typing import Any

from protocols import messages, wire
from protocols.endpoints import ENDPOINT_ENV, KernelEndpoints, default_runtime_dir, ipc_path
from protocols.errors import ErrorCode, MicrokernelError
from microkernel.units import UnitError, parse_size

__all__ = [
    "DEFAULT_TIMEOUT",
    "CONTROL_MAX_MESSAGE_SIZE",
    "READINESS_PATTERNS",
    "WAIT_TIMEOUT",
    "KernelUnavailable",
    "ServiceFailed",
    "check_reachable",
    "describe_progress",
    "event_service",
    "failed_error",
    "lease_acquire",
    "lifecycle_timeout",
    "no_reply",
    "readiness",
    "resolve_endpoint",
    "service_entry",
    "top_rows",
]

DEFAULT_TIMEOUT = 10.0
# The largest message a client accepts from the kernel (control replies, events): the kernel's own
# default limit. ZeroMQ refuses a frame of 4x this (transport.frame_size_limit) before buffering it.
CONTROL_MAX_MESSAGE_SIZE = 64 * 1024 * 1024
# start/restart/scale with wait=True and stop are answered only once replicas are ready (model
# loads take minutes) or gone (stop grace then SIGKILL): a short request timeout would misfire.
WAIT_TIMEOUT = 120.0


def lifecycle_timeout(timeout: float | None) -> float:
    """The request timeout of start/stop/restart/scale: the caller's, else ``WAIT_TIMEOUT``."""
    return WAIT_TIMEOUT if timeout is None else timeout


# Patterns that carry every change of a service's readiness.
READINESS_PATTERNS = ("service.*", "supervisor.*")


class KernelUnavailable(MicrokernelError):
    """microkerneld cannot be reached at ``endpoint`` (not running, stale socket, no reply)."""

    def __init__(self, endpoint: str, reason: str) -> None:
        super().__init__(ErrorCode.UNAVAILABLE, reason, {"endpoint": endpoint})
        self.endpoint = endpoint


class ServiceFailed(MicrokernelError):
    """``wait_ready``: the service reached ``failed`` (its restart intensity was exceeded)."""

    def __init__(self, service: str, reason: str, status: dict[str, Any] | None = None) -> None:
        super().__init__(ErrorCode.BAD_STATE, reason, {"service": service})
        self.service = service
        self.status = status


def resolve_endpoint(endpoint: str | None = None, runtime_dir: str | os.PathLike[str] | None = None) -> str:
    """The control endpoint to use; explicit arguments beat the environment."""
    if endpoint:
        return endpoint
    if runtime_dir is not None:
        return KernelEndpoints.in_runtime_dir(runtime_dir).control
    from_env = os.environ.get(ENDPOINT_ENV)
    if from_env:
        return from_env
    return KernelEndpoints.in_runtime_dir(default_runtime_dir()).control


def check_reachable(endpoint: str) -> None:
    """Fail fast with ``KernelUnavailable`` when an ``ipc://`` control socket has no listener.

    ZeroMQ would happily queue requests for a socket file that does not exist (yet), so without
    this check a missing kernel costs a whole request timeout. Other transports are checked by
    the first request's timeout instead.
    """
    path = ipc_path(endpoint)
    if path is None or str(path).startswith("@"):  # tcp://, or a Linux abstract socket
        return
    hint = "is microkerneld running?"
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise KernelUnavailable(endpoint, f"{hint} no socket at {path}") from None
    except PermissionError:
        raise KernelUnavailable(endpoint, f"permission denied on {path} (the runtime directory belongs to another user?)") from None
    except OSError as exc:
        raise KernelUnavailable(endpoint, f"{hint} cannot use {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise KernelUnavailable(endpoint, f"{path} exists but is not a socket")
    # A kernel that crashed leaves its socket file behind; a plain connect tells the difference
    # in microseconds (the listener sees a connection that closes before the ZMTP greeting).
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        raise KernelUnavailable(endpoint, f"{hint} {path} exists but nothing listens on it (stale socket of a kernel that died?)") from None
    except OSError as exc:
        if exc.errno == errno.EACCES:
            raise KernelUnavailable(endpoint, f"permission denied on {path}") from None
        # Anything else (e.g. a full accept backlog): let the request timeout decide.
    finally:
        probe.close()


def no_reply(endpoint: str, timeout: float) -> KernelUnavailable:
    """The error for a kernel that never answered (tcp endpoints, or a wedged daemon)."""
    if endpoint.startswith("tcp://"):
        # A kernel's CURVE authenticator refuses unknown keys silently: all the client sees is no reply.
        return KernelUnavailable(endpoint, f"no reply from microkerneld at {endpoint} within {timeout:g}s; is it running, "
                                           "and if the kernel uses CURVE, is your key authorized (and are "
                                           "--client-key/--server-key or $MICROKERNEL_CLIENT_KEY/$MICROKERNEL_SERVER_KEY set)?")
    return KernelUnavailable(endpoint, f"no reply from microkerneld at {endpoint} within {timeout:g}s (is it running?)")


_WILDCARD_HOSTS = ("0.0.0.0", "*", "[::]", "::")


def events_address(events: str, control: str) -> str:
    """Where to subscribe: the kernel's event endpoint, with a wildcard tcp host (``tcp://0.0.0.0:…``,
    what a kernel binds to listen everywhere) replaced by the host the control endpoint reached."""
    if not (events.startswith("tcp://") and control.startswith("tcp://")):
        return events
    host, _, port = events[len("tcp://"):].rpartition(":")
    if host not in _WILDCARD_HOSTS:
        return events
    control_host = control[len("tcp://"):].rpartition(":")[0]
    return f"tcp://{control_host}:{port}"


def service_entry(reply: messages.StatusReply, name: str) -> dict[str, Any]:
    """The status map of service ``name`` in a status reply."""
    for entry in reply.services:
        if entry.get("name") == name:
            return entry
    raise MicrokernelError(ErrorCode.UNKNOWN_SERVICE, f"the kernel's status has no service {name!r}")


def readiness(entry: dict[str, Any]) -> str | None:
    """``"ready"`` when every desired replica is ready, ``"failed"``, or None (keep waiting)."""
    if entry.get("state") == "failed":
        return "failed"
    desired = int(entry.get("desired_replicas") or 0)
    ready = int(entry.get("ready_replicas") or 0)
    if desired > 0 and ready >= desired:
        return "ready"
    return None


def describe_progress(entry: dict[str, Any]) -> str:
    """A short account of a service's state for error messages."""
    ready, desired = entry.get("ready_replicas", 0), entry.get("desired_replicas", 0)
    text = f"state {entry.get('state', '?')}, {ready}/{desired} replicas ready"
    exits = [r["last_exit"] for r in entry.get("replicas") or () if r.get("last_exit")]
    exits = [e.get("text") or e.get("kind") for e in exits]
    if exits:
        text += f", last exit {exits[-1]}"
    return text


def event_service(env: wire.Envelope) -> str | None:
    """The ``service`` an event is about, if any."""
    return wire.body_of(env.message).get("service")


def failed_error(name: str, entry: dict[str, Any], reason: str | None = None) -> ServiceFailed:
    """The ``ServiceFailed`` raised by ``wait_ready``."""
    why = f": {reason}" if reason else ""
    return ServiceFailed(name, f"service {name!r} failed{why} ({describe_progress(entry)})", entry)


# The requests monitoring sends in loops, their bodies packed once: only the header is made per send.
PING_REQUEST = wire.pack_message(messages.PingRequest())
_STATUS_REQUESTS = {brief: wire.pack_message(messages.StatusRequest(brief=brief)) for brief in (False, True)}


def status_request(service: str | None, brief: bool) -> Any:
    """The ``status_request`` to send (packed already when it is about every service)."""
    if service is None:
        return _STATUS_REQUESTS[bool(brief)]
    return messages.StatusRequest(service=service, brief=brief)


# How much longer than a lease request may wait in the kernel's queue the client waits for its reply.
LEASE_REPLY_MARGIN = 2.0


def lease_acquire(
    count: int, memory: int | str, mode: str, priority: int, timeout: float | None, pid: int | None, default: float
) -> tuple[messages.LeaseAcquireRequest, float]:
    """The ``lease_acquire_request`` for the client methods, and how long to wait for its reply.

    ``memory`` may be a size string (``"8GiB"``). ``timeout = None`` lets the kernel wait as long as
    the request itself (``default``).
    """
    try:
        nbytes = parse_size(memory, key="memory")
    except UnitError as exc:
        raise MicrokernelError(ErrorCode.INVALID_FIELD, exc.reason) from None
    request = messages.LeaseAcquireRequest(count=count, memory=nbytes, mode=mode, priority=priority,
                                           timeout=timeout, pid=pid)
    return request, default if timeout is None else timeout + LEASE_REPLY_MARGIN


def top_rows(status: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per replica slot of a status reply: what ``mkctl top`` shows (sizes in bytes).

    ``rss_budget`` is the hard memory budget (else the soft one); ``gpu_memory`` the device memory
    the replica uses (known only with NVML) and ``gpu_budget`` what its leases allow, summed over
    their devices (0 per whole-device lease: ``gpu_devices`` counts the devices).
    """
    rows = []
    for service in status.get("services") or ():
        memory = (service.get("resources") or {}).get("memory") or {}
        budget = memory.get("hard") if memory.get("hard") is not None else memory.get("soft")
        for rep in service.get("replicas") or ():
            usage = rep.get("usage") or {}
            leases = rep.get("leases") or []
            used = rep.get("gpu_memory")
            rows.append({
                "service": service.get("name"),
                "replica": rep.get("replica"),
                "incarnation": rep.get("incarnation"),
                "state": rep.get("state"),
                "pid": rep.get("pid"),
                "cpu_percent": usage.get("cpu_percent"),
                "rss": usage.get("rss"),
                "rss_budget": budget,
                "threads": usage.get("threads"),
                "processes": usage.get("processes"),
                "cpus": rep.get("cpus"),
                "gpu_devices": sum(len(lease.get("devices") or ()) for lease in leases),
                "gpu_memory": None if used is None else sum(used.values()),
                "gpu_budget": sum((lease.get("memory") or 0) * len(lease.get("devices") or ()) for lease in leases),
                "restarts": rep.get("restarts", 0),
                "uptime_s": rep.get("uptime_s"),
            })  # fmt: skip
    return rows
