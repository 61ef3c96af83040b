"""Calling services over the direct data plane.

The kernel is a name service, not a router: a caller asks it once where a service's ready
replicas are (``lookup_request``), connects one DEALER to all of their endpoints (ZeroMQ then
load-balances requests across replicas) and talks to them directly. Lookups are cached for a
short time and refreshed at once after a failure, so restarted replicas (new endpoints) are
found quickly without a lookup per call. A call over a cached route must leave at once: if no
replica of the route is connected any more (they all restarted on new endpoints), the route is
looked up again instead of waiting out the call's timeout.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import zmq

from protocols import messages, shm
from protocols.errors import CallTimeout, ErrorCode, MicrokernelError
from protocols.transport import AsyncRequester, NoPeer, SyncRequester

LOOKUP_TTL_S = 2.0
_END = object()


def _left(end: float, timeout: float, service: str) -> float:
    """What is left of a call's ``timeout`` at this point (its ``end`` on the monotonic clock)."""
    left = end - time.monotonic()
    if left <= 0:
        raise CallTimeout(f"no reply from {service!r} within {timeout:g}s (the look-up of its replicas took it all)")
    return left


def _check_lookup(reply: messages.LookupReply) -> list[str]:
    if not reply.endpoints:
        raise MicrokernelError(ErrorCode.NOT_READY, f"service {reply.service!r} has no ready replica")
    return list(reply.endpoints)


class _Route:
    __slots__ = ("requester", "expires")

    def __init__(self, requester: Any, expires: float) -> None:
        self.requester = requester
        self.expires = expires

    def failed(self, exc: MicrokernelError) -> None:
        """A call over this route failed with ``exc``: after a timeout or a replica going away the
        replica set may have changed, so the next call looks it up again."""
        if exc.code in (ErrorCode.TIMEOUT, ErrorCode.SHUTTING_DOWN, ErrorCode.UNAVAILABLE):
            self.expires = 0.0

    def update(self, endpoints: Sequence[str]) -> None:
        current = set(self.requester.endpoints)
        wanted = set(endpoints)
        for ep in current - wanted:
            self.requester.disconnect(ep)
        for ep in endpoints:
            if ep not in current:
                self.requester.connect(ep)


def _install(routes: dict[str, _Route], service: str, endpoints: list[str], now: float, factory: Any) -> _Route:
    """Create or refresh the route of ``service`` after a successful lookup."""
    route = routes.get(service)
    if route is None:
        route = routes[service] = _Route(factory(endpoints), now + LOOKUP_TTL_S)
    else:
        route.update(endpoints)
        route.expires = now + LOOKUP_TTL_S
    return route


class AsyncDirectory:
    """Direct data-plane calls from inside an asyncio loop (service SDK, AsyncClient)."""

    def __init__(self, ctx: zmq.Context, control: AsyncRequester, *, sender: str, max_size: int | None = None) -> None:
        self.ctx = ctx
        self.control = control
        self.sender = sender
        self.max_size = max_size
        # Large arguments go to same-host replicas by shared memory (MK_SHM_THRESHOLD).
        self.shm_threshold = shm.threshold_from_env()
        self._routes: dict[str, _Route] = {}

    async def _route(self, service: str, timeout: float, refresh: bool = False) -> tuple[_Route, bool]:
        """The route to ``service`` and whether it came from the cache."""
        route = self._routes.get(service)
        now = time.monotonic()
        if route is not None and not refresh and now < route.expires:
            return route, True
        env = await self.control.request(messages.LookupRequest(service=service), timeout=timeout)
        return _install(self._routes, service, _check_lookup(env.message), now, self._requester), False

    def _requester(self, endpoints: list[str]) -> AsyncRequester:
        return AsyncRequester(self.ctx, endpoints, sender=self.sender, immediate=True, max_size=self.max_size,
                              shm_threshold=self.shm_threshold)

    async def call(self, service: str, method: str, args: dict[str, Any], *, timeout: float = 30.0) -> Any:
        """Call ``method`` on one ready replica of ``service`` and return its result."""
        deadline_ns = time.time_ns() + int(timeout * 1e9)
        end = time.monotonic() + timeout  # one budget for the look-ups and the request
        route, cached = await self._route(service, timeout)
        try:
            try:
                return await route.requester.call(method, args, timeout=_left(end, timeout, service),
                                                  deadline_ns=deadline_ns, try_now=cached)
            except NoPeer:
                route, _ = await self._route(service, _left(end, timeout, service), refresh=True)
                return await route.requester.call(method, args, timeout=_left(end, timeout, service),
                                                  deadline_ns=deadline_ns)
        except MicrokernelError as exc:  # CallTimeout included
            route.failed(exc)
            raise

    def close(self) -> None:
        for route in self._routes.values():
            route.requester.close()
        self._routes.clear()


