"""The control ROUTER: every request to the kernel enters here.

This is the single boundary where inbound frames are validated and where exceptions become
error replies. Malformed, unknown, wrong-version or oversized input gets an error reply with a
code when the sender can be addressed, or is dropped with a logged reason; it never propagates.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import zmq

from protocols import wire
from protocols.errors import ErrorCode, MicrokernelError, ProtocolError
from protocols.transport import AsyncSocket, frame_size_limit
from microkernel.bus.limits import ControlLimiter, is_awaitable
from microkernel.limits import LimitSettings

log = logging.getLogger("microkernel.control")


class ControlRouter:
    """Decodes control requests, dispatches them to handlers and sends the replies."""

    def __init__(
        self,
        ctx: zmq.Context,
        endpoint: str,
        *,
        handlers: Mapping[type, Callable[[Any, wire.Envelope], Any]],
        kernel: Any,
        max_size: int,
        sender: str = "kernel",
        limits: LimitSettings | None = None,
        guard: Any = None,
    ) -> None:
        self.handlers = dict(handlers)
        self.guard = guard  # microkernel.security.guard.Guard: who may send what (None: everyone)
        self.kernel = kernel
        self.max_size = max_size
        self.sender = sender
        self.requests = 0
        self.errors = 0
        self._tasks: set[asyncio.Task[None]] = set()
        sock = ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A hard cap far above the protocol limit: frames beyond it are refused by ZeroMQ itself
        # (the peer is disconnected) so a hostile client cannot make the kernel buffer gigabytes.
        sock.setsockopt(zmq.MAXMSGSIZE, frame_size_limit(max_size))
        limits = limits or LimitSettings()
        # Bounded queues per peer: a client that never reads its replies loses them (drop_when_full)
        # instead of making the kernel buffer without bound; one that floods waits in its own socket.
        sock.setsockopt(zmq.SNDHWM, limits.max_queue)
        sock.setsockopt(zmq.RCVHWM, limits.max_queue)
        if guard is not None:
            guard.prepare(sock)  # CURVE server options on a tcp endpoint, before the bind
        sock.bind(endpoint)
        socket_class = AsyncSocket if guard is None else guard.socket_class
        self.socket = socket_class(sock, self._on_message, drop_when_full=True)
        self.limiter = ControlLimiter(limits, send=self.socket.send, sender=sender, socket=self.socket)
        self.handlers = self.limiter.guard(self.handlers)

    def _reply_error(self, routing: list[bytes], header: wire.Header | None, code: ErrorCode, reason: str) -> None:
        self.errors += 1
        self.socket.send(wire.encode_error(header, code, reason, sender=self.sender, routing=routing))

    def _on_message(self, frames: list[Any]) -> None:
        self.requests += 1
        if not self.limiter.admit(frames):  # rate limit per client, before any decoding
            return
        try:
            # Control requests never carry tensors: a shared-memory reference here is refused, not claimed.
            env = wire.decode(frames, max_size=self.max_size, shm=False)
        except ProtocolError as exc:
            routing = getattr(exc, "routing", None)
            header = getattr(exc, "header", None)
            if routing:
                self.limiter.log_rejection(routing[0], exc)  # throttled: garbage must not flood the log
                self._reply_error(routing, header, exc.code, exc.reason)
            else:
                log.warning("dropping an unaddressable control message: %s", exc)
            return
        except Exception as exc:  # a decoder bug: still one reply, and the loop keeps serving
            log.exception("decoding a control message failed")
            if len(frames) > 1 and isinstance(frames[0], bytes):
                self._reply_error([frames[0]], None, ErrorCode.INTERNAL, f"the message could not be decoded: {type(exc).__name__}")
            return
        handler = self.handlers.get(type(env.message))
        if handler is None:
            self._reply_error(env.routing, env.header, ErrorCode.UNKNOWN_TYPE,
                              f"{env.msg_type} is not a request the kernel handles")
            return
        guard = self.guard
        if (guard is not None and env.header.msg_type not in guard.free
                and (denied := guard.check(env, self.socket)) is not None):
            self._reply_error(env.routing, env.header, ErrorCode.FORBIDDEN, denied)
            return
        deadline = env.header.deadline_ns
        if deadline is not None and time.time_ns() > deadline:
            self._reply_error(env.routing, env.header, ErrorCode.DEADLINE_EXCEEDED,
                              f"{env.msg_type} arrived after its deadline")
            return
        try:
            result = handler(self.kernel, env)
        except MicrokernelError as exc:
            self._reply_error(env.routing, env.header, exc.code, exc.reason)
            return
        except Exception as exc:
            log.exception("handler for %s failed", env.msg_type)
            self._reply_error(env.routing, env.header, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            return
        # A Packed reply (the cached status, the usual one) skips the awaitable test.
        if type(result) is not wire.Packed and is_awaitable(result):
            task = asyncio.ensure_future(self._finish(env, result))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif result is not None:
            self.socket.send(wire.encode_reply(env.header, result, sender=self.sender, routing=env.routing))

    async def _finish(self, env: wire.Envelope, pending: Awaitable[Any]) -> None:
        try:
            result = await pending
        except MicrokernelError as exc:
            self._reply_error(env.routing, env.header, exc.code, exc.reason)
            return
        except asyncio.CancelledError:
            self._reply_error(env.routing, env.header, ErrorCode.SHUTTING_DOWN, "the kernel is shutting down")
            raise
        except Exception as exc:
            log.exception("handler for %s failed", env.msg_type)
            self._reply_error(env.routing, env.header, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            return
        if result is not None:
            self.socket.send(wire.encode_reply(env.header, result, sender=self.sender, routing=env.routing))

    async def drain(self, timeout: float) -> None:
        """Wait (bounded) for in-flight request tasks, then cancel the rest."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)

    @property
    def inflight(self) -> int:
        """Requests being handled asynchronously right now (the metrics' queue depth)."""
        return len(self._tasks)

    def close(self) -> None:
        self.socket.close()
