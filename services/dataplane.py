"""The replica's data-plane server: a ROUTER on ``MK_ENDPOINT`` answering ``rpc_request``.

This is the hot path. Messages are read by ``AsyncSocket`` (the loop watches the zmq FD and
drains with NOBLOCK), and a sync handler is decoded, dispatched, encoded and sent from inside
that callback: no await, no task, no future per message. Only ``async def`` handlers become
tasks, tracked in a set so none is orphaned and graceful stop can wait for them.

Results to a same-host caller (the endpoint is ``ipc://`` or ``inproc://``) holding arrays or
binaries of at least ``shm_threshold`` bytes (``MK_SHM_THRESHOLD``, default 16 MiB), or arrays
already in shared memory (``protocols.shm.empty``), are handed over by shared memory instead of
frames; a tcp endpoint always sends frames and refuses shared-memory references.

Every inbound message gets exactly one reply (except replies sent to us, which are dropped so
two peers can never ping-pong errors): garbage frames, unknown types, oversized messages and
handler failures all turn into error replies, never into a crash of the replica.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
import types
from collections.abc import Coroutine
from typing import Any

import zmq

from protocols import handover, messages, shm, wire
from protocols.endpoints import ipc_path
from protocols.errors import ErrorCode, MicrokernelError, ProtocolError
from protocols.transport import AsyncSocket, frame_size_limit
from services.handlers import RpcHandler, portable

# How long closing the socket may take to flush the last replies.
CLOSE_LINGER_MS = 500
# A sync handler whose last call returned within this is "quick": replies to earlier messages of a
# burst may wait for its next call (at most transport.COALESCE - 1 of them, grouped to leave together).
QUICK_NS = 20_000
_clock = time.perf_counter_ns


class Phase(enum.Enum):
    """Whether the data plane takes new calls."""

    STARTING = "starting"  # bound, setup still running: NOT_READY
    SERVING = "serving"
    STOPPING = "stopping"  # graceful stop: SHUTTING_DOWN


class _Throttle:
    """At most one log line per ``interval`` seconds for a noisy condition, counting the rest."""

    __slots__ = ("interval", "next_at", "suppressed")

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.next_at = 0.0
        self.suppressed = 0

    def allow(self) -> bool:
        now = time.monotonic()
        if now >= self.next_at:
            self.next_at = now + self.interval
            return True
        self.suppressed += 1
        return False


class DataPlane:
    """Serves a service's ``@rpc`` handlers on a bound ROUTER socket."""

    def __init__(
        self,
        ctx: zmq.Context,
        endpoint: str,
        handlers: dict[str, RpcHandler],
        *,
        service: str,
        sender: str,
        log: logging.Logger,
        max_size: int | None = None,
        shm_threshold: int | None | bool = True,
    ) -> None:
        """``shm_threshold``: True takes ``MK_SHM_THRESHOLD`` (default 16 MiB), None/False turns
        shared memory off; it is always off unless ``endpoint`` is same-host (ipc/inproc)."""
        path = ipc_path(endpoint)
        if path is not None:
            # The kernel creates the runtime dir; the svc/ subdirectory may not exist yet.
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        sock = ctx.socket(zmq.ROUTER)
        sock.linger = 0
        if max_size is not None:  # an absurd frame disconnects its caller before it is buffered (spec §3.3)
            sock.setsockopt(zmq.MAXMSGSIZE, frame_size_limit(max_size))
        try:
            sock.bind(endpoint)
        except zmq.ZMQError:
            sock.close(linger=0)
            raise
        self.endpoint = endpoint
        self.handlers = handlers
        self.service = service
        self.sender = sender
        self.log = log
        self.max_size = max_size
        same_host = endpoint.startswith(("ipc://", "inproc://"))
        if shm_threshold is True:
            shm_threshold = shm.threshold_from_env()
        self.shm_threshold: int | None = shm_threshold if same_host and shm_threshold else None
        self._shm_accepted = same_host
        self._shm_expiry: asyncio.TimerHandle | None = None
        self._encode_usual = wire.RpcReplyEncoder(sender).encode
        self.phase = Phase.STARTING
        self.tasks: set[asyncio.Task[None]] = set()
        self._bad_input = _Throttle()
        self._loop = asyncio.get_running_loop()
        # A slow caller must not stall replies to everybody else: drop rather than queue.
        self.socket = AsyncSocket(sock, self._on_message, drop_when_full=True)

    @property
    def methods(self) -> list[str]:
        """The served RPC names, sorted."""
        return sorted(self.handlers)

    def serve(self) -> None:
        """Start taking calls (before the replica announces readiness)."""
        self.phase = Phase.SERVING

    # --- the hot path --------------------------------------------------------------------------

    def _on_message(self, frames: list[Any]) -> None:
        usual = wire.decode_rpc_request(frames, self.max_size)
        if usual is not None:
            routing, header, method, args = usual
        else:
            try:
                env = wire.decode(frames, max_size=self.max_size, shm=self._shm_accepted)
            except ProtocolError as exc:
                self._reject(exc)
                return
            routing, header = env.routing, env.header
            if header.status is not None:
                if self._bad_input.allow():
                    self.log.warning("ignoring a %s sent to the data plane by %r", header.msg_type, header.sender)
                return
            request = env.message
            if type(request) is not messages.RpcRequest:
                self._error(routing, header, ErrorCode.UNKNOWN_TYPE,
                            f"the data plane of {self.service!r} serves rpc_request, not {header.msg_type}")
                return
            method, args = request.method, request.args
        if self.phase is not Phase.SERVING:
            if self.phase is Phase.STARTING:
                self._error(routing, header, ErrorCode.NOT_READY, f"service {self.service!r} is still starting")
            else:
                self._error(routing, header, ErrorCode.SHUTTING_DOWN, f"service {self.service!r} is stopping")
            return
        deadline_ns = header.deadline_ns
        if deadline_ns is not None and deadline_ns <= time.time_ns():
            self._error(routing, header, ErrorCode.DEADLINE_EXCEEDED, f"the deadline of {method} passed before it was served")
            return
        handler = self.handlers.get(method)
        if handler is None:
            self._error(
                routing, header, ErrorCode.UNKNOWN_METHOD,
                f"service {self.service!r} has no method {method!r} (methods: {', '.join(self.methods) or 'none'})",
            )
            return
        spec = handler.args
        names = spec.names
        # ArgSpec.problem's set comparison first, here: most calls bind, and then cost no call.
        if names is None or not (args.keys() <= names and spec.required <= args.keys()):
            problem = spec.problem(args)
            if problem is not None:
                self._error(routing, header, ErrorCode.INVALID_FIELD, f"bad arguments for {method}: {problem}")
                return
        if handler.is_async:
            self._spawn(handler.name, handler.fn(**args), routing, header)
            return
        # Replies to a burst leave in groups (AsyncSocket.send_soon): the ones already made wait for
        # this call only when this handler's last call was quick; otherwise they leave first.
        if not handler.quick:
            self.socket.release()
        started = _clock()
        try:
            result = handler.fn(**args)
        except MicrokernelError as exc:
            handler.quick = False
            self._error(routing, header, exc.code, exc.reason, exc.details)
            return
        except Exception as exc:
            handler.quick = False
            self._failed(routing, header, handler.name, exc)
            return
        handler.quick = _clock() - started < QUICK_NS
        if type(result) is types.CoroutineType:  # a sync wrapper around an async function
            self._spawn(handler.name, result, routing, header)
            return
        if len(routing) == 1:
            # The usual reply, straight from the sender's header layout (else None: the general path;
            # with nothing to hand over, shared memory never applies to it).
            try:
                frames = self._encode_usual(routing[0], header.msg_id, result)
            except (TypeError, ValueError, OverflowError):
                frames = None
            if frames is not None:
                self.socket.send_soon(frames)
                return
        self._reply(routing, header, handler.name, result)

    def _reply(self, routing: list[bytes], header: wire.Header, method: str, result: Any) -> None:
        if self.shm_threshold is not None:
            self._reply_shm(routing, header, method, result)
            return
        try:
            frames = wire.encode_result(header, result, sender=self.sender, routing=routing)
        except (TypeError, ValueError, OverflowError):
            # Torch tensors (or other non-msgpack values): convert, and report what still fails.
            try:
                frames = wire.encode_result(header, portable(result), sender=self.sender, routing=routing)
            except (TypeError, ValueError, OverflowError) as exc:
                self._error(routing, header, ErrorCode.HANDLER_ERROR,
                            f"the result of {method} cannot be sent: {type(exc).__name__}: {exc}")
                return
        self.socket.send_soon(frames)

    def _reply_shm(self, routing: list[bytes], header: wire.Header, method: str, result: Any) -> None:
        """``_reply`` to a same-host caller: large payloads are handed over by shared memory."""
        handoffs: list[str] = []
        threshold = self.shm_threshold
        try:
            frames = wire.encode_result(header, result, sender=self.sender, routing=routing,
                                        shm_threshold=threshold, handoffs=handoffs)
        except (TypeError, ValueError, OverflowError):
            # (A failed encoding has already taken back its hand-overs.)
            handoffs.clear()
            try:
                frames = wire.encode_result(header, portable(result), sender=self.sender, routing=routing,
                                            shm_threshold=threshold, handoffs=handoffs)
            except (TypeError, ValueError, OverflowError) as exc:
                self._error(routing, header, ErrorCode.HANDLER_ERROR,
                            f"the result of {method} cannot be sent: {type(exc).__name__}: {exc}")
                return
        if not self.socket.send(frames) and handoffs:
            handover.reclaim(handoffs)  # the reply was dropped: nobody will claim its segments
        elif handoffs and self._shm_expiry is None:
            # Hand-overs a caller never claims (it gave up, or died) are unlinked after a while.
            self._shm_expiry = self._loop.call_later(handover.CLAIM_TTL_S + 1.0, self._expire_shm)

    def _expire_shm(self) -> None:
        self._shm_expiry = None
        handover.expire()
        if handover.pending():
            self._shm_expiry = self._loop.call_later(handover.CLAIM_TTL_S / 2, self._expire_shm)

    def _error(self, routing: list[bytes], header: wire.Header, code: ErrorCode | str, reason: str,
               details: dict[str, Any] | None = None) -> None:
        self.socket.send_soon(wire.encode_error(header, code, reason, sender=self.sender, details=details, routing=routing))

    def _failed(self, routing: list[bytes], header: wire.Header, method: str, exc: BaseException) -> None:
        self.log.error("handler %s raised %s: %s", method, type(exc).__name__, exc, exc_info=exc)
        self._error(routing, header, ErrorCode.HANDLER_ERROR, f"{type(exc).__name__}: {exc}")

    def _reject(self, exc: ProtocolError) -> None:
        """Answer frames that did not decode, addressed with what the decoder could recover."""
        routing: list[bytes] = getattr(exc, "routing", None) or []
        header: wire.Header | None = getattr(exc, "header", None)
        if self._bad_input.allow():
            suppressed, self._bad_input.suppressed = self._bad_input.suppressed, 0
            more = f" ({suppressed} more since the last report)" if suppressed else ""
            self.log.warning("rejecting an inbound message: %s%s", exc.reason, more)
        if not routing or (header is not None and header.status is not None):
            return  # nobody to answer, or the bad message was itself a reply
        self.socket.send_soon(wire.encode_error(header, exc.code, exc.reason, sender=self.sender, routing=routing))

    # --- async handlers ------------------------------------------------------------------------

    def _spawn(self, method: str, coro: Coroutine[Any, Any, Any], routing: list[bytes], header: wire.Header) -> None:
        task = self._loop.create_task(self._run(method, coro, routing, header))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, method: str, coro: Coroutine[Any, Any, Any], routing: list[bytes], header: wire.Header) -> None:
        deadline_ns = header.deadline_ns
        try:
            if deadline_ns is None:
                result = await coro
            else:
                # The deadline is wall-clock (it crossed processes); convert it to loop time.
                when = self._loop.time() + (deadline_ns - time.time_ns()) / 1e9
                timeout = asyncio.timeout_at(when)
                try:
                    async with timeout:
                        result = await coro
                except TimeoutError:
                    if not timeout.expired():
                        raise  # the handler's own TimeoutError: a handler error
                    self._error(routing, header, ErrorCode.DEADLINE_EXCEEDED,
                                f"{method} did not finish before the request's deadline")
                    return
        except asyncio.CancelledError:
            self._error(routing, header, ErrorCode.SHUTTING_DOWN, f"{method} was cancelled: service {self.service!r} is stopping")
            raise
        except MicrokernelError as exc:
            self._error(routing, header, exc.code, exc.reason, exc.details)
        except Exception as exc:
            self._failed(routing, header, method, exc)
        else:
            self._reply(routing, header, method, result)

    # --- stopping ------------------------------------------------------------------------------

    async def drain(self, timeout: float) -> None:
        """Refuse new calls; wait up to ``timeout`` s for in-flight ones, then cancel the rest."""
        self.phase = Phase.STOPPING
        if not self.tasks:
            return
        pending = set(self.tasks)
        self.log.info("waiting for %d in-flight call(s)", len(pending))
        _, late = await asyncio.wait(pending, timeout=max(0.0, timeout))
        if late:
            self.log.warning("cancelling %d call(s) still running after %gs", len(late), timeout)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    def close(self, linger: int = CLOSE_LINGER_MS) -> None:
        """Close the socket, giving queued replies ``linger`` ms to leave."""
        for task in self.tasks:
            task.cancel()
        if self._shm_expiry is not None:
            self._shm_expiry.cancel()
            self._shm_expiry = None
        self.socket.close(linger=linger)