class SyncDirectory:
    """Direct data-plane calls from synchronous code (``Client``)."""

    def __init__(self, ctx: zmq.Context, control: SyncRequester, *, sender: str, max_size: int | None = None) -> None:
        self.ctx = ctx
        self.control = control
        self.sender = sender
        self.max_size = max_size
        # Large arguments go to same-host replicas by shared memory (MK_SHM_THRESHOLD).
        self.shm_threshold = shm.threshold_from_env()
        self._routes: dict[str, _Route] = {}

    def _route(self, service: str, timeout: float, refresh: bool = False) -> tuple[_Route, bool]:
        """The route to ``service`` and whether it came from the cache."""
        route = self._routes.get(service)
        now = time.monotonic()
        if route is not None and not refresh and now < route.expires:
            return route, True
        env = self.control.request(messages.LookupRequest(service=service), timeout=timeout)
        return _install(self._routes, service, _check_lookup(env.message), now, self._requester), False

    def _requester(self, endpoints: list[str]) -> SyncRequester:
        return SyncRequester(self.ctx, endpoints, sender=self.sender, immediate=True, max_size=self.max_size,
                              shm_threshold=self.shm_threshold)

    def call(self, service: str, method: str, args: dict[str, Any], *, timeout: float = 30.0) -> Any:
        """Call ``method`` on one ready replica of ``service`` and return its result."""
        route = self._routes.get(service)
        now = time.monotonic()
        end = now + timeout  # one budget for the look-ups and the request
        if route is not None and now < route.expires:
            cached, left = True, timeout  # a fresh cached route: no call to _route on the per-call path
        else:
            route, cached = self._route(service, timeout)
            left = _left(end, timeout, service)
        try:
            try:
                return route.requester.call(method, args, timeout=left, try_now=cached)
            except NoPeer:
                route, _ = self._route(service, _left(end, timeout, service), refresh=True)
                return route.requester.call(method, args, timeout=_left(end, timeout, service))
        except MicrokernelError as exc:
            route.failed(exc)
            raise

    def call_many(self, service: str, method: str, calls: Iterable[dict[str, Any]], *, timeout: float = 30.0,
                  window: int = 64) -> Iterator[Any]:
        """``call`` for every argument map of ``calls``, pipelined (``SyncRequester.call_many``):
        the results in order. One lookup for all of them; a cached route whose replicas are all
        gone is looked up again before the first request leaves. The first window of requests is
        sent, and the first result awaited, before this returns."""
        pending = iter(calls)
        first = next(pending, _END)
        if first is _END:
            return iter(())
        route, cached = self._route(service, timeout)
        results = route.requester.call_many(method, itertools.chain((first,), pending), timeout=timeout,
                                            window=window, try_now=cached, failed=route.failed)
        try:
            head = next(results)
        except NoPeer:  # the first request found no replica: nothing was read from calls but it
            route, _ = self._route(service, timeout, refresh=True)
            results = route.requester.call_many(method, itertools.chain((first,), pending), timeout=timeout,
                                                window=window, failed=route.failed)
            head = next(results)
        return itertools.chain((head,), results)

    def close(self) -> None:
        for route in self._routes.values():
            route.requester.close()
        self._routes.clear()
