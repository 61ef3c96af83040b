"""What one client may ask of the control socket: a request rate and a number of running requests.

Two guards, both wired by :class:`microkernel.bus.control.ControlRouter`:

- :class:`ControlLimiter.admit` runs first for every inbound message, before anything is decoded:
  a token bucket per client identity (``[limits] rate_per_s`` / ``burst``). A request beyond it
  gets ``rate_limited`` with ``details.retry_after_ms``; past ``rejections_per_s`` such replies
  in one second that client's further rejected requests are dropped unanswered, so a client
  flooding at 100k/s costs the kernel a dictionary lookup per message, not an encoded reply.
- :class:`InflightGuard` wraps the handlers: an asynchronous request (one that becomes a task)
  beyond ``max_inflight_per_client`` for its client, or ``max_inflight`` overall, gets
  ``overloaded`` at once instead of another task.

A client is its ZeroMQ routing id, unless ``identity_of`` maps it to something better (the
CURVE key of an authenticated connection). Service replicas' own traffic (``heartbeat``,
``ready_request``, ``progress_request``) is spent from the client's bucket while it has tokens and
from a second bucket of the same size once it is empty, so a replica that also makes many other
requests can never starve its own liveness; the second bucket is itself rate-limited, so naming a
message ``heartbeat`` buys a flooder nothing but one more bucket.

Buckets live in an LRU map of at most ``max_clients`` entries: a forgotten client starts again
with a full bucket, which is what an idle one has anyway.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import inspect
import logging
import time
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgpack

from protocols import wire
from protocols.errors import ErrorCode, MicrokernelError
from microkernel.limits import LimitSettings

log = logging.getLogger("microkernel.limits")
control_log = logging.getLogger("microkernel.control")  # where malformed input was always reported

Clock = Callable[[], float]
Handler = Callable[[Any, wire.Envelope], Any]

# Header bytes of the message types that keep a replica alive: the msgpack key ``msg_type``
# immediately followed by the value (a fixstr), found by a substring search without decoding.
_HEARTBEAT, _READY, _PROGRESS = (
    msgpack.packb("msg_type") + msgpack.packb(name) for name in ("heartbeat", "ready_request", "progress_request")
)
_HEADER_PEEK_LIMIT = 4096  # a header longer than this is not worth decoding for a rejection
LOG_INTERVAL = 10.0  # seconds between two log lines about rejected clients
_NOTED_CLIENTS = 1000  # distinct clients counted between two reports
BAD_INPUT_LINES = 20  # log lines about malformed control messages per LOG_INTERVAL; the rest are counted


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; each request takes one."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float) -> float:
        """0.0 when a token was taken, else the seconds until one will be there."""
        tokens = self.tokens + (now - self.stamp) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        self.stamp = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return 0.0
        self.tokens = tokens
        return (1.0 - tokens) / self.rate


class _Client:
    __slots__ = ("bucket", "lifecycle", "window_start", "replies")

    def __init__(self, bucket: TokenBucket, now: float) -> None:
        self.bucket = bucket
        self.lifecycle: TokenBucket | None = None
        self.window_start = now
        self.replies = 0


def is_lifecycle(frames: Sequence[Any]) -> bool:
    """Whether ``frames`` (as a ROUTER receives them) carry a replica's heartbeat, readiness or progress."""
    if len(frames) < 3 or frames[1] != wire.MAGIC:
        return False
    header = frames[2]
    if type(header) is not bytes or len(header) > _HEADER_PEEK_LIMIT:
        return False
    return _HEARTBEAT in header or _READY in header or _PROGRESS in header


class RateLimiter:
    """Token buckets per client identity, bounded in number, with a budget of rejection replies."""

    def __init__(self, *, rate: float, burst: int, max_clients: int, rejections_per_s: int,
                 clock: Clock = time.monotonic) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0 (no RateLimiter at all turns the limit off)")
        self.rate = rate
        self.burst = burst
        self.max_clients = max_clients
        self.rejections_per_s = rejections_per_s
        self.clock = clock
        self._clients: collections.OrderedDict[bytes, _Client] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._clients)

    def take(self, identity: bytes, frames: Sequence[Any] = ()) -> float:
        """0.0 when ``identity`` may send this request, else the seconds until it may."""
        now = self.clock()
        clients = self._clients
        client = clients.get(identity)
        if client is None:
            client = clients[identity] = _Client(TokenBucket(self.rate, self.burst, now), now)
            if len(clients) > self.max_clients:
                clients.popitem(last=False)
        else:
            clients.move_to_end(identity)
        wait = client.bucket.take(now)
        if wait and is_lifecycle(frames):
            if client.lifecycle is None:
                client.lifecycle = TokenBucket(self.rate, self.burst, now)
            return client.lifecycle.take(now)
        return wait

    def may_reply(self, identity: bytes) -> bool:
        """Whether a rejected request of ``identity`` still gets a reply in this second (counts it)."""
        client = self._clients.get(identity)
        if client is None:
            return False
        now = self.clock()
        if now - client.window_start >= 1.0:
            client.window_start = now
            client.replies = 0
        if client.replies >= self.rejections_per_s:
            return False
        client.replies += 1
        return True


