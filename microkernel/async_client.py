"""The asyncio flavour of the client (``microkernel.client.AsyncClient``, documented there).

Sockets are plain ZeroMQ sockets driven by the loop's readiness callbacks
(``protocols.transport.AsyncSocket``), created on first use inside the running loop.
"""

from __future__ import annotations

import builtins
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from protocols import messages, wire
from protocols.directory import AsyncDirectory
from protocols.errors import CallTimeout
from protocols.subscription import AsyncSubscriber
from protocols.transport import AsyncRequester

from microkernel.client_base import (
    PING_REQUEST,
    CONTROL_MAX_MESSAGE_SIZE,
    DEFAULT_TIMEOUT,
    READINESS_PATTERNS,
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
from microkernel.client_events import NO_MATCH_PATTERN, AsyncEventStream, HistoryReplay

__all__ = ["AsyncClient"]


class AsyncClient:
    """asyncio client of one kernel; sockets are created on first use inside the running loop."""

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
        # tcp + keys (arguments, else $MICROKERNEL_CLIENT_KEY / $MICROKERNEL_SERVER_KEY): CURVE sockets.
        self._ctx, self._own_ctx = client_context(self.endpoint, client_key, server_key)
        self._control: AsyncRequester | None = None
        self._directory: AsyncDirectory | None = None
        self._contacted = False
        self._events_endpoint: str | None = None

    # -- plumbing --

    async def connect(self) -> AsyncClient:
        """Open the control socket (done implicitly by every method); idempotent."""
        if self._control is None:
            check_reachable(self.endpoint)
            self._control = AsyncRequester(self._ctx, [self.endpoint], sender=self.name,
                                           max_size=CONTROL_MAX_MESSAGE_SIZE)
            self._directory = AsyncDirectory(self._ctx, self._control, sender=self.name)
        return self

    async def _request(self, message: Any, timeout: float | None = None) -> Any:
        """One control round trip; returns the typed reply body."""
        await self.connect()
        assert self._control is not None
        return (await self._round_trip(self._control.request, message, timeout)).message

    async def _request_map(self, message: Any, timeout: float | None = None) -> dict[str, Any]:
        """One control round trip; returns the reply's fields as a plain dict."""
        await self.connect()
        assert self._control is not None
        return await self._round_trip(self._control.request_map, message, timeout)

    async def _round_trip(self, exchange: Callable[..., Any], message: Any, timeout: float | None) -> Any:
        t = self.timeout if timeout is None else timeout
        if not self._contacted and t > self.timeout:
            await self._request(PING_REQUEST)  # a dead kernel must not cost a long timeout
        try:
            reply = await exchange(message, timeout=t)
        except CallTimeout:
            if not self._contacted:
                raise no_reply(self.endpoint, t) from None
            raise
        self._contacted = True
        return reply

    async def _events_url(self) -> str:
        if self._events_endpoint is None:
            reply = await self._request(messages.EventsRequest(since_seq=0, pattern=NO_MATCH_PATTERN, limit=1))
            self._events_endpoint = events_address(reply.endpoint, self.endpoint)
        return self._events_endpoint

    async def _subscribe(self, patterns: Sequence[str], on_event: Callable[[wire.Envelope], None]) -> AsyncSubscriber:
        subscriber = AsyncSubscriber(self._ctx, await self._events_url(), list(patterns) or ["*"], on_event,
                                     max_size=CONTROL_MAX_MESSAGE_SIZE)
        try:
            await subscriber.wait_live(self.timeout)
        except BaseException:
            subscriber.close()
            raise
        return subscriber

    async def _service_status(self, name: str) -> dict[str, Any]:
        return service_entry(await self._request(messages.StatusRequest(service=name)), name)

    # -- control plane (see Client for the documentation of each) --

    async def ping(self) -> dict[str, Any]:
        """The kernel's identity: ``{version, pid, uptime_s}``."""
        return await self._request_map(PING_REQUEST)

    async def status(self, service: str | None = None, *, brief: bool = False) -> dict[str, Any]:
        """``{kernel, services}``; one service if named; ``brief`` as in ``Client.status``."""
        return await self._request_map(status_request(service, brief))

    async def list(self) -> builtins.list[dict[str, Any]]:
        """The configured services and their specs."""
        return builtins.list((await self._request(messages.ListRequest())).services)

    async def start(self, name: str, wait: bool = True, *, timeout: float | None = None) -> dict[str, Any]:
        """Start a service. ``{service, state}``."""
        return await self._request_map(messages.StartRequest(service=name, wait=wait), lifecycle_timeout(timeout))

    async def stop(self, name: str, *, timeout: float | None = None) -> dict[str, Any]:
        """Stop every replica of a service. ``{service, state}``."""
        return await self._request_map(messages.StopRequest(service=name), lifecycle_timeout(timeout))

    async def restart(self, name: str, wait: bool = True, *, timeout: float | None = None) -> dict[str, Any]:
        """Stop then start a service. ``{service, state}``."""
        return await self._request_map(messages.RestartRequest(service=name, wait=wait), lifecycle_timeout(timeout))

    async def scale(self, name: str, replicas: int, wait: bool = True, *, timeout: float | None = None) -> dict[str, Any]:
        """Change the replica count. ``{service, replicas, previous}``."""
        msg = messages.ScaleRequest(service=name, replicas=replicas, wait=wait)
        return await self._request_map(msg, lifecycle_timeout(timeout))

    async def lookup(self, name: str) -> dict[str, Any]:
        """``{service, endpoints, methods, ready, replicas}``."""
        return await self._request_map(messages.LookupRequest(service=name))

    async def shutdown(self) -> dict[str, Any]:
        """Ask the kernel to stop every service and exit. ``{services}``."""
        return await self._request_map(messages.ShutdownRequest())

    async def add_service(
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
        """Add a service at run time (see ``Client.add_service``). ``{name, state}``."""
        msg = messages.AddServiceRequest(name=name, entry=entry, command=None if command is None else builtins.list(command),
                                         replicas=replicas, config=config or {}, options=options or {})
        return await self._request_map(msg, lifecycle_timeout(timeout))

    async def remove_service(self, name: str, *, timeout: float | None = None) -> dict[str, Any]:
        """Stop every replica of a service and forget it. ``{name}``."""
        return await self._request_map(messages.RemoveServiceRequest(name=name), lifecycle_timeout(timeout))

    async def reload(self, *, timeout: float | None = None) -> dict[str, Any]:
        """Re-read the kernel's configuration file and apply the difference (see ``Client.reload``)."""
        return await self._request_map(messages.ReloadRequest(), lifecycle_timeout(timeout))

    # -- resources --

    async def top(self) -> builtins.list[dict[str, Any]]:
        """One row per replica (see Client.top)."""
        return top_rows(await self.status())

    async def leases(self) -> dict[str, Any]:
        """The GPU inventory: ``{source, devices, leases, holders, waiters, skipped}``."""
        return await self._request_map(messages.LeasesRequest())

    async def acquire_lease(
        self,
        count: int = 1,
        memory: int | str = 0,
        mode: str = "exclusive",
        *,
        priority: int = 0,
        timeout: float | None = None,
        pid: int | None = None,
    ) -> dict[str, Any]:
        """Ask for a GPU lease; ``{lease, env}`` (see Client.acquire_lease)."""
        request, wait = lease_acquire(count, memory, mode, priority, timeout, pid, self.timeout)
        return await self._request_map(request, wait)

    async def release_lease(self, lease_id: str) -> bool:
        """Give a lease back; False if it was not held."""
        return bool((await self._request(messages.LeaseReleaseRequest(lease_id=lease_id))).released)

    # -- data plane --

    async def call(self, service: str, method: str, /, *, timeout: float | None = None, **args: Any) -> Any:
        """Call ``method`` of ``service`` directly on one of its ready replicas."""
        return await self.call_args(service, method, args, timeout=timeout)

    async def call_args(self, service: str, method: str, args: dict[str, Any], *, timeout: float | None = None) -> Any:
        """``call`` with the RPC arguments as a dict."""
        if not self._contacted:
            await self._request(PING_REQUEST)
        assert self._directory is not None
        return await self._directory.call(service, method, args, timeout=self.timeout if timeout is None else timeout)

    # -- events --

    def events(self, *patterns: str, since_seq: int | None = None) -> AsyncEventStream:
        """An async event stream; ``await`` it or ``async with`` it to be sure it is live.

        ``async for env in client.events("service.*")`` also works (it subscribes on the first
        step). ``since_seq`` replays the kernel's history first, without duplicates.
        """

        async def opener(on_event: Callable[[wire.Envelope], None]) -> tuple[AsyncSubscriber, HistoryReplay | None]:
            subscriber = await self._subscribe(patterns, on_event)
            try:
                replay = None
                if since_seq is not None:
                    replay = HistoryReplay(since_seq, subscriber.patterns)
                    while not replay.done:
                        replay.absorb(await self._request(replay.request()))
            except BaseException:
                subscriber.close()
                raise
            return subscriber, replay

        return AsyncEventStream(opener)

    async def wait_ready(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        """Return the service's status once all its desired replicas are ready (see Client)."""
        deadline = time.monotonic() + timeout
        async with self.events(*READINESS_PATTERNS) as stream:
            entry = await self._service_status(name)
            while True:
                verdict = readiness(entry)
                if verdict == "ready":
                    return entry
                if verdict == "failed":
                    raise failed_error(name, entry)
                left = deadline - time.monotonic()
                env = await stream.next_event(left) if left > 0 else None
                if env is None:
                    raise CallTimeout(f"service {name!r} not ready within {timeout:g}s ({describe_progress(entry)})")
                if event_service(env) != name and not env.topic.startswith("supervisor."):
                    continue  # a group escalation may fail this service without naming it
                if env.msg_type == "service.failed":
                    raise failed_error(name, await self._service_status(name), wire.body_of(env.message).get("reason"))
                entry = await self._service_status(name)

    # -- lifetime --

    def close(self) -> None:
        """Close every socket of this client."""
        if self._directory is not None:
            self._directory.close()
        if self._control is not None:
            self._control.close()
        self._control = self._directory = None
        if self._own_ctx:
            self._ctx.destroy(linger=0)  # also ends event streams still open on it
            self._own_ctx = False

    async def __aenter__(self) -> AsyncClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"AsyncClient({self.endpoint!r})"
