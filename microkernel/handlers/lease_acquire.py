"""``lease_acquire_request``: a GPU lease at run time, queued fairly; the holder is the sender."""

from __future__ import annotations

import time

from protocols import messages as m
from protocols.errors import ErrorCode, MicrokernelError
from protocols.wire import Envelope
from microkernel.handlers.deadline import wait_until
from microkernel.handlers.registry import handles
from microkernel.resources.leases import LeaseRequest
from microkernel.resources.manager import holder_of

SERVICE_IDENTITY_PREFIX = b"svc:"


def lease_holder(kernel, env: Envelope) -> tuple[str, int | None]:
    """Who asks, from the sender's identity: ``(holder, pid the lease is bound to)``.

    A service replica (control identity ``svc:<service>.<replica>.<incarnation>``) holds its leases
    as ``<service>/<replica>``, bound to its live process. Any other sender is a client connection,
    named ``<sender>@<routing id>``; its lease is bound to the ``pid`` it names, if any.
    """
    identity = env.routing[0] if env.routing else b""
    if identity.startswith(SERVICE_IDENTITY_PREFIX):
        try:
            service, replica, incarnation = identity[len(SERVICE_IDENTITY_PREFIX):].decode().rsplit(".", 2)
            rep = kernel.supervisor.replica_for(service, int(replica), int(incarnation))
        except (UnicodeDecodeError, ValueError):
            raise MicrokernelError(ErrorCode.INVALID_FIELD, f"malformed service identity {identity!r}") from None
        if rep.pid is None:
            raise MicrokernelError(ErrorCode.BAD_STATE, f"{rep.name} has no process yet")
        return holder_of(rep.service, rep.index), rep.pid
    return f"{env.header.sender or 'client'}@{identity.hex()}", env.message.pid


@handles(m.LeaseAcquireRequest)
def lease_acquire(kernel, env):
    # Answered inline when the lease can be granted at once (the common case); otherwise a task
    # waits in the broker's queue.
    req = env.message
    holder, pid = lease_holder(kernel, env)
    if req.timeout is not None and req.timeout < 0:
        raise MicrokernelError(ErrorCode.INVALID_FIELD, f"timeout must be >= 0 seconds or nil, got {req.timeout!r}")
    try:
        request = LeaseRequest(holder=holder, pid=pid, count=req.count, memory=req.memory, mode=req.mode,
                               priority=req.priority)
    except ValueError as exc:
        raise MicrokernelError(ErrorCode.INVALID_FIELD, f"lease request: {exc}") from None
    lease = kernel.resources.try_acquire(request)
    if lease is not None:
        return m.LeaseAcquireReply(lease=lease.to_wire(), env=kernel.resources.lease_env(lease))
    # Wait in the queue no longer than the caller waits for the reply.
    limit = max(0.0, wait_until(env, True) - time.monotonic())  # type: ignore[operator]
    timeout = limit if req.timeout is None else min(req.timeout, limit)
    return _queued(kernel, request, timeout)


async def _queued(kernel, request: LeaseRequest, timeout: float) -> m.LeaseAcquireReply:
    lease = await kernel.resources.acquire(request, timeout)
    return m.LeaseAcquireReply(lease=lease.to_wire(), env=kernel.resources.lease_env(lease))