_Packed = wire.Packed


def is_awaitable(result: Any) -> bool:
    """``inspect.isawaitable`` for what handlers return, without its abstract-class check (which
    costs more than the rest of a ping's handling): a type attribute lookup, the same rule."""
    t = type(result)
    if t is types.CoroutineType:
        return True
    if t is types.GeneratorType:  # a generator-based coroutine: only its code flags tell
        return inspect.isawaitable(result)
    return getattr(t, "__await__", None) is not None


class InflightGuard:
    """Counts asynchronous requests per client and overall; refuses with ``overloaded`` past the caps."""

    def __init__(self, *, per_client: int, total: int) -> None:
        self.per_client = per_client
        self.total = total
        self.count = 0
        self.running: dict[bytes, int] = {}  # only clients with requests running: bounded by ``count``

    def check(self, identity: bytes) -> None:
        """Raise ``overloaded`` if ``identity`` may not start another asynchronous request now."""
        if self.total and self.count >= self.total:
            raise MicrokernelError(ErrorCode.OVERLOADED, f"the kernel is already running {self.count} requests "
                                   "(limits.max_inflight); retry later")
        mine = self.running.get(identity, 0)
        if self.per_client and mine >= self.per_client:
            raise MicrokernelError(ErrorCode.OVERLOADED,
                                   f"{mine} requests of this client are still running (limits.max_inflight_per_client)")

    def track(self, identity: bytes, pending: Any) -> asyncio.Future[Any]:
        """Run ``pending`` as a task counted against ``identity`` until it finishes (or is cancelled)."""
        task = asyncio.ensure_future(pending)
        self.count += 1
        self.running[identity] = self.running.get(identity, 0) + 1
        task.add_done_callback(functools.partial(self._finished, identity))
        return task

    def _finished(self, identity: bytes, task: asyncio.Future[Any]) -> None:
        self.count -= 1
        left = self.running.get(identity, 1) - 1
        if left > 0:
            self.running[identity] = left
        else:
            self.running.pop(identity, None)
        if not task.cancelled():
            task.exception()  # the router awaits the task and reports it; never "never retrieved"

    def wrap(self, handler: Handler, identity_of: Callable[[bytes], bytes]) -> Handler:
        """``handler`` with its asynchronous results counted (and refused past the caps)."""
        is_async = inspect.iscoroutinefunction(handler)

        if is_async:
            @functools.wraps(handler)
            def guarded(kernel: Any, env: wire.Envelope) -> Any:
                identity = identity_of(env.routing[0] if env.routing else b"")
                self.check(identity)  # before the handler: a refused request has done nothing
                return self.track(identity, handler(kernel, env))
            return guarded

        @functools.wraps(handler)
        def guarded_sync(kernel: Any, env: wire.Envelope) -> Any:
            result = handler(kernel, env)
            if type(result) is _Packed or not is_awaitable(result):  # the usual sync reply: nothing to count
                return result
            identity = identity_of(env.routing[0] if env.routing else b"")
            try:
                self.check(identity)
            except MicrokernelError:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
                raise
            return self.track(identity, result)

        return guarded_sync


def _same(routing_id: bytes) -> bytes:
    return routing_id


def key_identity(socket: Any) -> Callable[[bytes], bytes]:
    """An ``identity_of`` for a socket that knows the CURVE key name of the message being handled
    (``socket.peer``, see ``microkernel.security.authenticator.PeerSocket``): all connections made
    with one key share one bucket and one in-flight count; without a key the routing id is used."""

    def identity(routing_id: bytes) -> bytes:
        peer = getattr(socket, "peer", "")
        return b"key:" + peer.encode() if peer else routing_id

    return identity


