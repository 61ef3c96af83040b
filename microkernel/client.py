"""The Python client of microkerneld: control requests, direct service calls and events.

Two flavours with the same methods::

    with Client() as c:                      # blocking: scripts, notebooks, worker threads
        c.wait_ready("echo")
        print(c.call("echo", "echo", text="hi"))

    async with AsyncClient() as c:           # asyncio
        await c.wait_ready("echo")
        async for env in c.events("service.*"):
            ...

Only the control endpoint must be known; it is, in order: the ``endpoint`` argument, the control
socket in an explicit ``runtime_dir``, ``$MICROKERNEL_ENDPOINT``, the control socket in the
default runtime directory (``protocols.endpoints.default_runtime_dir``). The event endpoint
comes from the kernel itself (``events_reply.endpoint``); service endpoints from look-ups.

Threads: a client owns ZeroMQ sockets, and those must not be used from two threads at once.
Create one ``Client`` per thread (cheap: they share the process-wide ZeroMQ context). An
``AsyncClient`` belongs to the event loop that first used it.

Errors: a kernel that is not running raises ``KernelUnavailable`` (code ``unavailable``) quickly;
an error reply raises ``protocols.errors.RemoteError`` (``.code``, ``.reason``); no reply within
the timeout from a kernel that did answer before raises ``protocols.errors.CallTimeout``;
``wait_ready`` raises ``ServiceFailed`` when the service fails.
"""

from __future__ import annotations

import builtins
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from protocols import messages, wire
from protocols.directory import SyncDirectory
from protocols.errors import CallTimeout, RemoteError
from protocols.subscription import SyncSubscriber
from protocols.transport import SyncRequester

from microkernel.async_client import AsyncClient
from microkernel.client_base import (
    PING_REQUEST,
    CONTROL_MAX_MESSAGE_SIZE,
    DEFAULT_TIMEOUT,
    READINESS_PATTERNS,
    KernelUnavailable,
    ServiceFailed,
    check_reachable,
    describe_progress,
    event_service,
    events_address,
    failed_error,
    lease_acquire,
    lifecycle_timeout,
    no_reply,
    readiness,
    resolve_endpoint,
    service_entry,
    status_request,
    top_rows,
)
from microkernel.security.keys import client_context
from microkernel.client_events import NO_MATCH_PATTERN, AsyncEventStream, EventStream, HistoryReplay

__all__ = [
    "AsyncClient",
    "AsyncEventStream",
    "CallTimeout",
    "Client",
    "EventStream",
    "KernelUnavailable",
    "RemoteError",
    "ServiceFailed",
    "resolve_endpoint",
]


