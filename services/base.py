"""The public SDK for writing a service the kernel supervises.

.. code-block:: python

    from services.base import Service, rpc, subscribe

    class Echo(Service):
        \"\"\"Echoes what it gets.\"\"\"

        async def setup(self) -> None:          # optional; runs before the replica is ready
            self.count = 0

        @rpc
        def echo(self, text: str) -> dict:       # sync handlers run inline on the loop (fast path)
            self.count += 1
            return {"text": text, "replica": self.replica}

        @rpc(name="slow_echo")
        async def slow(self, text: str, delay: float = 0.1) -> str:   # async handlers run as tasks
            await asyncio.sleep(delay)
            return text

        @subscribe("service.*")
        async def on_service_event(self, topic: str, data: dict) -> None: ...

        async def teardown(self) -> None: ...   # optional; runs on graceful stop

Rules of the road:

* Handlers receive ``RpcRequest.args`` as keyword arguments. numpy arrays arrive as read-only
  arrays and large binaries as read-only memoryviews, both backed by the received frames, or by
  a shared-memory mapping for large ones from a peer on this host (no copy either way). Results may contain numpy arrays, bytes and memoryviews (sent as extra frames) and torch
  tensors (converted to numpy on the way out).
* Sync handlers run inline on the event loop: keep them short. Anything slow belongs in an
  ``async def`` handler, and blocking work in ``await asyncio.to_thread(...)``. A blocked loop
  stops the heartbeats, and the kernel then kills the replica (reason ``heartbeat``) — the same
  holds for ``setup``: load models with ``asyncio.to_thread`` and report ``progress``.
* Raise ``protocols.errors.MicrokernelError`` to answer with a specific error code; any other
  exception becomes ``handler_error`` with ``"ExcType: message"``.
* Do initialisation in ``setup``, not ``__init__``: the service's name, config and sockets exist
  only once the runtime has attached it.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any, Protocol, TypeVar, overload

from services.environment import GpuLease, gpu_lease
from services.handlers import RPC_MARK, SUBSCRIBE_MARK, declarations_of
from protocols import messages
from protocols.subscription import INTERNAL_PREFIX

__all__ = ["GpuLease", "Service", "rpc", "subscribe"]

# How much longer than a lease request may queue in the kernel the SDK waits for its reply.
_LEASE_REPLY_MARGIN_S = 2.0
_CONTROL_TIMEOUT_S = 10.0

F = TypeVar("F", bound=Callable[..., Any])


@overload
def rpc(fn: F, /) -> F: ...
@overload
def rpc(*, name: str | None = None) -> Callable[[F], F]: ...
def rpc(fn: Callable[..., Any] | None = None, /, *, name: str | None = None) -> Any:
    """Mark a method as an RPC handler, served under its own name or ``name``.

    Usable bare (``@rpc``) or with arguments (``@rpc(name="slow_echo")``).
    """
    if name is not None and (not isinstance(name, str) or not name):
        raise ValueError(f"rpc name must be a non-empty string, got {name!r}")

    def mark(f: F) -> F:
        if not callable(f):
            raise TypeError(f"@rpc must decorate a function, got {f!r}")
        setattr(f, RPC_MARK, name or f.__name__)
        return f

    return mark if fn is None else mark(fn)


def subscribe(pattern: str, *patterns: str) -> Callable[[F], F]:
    """Mark a method as a handler of events whose topic matches any glob ``pattern``.

    The handler is called as ``handler(topic, data)`` (sync or async). Events published while
    ``setup`` runs are held back and delivered once the service is ready, in order.
    """
    all_patterns = (pattern, *patterns)
    for p in all_patterns:
        if not isinstance(p, str) or not p:
            raise TypeError(f"@subscribe needs topic patterns (non-empty strings), got {p!r}; write @subscribe(\"topic.*\")")
        if p.startswith(INTERNAL_PREFIX):
            raise ValueError(f"topic pattern {p!r} is reserved for the kernel's internal use")

    def mark(f: F) -> F:
        if not callable(f):
            raise TypeError(f"@subscribe must decorate a function, got {f!r}")
        setattr(f, SUBSCRIBE_MARK, (*getattr(f, SUBSCRIBE_MARK, ()), *all_patterns))
        return f

    return mark


class ServiceRuntime(Protocol):
    """What the replica runtime provides to a ``Service`` (implemented in ``services.replica``)."""

    service: str
    replica: int
    incarnation: int
    config: dict[str, Any]
    endpoint: str
    log: logging.Logger

    async def call(self, service: str, method: str, args: dict[str, Any], timeout: float) -> Any: ...
    def publish(self, topic: str, data: dict[str, Any]) -> None: ...
    async def progress(self, message: str, extend_s: float) -> float: ...
    def request_stop(self, exit_code: int = 0) -> None: ...
    async def control_request(self, message: Any, timeout: float) -> Any: ...


class Service:
    """Base class of every supervised service; subclass it and decorate handlers.

    Class attributes a subclass may override:

    * ``drain_timeout`` — on graceful stop, how long in-flight async handlers may run before they
      are cancelled (their callers then get ``shutting_down``). Keep it below the kernel's stop grace.
    """

    drain_timeout: float = 5.0

    _runtime: ServiceRuntime | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Declaration errors (two methods served under one name) surface when the class is defined.
        declarations_of(cls)

    def _attach(self, runtime: ServiceRuntime) -> None:
        """Called by the runtime before ``setup``; gives the service its identity and sockets."""
        self._runtime = runtime

    @property
    def _rt(self) -> ServiceRuntime:
        runtime = self._runtime
        if runtime is None:
            raise RuntimeError(
                f"{type(self).__name__} is not attached to a replica runtime yet: "
                "use its name, config and sockets from setup() on, not in __init__"
            )
        return runtime

    # --- identity -----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The service name (``MK_SERVICE``)."""
        return self._rt.service

    @property
    def replica(self) -> int:
        """This replica's index, 0-based."""
        return self._rt.replica

    @property
    def incarnation(self) -> int:
        """How many times this replica slot has been started (grows with every restart)."""
        return self._rt.incarnation

    @property
    def config(self) -> dict[str, Any]:
        """The service's ``[services.<name>.config]`` table."""
        return self._rt.config

    @property
    def endpoint(self) -> str:
        """The data-plane endpoint this replica serves on."""
        return self._rt.endpoint

    @property
    def log(self) -> logging.Logger:
        """``microkernel.service.<name>``; every line carries the service and replica."""
        return self._rt.log

    @property
    def lease(self) -> GpuLease | None:
        """The replica's static GPU lease (``gpu = {...}`` in its config), ``None`` without one.

        Its devices are this process's ``CUDA_VISIBLE_DEVICES`` (``cuda:0`` is ``lease.devices[0]``);
        when torch was imported by the service's module, the runner has already applied
        ``lease.fractions`` with ``torch.cuda.set_per_process_memory_fraction``.
        """
        return _static_lease()

    # --- lifecycle hooks ----------------------------------------------------------------------

    async def setup(self) -> None:
        """Prepare to serve (load models, open files). The replica is ready when this returns.

        Raising makes the process exit with status 1 (the traceback is logged).
        """

    async def teardown(self) -> None:
        """Release what ``setup`` acquired; runs on graceful stop, after in-flight calls finished."""

    # --- talking to the system ----------------------------------------------------------------

    async def call(self, service: str, method: str, /, *, timeout: float = 30.0, **args: Any) -> Any:
        """Call ``method`` of another service over the direct data plane and return its result.

        Raises ``RemoteError`` (the callee's error code), ``CallTimeout`` or ``MicrokernelError``
        (``not_ready`` / ``unknown_service`` from the lookup).
        """
        return await self._rt.call(service, method, args, timeout)

    def publish(self, topic: str, data: dict[str, Any]) -> None:
        """Publish an event (``<noun>.<past-verb>``, e.g. ``train.progress``) on the kernel's bus.

        Never blocks, and may be called from any thread. Events published before the bus
        connection is established are held back (bounded) rather than silently lost.
        """
        self._rt.publish(topic, data)

    async def progress(self, message: str, *, extend_s: float = 0.0) -> float:
        """Report start-up progress and extend the start timeout by ``extend_s`` seconds.

        Returns the seconds left before the kernel's start timeout fires.
        """
        return await self._rt.progress(message, extend_s)

    def request_stop(self, exit_code: int = 0) -> None:
        """Stop this replica gracefully (as on SIGTERM); the process exits with ``exit_code``."""
        self._rt.request_stop(exit_code)

    # --- run-time GPU leases -------------------------------------------------------------------

    async def acquire_lease(
        self, count: int = 1, memory: int = 0, mode: str = "exclusive", *, priority: int = 0,
        timeout: float | None = 30.0,
    ) -> GpuLease:
        """Ask the kernel for another GPU lease: ``count`` devices with ``memory`` bytes each.

        ``memory = 0`` asks for whole devices (``exclusive`` only). Waits in the kernel's fair queue
        up to ``timeout`` seconds (0: only try now) and raises ``RemoteError`` (code ``timeout``)
        when not granted in time. The lease is bound to this replica's process: it is released
        when the process exits, or by :meth:`release_lease`. A running process cannot change its
        own ``CUDA_VISIBLE_DEVICES`` once CUDA is initialised: start a worker process with
        ``lease.env`` in its environment (or use the devices before touching CUDA).
        """
        request = messages.LeaseAcquireRequest(count=count, memory=memory, mode=mode, priority=priority,
                                               timeout=timeout)
        wait = _CONTROL_TIMEOUT_S if timeout is None else timeout + _LEASE_REPLY_MARGIN_S
        reply = await self._control_request(request, wait)
        lease = gpu_lease(reply.env)
        assert lease is not None, "the kernel granted a lease without its environment"
        return lease

    async def release_lease(self, lease: GpuLease | str) -> bool:
        """Give a run-time lease back; False if it was not held any more."""
        lease_id = lease if isinstance(lease, str) else lease.id
        reply = await self._control_request(messages.LeaseReleaseRequest(lease_id=lease_id), _CONTROL_TIMEOUT_S)
        return bool(reply.released)

    async def _control_request(self, message: Any, timeout: float) -> Any:
        """One request to the kernel on this replica's control connection (its identity names the holder)."""
        return await self._rt.control_request(message, timeout)

    def __repr__(self) -> str:
        runtime = self._runtime
        if runtime is None:
            return f"<{type(self).__name__} (not attached)>"
        return f"<{type(self).__name__} {runtime.service}[{runtime.replica}] incarnation {runtime.incarnation}>"


@functools.cache
def _static_lease() -> GpuLease | None:
    # The environment of a replica does not change after it started: parse it once.
    return gpu_lease(os.environ)