class ControlLimiter:
    """The control socket's limits: ``admit`` every inbound message, ``guard`` the handlers."""

    def __init__(self, settings: LimitSettings, *, send: Callable[[list[Any]], Any], sender: str,
                 clock: Clock = time.monotonic, socket: Any = None) -> None:
        """``socket``: the control socket; one that knows its peers' CURVE keys (has ``peer``)
        makes the key the client identity (:func:`key_identity`)."""
        self.settings = settings
        self.send = send
        self.sender = sender
        self.clock = clock
        self.identity_of: Callable[[bytes], bytes] = key_identity(socket) if hasattr(socket, "peer") else _same
        """Maps a routing id to the client identity buckets are kept for (may be replaced)."""
        self.rate: RateLimiter | None = None
        if settings.rate_per_s > 0:
            self.rate = RateLimiter(rate=settings.rate_per_s, burst=settings.burst, max_clients=settings.max_clients,
                                    rejections_per_s=settings.rejections_per_s, clock=clock)
        self.inflight = InflightGuard(per_client=settings.max_inflight_per_client, total=settings.max_inflight)
        self.rejected = 0  # rate_limited replies sent
        self.dropped = 0  # rate-limited requests dropped without a reply
        self._logged_at = -LOG_INTERVAL
        self._since_log: collections.Counter[bytes] = collections.Counter()
        self._bad_window = -LOG_INTERVAL
        self._bad_lines = 0
        self._bad_unlogged = 0

    def guard(self, handlers: Mapping[type, Handler]) -> dict[type, Handler]:
        """``handlers`` with the in-flight caps applied (unchanged when both caps are 0)."""
        if not (self.settings.max_inflight_per_client or self.settings.max_inflight):
            return dict(handlers)
        identity_of = self._identity
        return {cls: self.inflight.wrap(fn, identity_of) for cls, fn in handlers.items()}

    def _identity(self, routing_id: bytes) -> bytes:
        return self.identity_of(routing_id)

    def admit(self, frames: list[Any]) -> bool:
        """Whether the message may go on; a refused one has been answered or dropped here."""
        rate = self.rate
        if rate is None or not frames:
            return True
        routing_id = frames[0]
        if type(routing_id) is not bytes:
            routing_id = bytes(routing_id)
        identity = routing_id if self.identity_of is _same else self.identity_of(routing_id)
        wait = rate.take(identity, frames)
        if not wait:
            return True
        if rate.may_reply(identity):
            self.rejected += 1
            self._reply(frames, wait)
        else:
            self.dropped += 1
        self._note(identity)
        return False

    def log_rejection(self, routing_id: bytes, reason: object) -> None:
        """Log a control message rejected as malformed: at most ``BAD_INPUT_LINES`` lines per
        ``LOG_INTERVAL``, then one line with the count (a flood of garbage must not become a flood
        of log lines: the log is a blocking write and fills the journal)."""
        now = self.clock()
        if now - self._bad_window >= LOG_INTERVAL:
            if self._bad_unlogged:
                control_log.warning("%d more malformed control messages were rejected without a log line each",
                            self._bad_unlogged)
            self._bad_window = now
            self._bad_lines = self._bad_unlogged = 0
        if self._bad_lines < BAD_INPUT_LINES:
            self._bad_lines += 1
            control_log.info("rejecting a control message from %r: %s", routing_id, reason)
        else:
            self._bad_unlogged += 1

    def _reply(self, frames: list[Any], wait: float) -> None:
        routing, header = _addressing(frames)
        retry_ms = max(1, int(wait * 1000 + 0.999))
        reason = (f"too many requests from this client (limits.rate_per_s = {self.settings.rate_per_s:g}, "
                  f"burst {self.settings.burst}); retry in {retry_ms} ms")
        self.send(wire.encode_error(header, ErrorCode.RATE_LIMITED, reason, sender=self.sender,
                                    details={"retry_after_ms": retry_ms}, routing=routing))

    def _note(self, identity: bytes) -> None:
        """Count a rejection; at most one log line per ``LOG_INTERVAL`` names the busiest clients."""
        if identity not in self._since_log and len(self._since_log) >= _NOTED_CLIENTS:
            identity = b"(others)"  # many identities at once: count them, do not remember them all
        self._since_log[identity] += 1
        now = self.clock()
        if now - self._logged_at < LOG_INTERVAL:
            return
        total = sum(self._since_log.values())
        top = ", ".join(f"{_shown(ident)} ({n})" for ident, n in self._since_log.most_common(3))
        log.warning("rate-limited %d control requests from %d clients since the last report (busiest: %s); "
                    "%d replies, %d dropped unanswered so far", total, len(self._since_log), top,
                    self.rejected, self.dropped)
        self._logged_at = now
        self._since_log.clear()


def _shown(identity: bytes) -> str:
    """A client identity for a log line: as text when printable (keys, ``svc:`` ids), else hex."""
    if identity and identity.isascii() and identity.decode("ascii").isprintable():
        return identity.decode("ascii")
    return identity.hex() or "-"


def _addressing(frames: Sequence[Any]) -> tuple[list[bytes], wire.Header | None]:
    """The routing ids of a ROUTER message and, when its header reads as one, enough of it to
    correlate an error reply (``msg_id`` and ``msg_type``); else ``None`` (an ``error_reply``)."""
    for i in range(1, min(len(frames), 9)):
        frame = frames[i]
        if frame == wire.MAGIC:
            routing = [bytes(f) for f in frames[:i]]
            if i + 1 >= len(frames):
                return routing, None
            raw = frames[i + 1]
            if type(raw) is not bytes or len(raw) > _HEADER_PEEK_LIMIT:
                return routing, None
            try:
                h = msgpack.unpackb(raw, raw=False)
            except Exception:  # msgpack raises several unrelated types
                return routing, None
            if type(h) is not dict:
                return routing, None
            msg_id, msg_type = h.get("msg_id"), h.get("msg_type")
            if type(msg_id) is not bytes or not 0 < len(msg_id) <= 64 or type(msg_type) is not str or not msg_type:
                return routing, None
            return routing, wire.Header(msg_id, msg_type, wire.PROTOCOL_VERSION, "", 0)
    return [bytes(frames[0])], None