class Client:
    """Blocking client of one kernel. Use one per thread; close it (or use ``with``)."""

    def __init__(
        self,
        endpoint: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        name: str = "client",
        *,
        runtime_dir: str | os.PathLike[str] | None = None,
        client_key: str | os.PathLike[str] | None = None,
        server_key: str | os.PathLike[str] | None = None,
    ) -> None:
        self.endpoint = resolve_endpoint(endpoint, runtime_dir)
        self.timeout = timeout
        self.name = name
        check_reachable(self.endpoint)
        # tcp + keys (arguments, else $MICROKERNEL_CLIENT_KEY / $MICROKERNEL_SERVER_KEY): CURVE sockets.
        self._ctx, self._own_ctx = client_context(self.endpoint, client_key, server_key)
        self._control = SyncRequester(self._ctx, [self.endpoint], sender=name, max_size=CONTROL_MAX_MESSAGE_SIZE)
        self._directory = SyncDirectory(self._ctx, self._control, sender=name)
        self._contacted = False  # has the kernel ever answered? (tells "down" from "slow")
        self._events_endpoint: str | None = None

    # -- plumbing --

    def _request(self, message: Any, timeout: float | None = None) -> Any:
        """One control round trip; returns the typed reply body."""
        return self._round_trip(self._control.request, message, timeout).message

    def _request_map(self, message: Any, timeout: float | None = None) -> dict[str, Any]:
        """One control round trip; returns the reply's fields as a plain dict."""
        if self._contacted and timeout is None:  # the steady case: _round_trip would only pass it on
            return self._control.request_map(message, timeout=self.timeout)
        return self._round_trip(self._control.request_map, message, timeout)

    def _round_trip(self, exchange: Callable[..., Any], message: Any, timeout: float | None) -> Any:
        t = self.timeout if timeout is None else timeout
        if not self._contacted and t > self.timeout:
            self._request(PING_REQUEST)  # a dead kernel must not cost a long timeout
        try:
            reply = exchange(message, timeout=t)
        except CallTimeout:
            if not self._contacted:
                raise no_reply(self.endpoint, t) from None
            raise
        self._contacted = True
        return reply

    def _events_url(self) -> str:
        if self._events_endpoint is None:
            reply = self._request(messages.EventsRequest(since_seq=0, pattern=NO_MATCH_PATTERN, limit=1))
            self._events_endpoint = events_address(reply.endpoint, self.endpoint)
        return self._events_endpoint

    def _subscribe(self, patterns: Sequence[str]) -> SyncSubscriber:
        return SyncSubscriber(self._ctx, self._events_url(), list(patterns) or ["*"], timeout=self.timeout,
                              max_size=CONTROL_MAX_MESSAGE_SIZE)

    def _service_status(self, name: str) -> dict[str, Any]:
        return service_entry(self._request(messages.StatusRequest(service=name)), name)

    # -- control plane --

    def ping(self) -> dict[str, Any]:
        """The kernel's identity: ``{version, pid, uptime_s}``."""
        return self._request_map(PING_REQUEST)

    def status(self, service: str | None = None, *, brief: bool = False) -> dict[str, Any]:
        """``{kernel, services}`` (see the StatusReply in docs/protocol.md); one service if named.

        ``brief``: each service's name, state, desired and ready replicas and restarts only (no
        replicas, resources or endpoints): a fraction of the bytes, for health checks and polling.
        """
        return self._request_map(status_request(service, brief))

    def list(self) -> builtins.list[dict[str, Any]]:
        """The configured services and their specs."""
        return builtins.list(self._request(messages.ListRequest()).services)

    def start(self, name: str, wait: bool = True, *, timeout: float | None = None) -> dict[str, Any]:
        """Start a service; with ``wait`` the reply comes once it is ready. ``{service, state}``."""
        return self._request_map(messages.StartRequest(service=name, wait=wait), lifecycle_timeout(timeout))

    def stop(self, name: str, *, timeout: float | None = None) -> dict[str, Any]:
        """Stop every replica of a service (SIGTERM, SIGKILL after its grace). ``{service, state}``."""
        return self._request_map(messages.StopRequest(service=name), lifecycle_timeout(timeout))

    def restart(self, name: str, wait: bool = True, *, timeout: float | None = None) -> dict[str, Any]:
        """Stop then start a service. ``{service, state}``."""
        return self._request_map(messages.RestartRequest(service=name, wait=wait), lifecycle_timeout(timeout))

    def scale(self, name: str, replicas: int, wait: bool = True, *, timeout: float | None = None) -> dict[str, Any]:
        """Change the replica count. ``{service, replicas, previous}``."""
        msg = messages.ScaleRequest(service=name, replicas=replicas, wait=wait)
        return self._request_map(msg, lifecycle_timeout(timeout))

    def lookup(self, name: str) -> dict[str, Any]:
        """Where a service is served: ``{service, endpoints, methods, ready, replicas}``."""
        return self._request_map(messages.LookupRequest(service=name))

    def shutdown(self) -> dict[str, Any]:
        """Ask the kernel to stop every service and exit. ``{services}``."""
        return self._request_map(messages.ShutdownRequest())

    def add_service(
        self,
        name: str,
        *,
        entry: str | None = None,
        command: Sequence[str] | None = None,
        replicas: int = 1,
        config: dict[str, Any] | None = None,
        options: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Add a service at run time (and start it unless ``options["autostart"]`` is false). ``{name, state}``.

        A ``command``, an entry that is neither configured nor a ``microkernel.services`` entry point,
        or ``options`` ``python``/``env``/``cwd`` need the ``admin`` role (else ``forbidden``).
        """
        msg = messages.AddServiceRequest(name=name, entry=entry, command=None if command is None else builtins.list(command),
                                         replicas=replicas, config=config or {}, options=options or {})
        return self._request_map(msg, lifecycle_timeout(timeout))

    def remove_service(self, name: str, *, timeout: float | None = None) -> dict[str, Any]:
        """Stop every replica of a service and forget it. ``{name}``."""
        return self._request_map(messages.RemoveServiceRequest(name=name), lifecycle_timeout(timeout))

    def reload(self, *, timeout: float | None = None) -> dict[str, Any]:
        """Re-read the kernel's configuration file and apply the difference.

        ``{source, started, stopped, restarted, scaled, updated, unchanged, warnings}``; an invalid
        file raises ``RemoteError`` with code ``invalid_config`` and nothing changes.
        """
        return self._request_map(messages.ReloadRequest(), lifecycle_timeout(timeout))

    def logs(
        self,
        service: str,
        lines: int = 100,
        *,
        replica: int | None = None,
        cursor: dict[str, int] | None = None,
        wait_s: float = 0.0,
    ) -> dict[str, Any]:
        """A service's captured stdout/stderr: ``{service, lines, cursor, path}``.

        Without ``cursor`` the last ``lines`` records; with the ``cursor`` of a previous reply the
        records written since, the kernel waiting up to ``wait_s`` seconds for some (following).
        """
        request = messages.LogsRequest(service=service, lines=lines, replica=replica, cursor=cursor, wait_s=wait_s)
        return self._request_map(request, self.timeout + wait_s)

    # -- resources --

    def top(self) -> builtins.list[dict[str, Any]]:
        """One row per replica: state, CPU %, RSS vs budget, threads, GPU memory vs lease, restarts, uptime."""
        return top_rows(self.status())

    def leases(self) -> dict[str, Any]:
        """The GPU inventory: ``{source, devices, leases, holders, waiters, skipped}``."""
        return self._request_map(messages.LeasesRequest())

    def acquire_lease(
        self,
        count: int = 1,
        memory: int | str = 0,
        mode: str = "exclusive",
        *,
        priority: int = 0,
        timeout: float | None = None,
        pid: int | None = None,
    ) -> dict[str, Any]:
        """Ask for a GPU lease (``memory`` per device, e.g. ``"8GiB"``; 0 = whole devices, exclusive).

        Waits in the kernel's fair queue up to ``timeout`` seconds (``None``: the client's timeout;
        0: only try now). Returns ``{lease, env}``: ``env`` makes the lease real in a process started
        with it. The lease is this client connection's until ``release_lease`` — or until process
        ``pid`` exits, when given. Raises ``RemoteError`` with code ``timeout`` when not granted in time.
        """
        request, wait = lease_acquire(count, memory, mode, priority, timeout, pid, self.timeout)
        return self._request_map(request, wait)

    def release_lease(self, lease_id: str) -> bool:
        """Give a lease back; False if it was not held (already released, or its process exited)."""
        return bool(self._request(messages.LeaseReleaseRequest(lease_id=lease_id)).released)

    # -- data plane --

    def call(self, service: str, method: str, /, *, timeout: float | None = None, **args: Any) -> Any:
        """Call ``method`` of ``service`` directly on one of its ready replicas; returns the result.

        Keyword arguments are the RPC's arguments, except ``timeout`` (this call's own, default
        the client's); use ``call_args`` for an RPC argument of that name. Error replies raise
        ``RemoteError`` (``unknown_method``, ``handler_error``, ``not_ready`` …).
        """
        return self.call_args(service, method, args, timeout=timeout)

    def call_args(self, service: str, method: str, args: dict[str, Any], *, timeout: float | None = None) -> Any:
        """``call`` with the RPC arguments as a dict (for names that clash with ``timeout``)."""
        if not self._contacted:
            self._request(PING_REQUEST)  # tell "no kernel" from "slow service"
        return self._directory.call(service, method, args, timeout=self.timeout if timeout is None else timeout)

    def call_many(self, service: str, method: str, calls: Iterable[dict[str, Any]], *, window: int = 64,
                  timeout: float | None = None) -> Iterator[Any]:
        """Call ``method`` of ``service`` once per argument map in ``calls``, with up to ``window``
        calls in flight at once over the data plane (pipelined, spread over its ready replicas);
        yields the results in the order of ``calls``.

        For many small calls this is two to three times the rate of ``call`` in a loop.
        ``calls`` is read lazily (at most ``window`` ahead), so it may be a generator. Each call has
        its own ``timeout`` (default the client's), counted from its sending. A failed call raises
        when its result is due, after every earlier result; the calls still in flight are then
        abandoned.
        """
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        if not self._contacted:
            self._request(PING_REQUEST)  # tell "no kernel" from "slow service"
        return self._directory.call_many(service, method, calls, window=window,
                                         timeout=self.timeout if timeout is None else timeout)

    # -- events --

    def events(self, *patterns: str, since_seq: int | None = None) -> EventStream:
        """Subscribe to events matching the glob ``patterns`` (all events without patterns).

        Returns once the subscription is live. With ``since_seq``, kernel events with
        ``seq >= since_seq`` still in the kernel's history come first, then the live stream,
        without duplicates.
        """
        subscriber = self._subscribe(patterns)
        try:
            replay = None
            if since_seq is not None:
                replay = HistoryReplay(since_seq, subscriber.patterns)
                while not replay.done:
                    replay.absorb(self._request(replay.request()))
        except BaseException:
            subscriber.close()
            raise
        return EventStream(subscriber, replay)

    def wait_ready(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        """Return the service's status once all its desired replicas are ready.

        Subscribes first, then checks the status, then re-checks on each event about the
        service, so a change between the check and the wait cannot be missed. Raises
        ``ServiceFailed`` if the service fails and ``CallTimeout`` after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        with EventStream(self._subscribe(READINESS_PATTERNS)) as stream:
            entry = self._service_status(name)
            while True:
                verdict = readiness(entry)
                if verdict == "ready":
                    return entry
                if verdict == "failed":
                    raise failed_error(name, entry)
                left = deadline - time.monotonic()
                env = stream.next_event(left) if left > 0 else None
                if env is None:
                    raise CallTimeout(f"service {name!r} not ready within {timeout:g}s ({describe_progress(entry)})")
                if event_service(env) != name and not env.topic.startswith("supervisor."):
                    continue  # a group escalation may fail this service without naming it
                if env.msg_type == "service.failed":
                    raise failed_error(name, self._service_status(name), wire.body_of(env.message).get("reason"))
                entry = self._service_status(name)

    # -- lifetime --

    def close(self) -> None:
        """Close every socket of this client."""
        self._directory.close()
        self._control.close()
        if self._own_ctx:
            self._ctx.destroy(linger=0)  # also ends event streams still open on it
            self._own_ctx = False

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.endpoint!r})"
