"""ZeroMQ plumbing shared by the daemon, the client and the service SDK.

The fast pattern for a zmq socket inside an asyncio (uvloop) loop is to watch the socket's
file descriptor with ``loop.add_reader`` and drain it with ``NOBLOCK`` until ``EAGAIN``,
rather than awaiting one future per message (``zmq.asyncio``), which is several times slower.
The zmq FD is edge-triggered: after every send the socket's ``EVENTS`` must be re-checked,
or messages that arrived meanwhile would sit unnoticed. ``AsyncSocket`` does exactly that.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NoReturn

import zmq

from protocols import handover, messages, wire
from protocols.errors import CallTimeout, ErrorCode, MicrokernelError, ProtocolError, RemoteError

log = logging.getLogger("microkernel.transport")

DRAIN_BATCH = 256
# Replies made with send_soon while a burst of messages is drained leave in groups of up to this
# many (the reply to a burst's first message leaves at once, so a lone request waits for nothing).
# Sent one by one, each reply can wake the ZeroMQ I/O thread; a group wakes it once. A held reply
# waits for at most COALESCE - 1 other messages' handling, which its sender keeps short (release()).
COALESCE = 8
# Frames at least this large are sent zero-copy; smaller ones are cheaper to copy (creating a
# zmq.Frame and tracking its lifetime costs more than copying a few hundred bytes).
ZERO_COPY_THRESHOLD = 64 * 1024
_RCVMORE = int(zmq.RCVMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)
_SNDTIMEO = int(zmq.SNDTIMEO)
_RCVTIMEO = int(zmq.RCVTIMEO)
_SNDMORE = int(zmq.SNDMORE)
NOBLOCK = int(zmq.NOBLOCK)
_MAGIC = wire.MAGIC
_new_msg_id = wire.new_msg_id
_decode_rpc_reply = wire.decode_rpc_reply
_decode_reply_map = wire.decode_reply_map
_Packed = wire.Packed
_NO_HANDOFFS: list[str] = []  # never appended to: a packed request carries no buffers
_AWAITED = object()  # call_many: a request in flight whose reply has not come
_NO_MORE = object()  # call_many: every argument map has been taken
_monotonic = time.monotonic
_time_ns = time.time_ns
# The compiled socket class under pyzmq's Python wrapper: calling it directly with int flags skips
# a Python frame, a type check and enum arithmetic per frame (several µs per message on small VMs).
_BaseSocket = zmq.Socket.__mro__[1]
if all(hasattr(_BaseSocket, name) for name in ("send", "recv", "get")):
    _send, _recv, _get = _BaseSocket.send, _BaseSocket.recv, _BaseSocket.get
else:  # another backend: the public API
    _send, _recv, _get = zmq.Socket.send, zmq.Socket.recv, zmq.Socket.getsockopt


def _receive(routed: bool, sock: zmq.Socket, flags: int = 0) -> list[Any]:
    """Receive one multipart message: envelope frames as bytes, payload buffers zero-copy.

    Routing ids, the topic, ``MK1``, the header and the body are small and parsed at once, so
    they are copied; every frame after the body is a binary buffer (a tensor, a blob) and is
    kept as the received ``zmq.Frame``, whose memory is shared with ZeroMQ, never copied.
    Frames are received as ``zmq.Frame`` because ``Frame.more`` is a field read, where asking
    the socket for ``RCVMORE`` costs pyzmq an option lookup (≈ 9 000 instructions) per frame.
    ``routed`` (a ROUTER socket): the first frame is the sender's routing id and a part always
    follows it, so it is received as plain bytes, one ``zmq.Frame`` fewer.
    """
    if routed:
        frames = [_recv(sock, flags, True)]
        frame = _recv(sock, 0, False)
    else:
        frames = []
        frame = _recv(sock, flags, False)
    data = frame.bytes
    frames.append(data)
    while data != _MAGIC:  # routing ids or a topic before it (or no MK1 at all)
        if not frame.more:
            return frames
        frame = _recv(sock, 0, False)
        data = frame.bytes
        frames.append(data)
    if frame.more:  # the header
        frame = _recv(sock, 0, False)
        frames.append(frame.bytes)
        if frame.more:  # the body
            frame = _recv(sock, 0, False)
            frames.append(frame.bytes)
            while frame.more:  # buffers
                frame = _recv(sock, 0, False)
                frames.append(frame)
    return frames


# ``recv_message(sock, flags=0)``: any socket. ``recv_routed(sock, flags=0)``: a ROUTER's.
recv_message = functools.partial(_receive, False)
recv_routed = functools.partial(_receive, True)

# recv_reply: an MK1 that turned out to begin the next message, by socket, with its ``more`` (None:
# not known). Never more than one per socket; ``forget`` drops a closed socket's.
_held: dict[zmq.Socket, bool | None] = {}


def recv_reply(sock: zmq.Socket, flags: int = 0) -> list[Any]:
    """``recv_message`` for a DEALER, whose peers' messages begin with ``MK1``: the same frames for
    every such message (``MK1``, the header and the body as ``bytes``, buffers as ``zmq.Frame``).

    ``MK1`` and the header are received as plain copies (a ``zmq.Frame`` costs several times more)
    and only the body as a ``zmq.Frame``, whose ``more`` says whether buffers follow. A copy does
    not tell whether its message goes on, so a malformed message that ends early (a lone ``MK1``,
    or no body) is recognised by what follows it: nothing (the receive would wait), or the ``MK1``
    of the next message where a header or a body must be (a valid header or body is a msgpack map,
    never ``MK1``). The short message is returned as it is, for the decoder to reject, and the next
    message is read whole on the next call. No message of any peer is lost or merged with another
    one that way (a malformed message with ``MK1`` where its header or body should be is split
    there); a first frame other than ``MK1`` is read to its end by asking the socket.
    """
    if _held and sock in _held:
        more = _held.pop(sock)
        if more is False:
            return [_MAGIC]  # the held MK1 was a message of its own
    else:
        first = _recv(sock, flags, True)
        if first != _MAGIC:  # not a reply of the protocol: the rest of it, whatever it is
            frames = [first]
            while _get(sock, _RCVMORE):
                frames.append(_recv(sock, 0, True))
            return frames
    try:
        header = _recv(sock, NOBLOCK, True)
    except zmq.Again:
        return [_MAGIC]  # a lone MK1
    if header == _MAGIC:
        _held[sock] = None
        return [_MAGIC]  # a lone MK1; this MK1 begins the next message
    try:
        body = _recv(sock, NOBLOCK, False)
    except zmq.Again:
        return [_MAGIC, header]  # no body
    data = body.bytes
    if data == _MAGIC:
        _held[sock] = body.more
        return [_MAGIC, header]  # no body; this MK1 begins the next message
    frames = [_MAGIC, header, data]
    while body.more:  # buffers
        body = _recv(sock, 0, False)
        frames.append(body)
    return frames


def forget(sock: zmq.Socket) -> None:
    """Drop what ``recv_reply`` held for ``sock`` (when it is closed)."""
    _held.pop(sock, None)


def send_message(sock: zmq.Socket, frames: Sequence[Any], flags: int = 0) -> None:
    """Send one multipart message: a small ``bytes`` frame is copied (cheaper than tracking its
    memory), any other frame (a large one, a buffer, an array) is sent zero-copy."""
    more = flags | _SNDMORE
    rest = iter(frames)
    f = next(rest)
    for following in rest:  # every frame but the last, one behind (cheaper than slicing off the last)
        _send(sock, f, more, type(f) is bytes and len(f) < ZERO_COPY_THRESHOLD)
        f = following
    _send(sock, f, flags, type(f) is bytes and len(f) < ZERO_COPY_THRESHOLD)


def _label(what: Any) -> str:
    """A request's msg_type for an error message: ``what`` is it already, or the message."""
    return what if type(what) is str else wire.msg_type_of(what)


def frame_size_limit(max_size: int) -> int:
    """The ZMQ_MAXMSGSIZE of a request/reply socket whose protocol limit is ``max_size`` (spec §3.3).

    4x the limit (at least 1 MiB): a moderately oversized message still reaches the protocol check
    and gets its ``too_large`` reply, while one absurd frame disconnects the peer before it is buffered.
    """
    return max(4 * max_size, 1 << 20)


def same_host(endpoints: Sequence[str]) -> bool:
    """Whether every endpoint is reachable only from this host (ipc/inproc): shared memory may be used."""
    return bool(endpoints) and all(ep.startswith(("ipc://", "inproc://")) for ep in endpoints)


class NoPeer(MicrokernelError):
    """A send that had to leave at once found no connected peer (``try_now`` requests)."""

    def __init__(self, reason: str) -> None:
        super().__init__(ErrorCode.UNAVAILABLE, reason)


class AsyncSocket:
    """A plain (non-asyncio) zmq socket driven by an asyncio loop's readiness callbacks.

    ``on_message(frames)`` is called synchronously for every inbound multipart message; it must
    not block (spawn a task for slow work). ``send`` never blocks: when the socket is at its
    high-water mark, outgoing messages wait in a local queue (or are dropped for ROUTER sockets
    constructed with ``drop_when_full=True``, where one slow peer must not stall the others).
    """

    def __init__(
        self,
        sock: zmq.Socket,
        on_message: Callable[[list[Any]], None],
        *,
        drop_when_full: bool = False,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.sock = sock
        self.on_message = on_message
        self.drop_when_full = drop_when_full
        self.loop = loop or asyncio.get_running_loop()
        self._fd = sock.getsockopt(zmq.FD)
        self._outbox: collections.deque[Sequence[Any]] = collections.deque()
        self._check_pending = False
        self._draining = False
        self._coalescing = False  # inside a drain, past its first message: send_soon groups replies
        self._soon: list[Sequence[Any]] = []
        self._closed = False
        self.dropped = 0
        # How one message is read, ``receive(sock, flags) -> frames``: a subclass may read more
        # than the frames (e.g. the sender's CURVE key from their properties).
        kind = sock.type
        self.receive: Callable[[zmq.Socket, int], list[Any]] = (
            recv_routed if kind == zmq.ROUTER else recv_reply if kind == zmq.DEALER else recv_message)
        self.loop.add_reader(self._fd, self._on_ready)
        # Messages may already be queued before the reader was registered.
        self._schedule_check()

    def _on_ready(self) -> None:
        if self._closed:
            return
        if self._outbox:
            self._check()  # POLLOUT may let the queued replies out first
            return
        # The FD wakes the loop when ZeroMQ has queued commands for the socket, and nearly always
        # (> 99 % in a request/reply exchange) because a message arrived: receiving at once saves
        # the EVENTS read (≈ 2.6 µs) per message; the rare wake-up without one costs a failed receive.
        self._drain()

    def _drain(self) -> None:
        """Receive and handle messages; the FD has woken the loop, or EVENTS has shown POLLIN."""
        # A lone message is the common case: after it, one EVENTS read (which also re-arms the
        # edge-triggered FD) says whether more is queued, much cheaper than a receive that fails
        # with zmq.Again. Once a burst shows, receiving until EAGAIN is cheaper than asking first.
        # (A receive, failed or not, processes the socket's commands: the FD is re-armed either way.)
        # Replies grouped by send_soon leave before the drain looks for more messages for the last
        # time, so that look also covers what their sending did to the FD.
        sock = self.sock
        receive = self.receive
        self._draining = True
        try:
            for i in range(DRAIN_BATCH):
                try:
                    if i == 1:
                        if not _get(sock, _EVENTS) & _POLLIN:
                            return
                        self._coalescing = True  # a burst: group the replies from here on
                    frames = receive(sock, NOBLOCK)
                except zmq.Again:
                    if not self._soon:
                        return
                    self.release()
                    if not _get(sock, _EVENTS) & _POLLIN:
                        return
                    continue
                except zmq.ZMQError as exc:
                    if self._closed or exc.errno == zmq.ENOTSOCK:
                        return
                    raise
                try:
                    self.on_message(frames)
                except Exception:  # a handler bug must not kill the socket's reader
                    log.exception("unhandled error while processing a message")
                if self._closed:
                    return
                if self._outbox:
                    self._flush()
            self.release()
        finally:
            self._draining = self._coalescing = False
            if self._soon:  # left by an error above: send them, and look again
                self.release()
                self._schedule_check()
        # More may be queued: yield to the loop so other sockets get a turn, then continue.
        self._schedule_check()

    def _schedule_check(self) -> None:
        if not self._check_pending and not self._closed:
            self._check_pending = True
            self.loop.call_soon(self._check)

    def _check(self) -> None:
        self._check_pending = False
        if self._closed:
            return
        try:
            events = _get(self.sock, _EVENTS)
        except zmq.ZMQError:
            return
        if self._outbox and events & _POLLOUT:
            self._flush()
            events = _get(self.sock, _EVENTS)  # sending may have let messages in unnoticed
        if events & _POLLIN:
            self._drain()

    def _flush(self) -> None:
        while self._outbox:
            try:
                send_message(self.sock, self._outbox[0], NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:
                log.debug("dropping an outgoing message: %s", exc)
            self._outbox.popleft()

    def try_send(self, frames: Sequence[Any]) -> bool:
        """Send ``frames`` now or not at all (nothing is queued); returns whether it left."""
        if self._closed or self._outbox:
            return False
        if self._soon:
            self.release()  # in order
        try:
            send_message(self.sock, frames, NOBLOCK)
        except zmq.Again:
            return False
        if not self._draining:
            # A send may consume the FD's edge; inside a drain the next EVENTS read covers it.
            self._schedule_check()
        return True

    def send(self, frames: Sequence[Any]) -> bool:
        """Queue ``frames`` for sending; returns False when the message was dropped."""
        if self._closed:
            return False
        if self._soon:
            self.release()  # in order
        if not self._outbox:
            # try_send's body, without its call: this runs once per reply on the data plane.
            try:
                send_message(self.sock, frames, NOBLOCK)
                if not self._draining:
                    self._schedule_check()  # as in try_send
                return True
            except zmq.Again:
                pass
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EHOSTUNREACH:  # ROUTER_MANDATORY: the peer went away
                    self.dropped += 1
                    return False
                raise
            if not self.drop_when_full and not self._draining:
                self._schedule_check()  # the queued message leaves when EVENTS shows POLLOUT
        if self.drop_when_full:
            self.dropped += 1
            return False
        self._outbox.append(frames)
        return True

    def send_soon(self, frames: Sequence[Any]) -> None:
        """``send`` for a reply made while handling an inbound message, without the drop report:
        inside a burst it leaves with the next few replies (``COALESCE``), and always before the
        drain ends; anywhere else at once. A dropped message is counted in ``dropped``. Whoever
        handles messages with more than a few microseconds of work calls ``release`` first."""
        if self._coalescing:
            soon = self._soon
            soon.append(frames)
            if len(soon) >= COALESCE:
                self.release()
        else:
            self.send(frames)

    def release(self) -> None:
        """Send the replies ``send_soon`` is holding, in order (before work that may take a while)."""
        soon = self._soon
        if soon:
            self._soon = []
            send = self.send
            for frames in soon:
                send(frames)

    @property
    def queued(self) -> int:
        """Messages waiting for the socket to accept them."""
        return len(self._outbox)

    def close(self, linger: int = 0) -> None:
        """Stop watching the socket and close it."""
        if self._closed:
            return
        if self._soon:
            self.release()  # grouped replies leave with the lingering ones
        self._closed = True
        try:
            self.loop.remove_reader(self._fd)
        except Exception:  # the loop may already be closed
            pass
        forget(self.sock)
        self.sock.close(linger=linger)


def raise_for_error(envelope: wire.Envelope) -> wire.Envelope:
    """Turn an error reply into ``RemoteError``; return ok replies unchanged."""
    if envelope.is_error:
        err = envelope.message
        raise RemoteError(err.code, err.reason, err.details)
    return envelope


def _same_envelope(envelope: wire.Envelope) -> wire.Envelope:
    return envelope


def _reply_map(envelope: wire.Envelope) -> dict[str, Any]:
    """The fields of an ok reply; ``RemoteError`` for an error reply."""
    return wire.body_of(raise_for_error(envelope).message)


def rpc_result(envelope: wire.Envelope) -> Any:
    """The result of an ``rpc_reply``; ``RemoteError`` for an error reply, ``MicrokernelError``
    (``malformed``) for a reply of another type."""
    msg = raise_for_error(envelope).message
    if type(msg) is not messages.RpcReply:
        raise MicrokernelError(ErrorCode.MALFORMED, f"expected rpc_reply, got {envelope.msg_type}")
    return msg.result


class AsyncRequester:
    """Request/reply over a DEALER inside an asyncio loop, correlated by ``parent_id``.

    Many requests may be in flight at once; each awaits its own reply. Replies that arrive
    after their caller gave up are dropped.
    """

    def __init__(
        self,
        ctx: zmq.Context,
        endpoints: Sequence[str],
        *,
        sender: str,
        identity: bytes | None = None,
        immediate: bool = False,
        max_size: int | None = None,
        shm_threshold: int | None = None,
    ) -> None:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        if max_size is not None:
            sock.setsockopt(zmq.MAXMSGSIZE, frame_size_limit(max_size))
        if identity is not None:
            sock.identity = identity
        if immediate:
            sock.immediate = 1
        for ep in endpoints:
            sock.connect(ep)
        self.endpoints = list(endpoints)
        self.sender = sender
        self.max_size = max_size
        # Requests' large payloads go by shared memory while every peer is on this host.
        self.shm_threshold = shm_threshold
        self._shm = shm_threshold if same_host(self.endpoints) else None
        # Futures by what they are resolved with: request()'s with the envelope, call()'s with the
        # rpc_reply's result, request_map()'s with the reply's fields. The last two read the usual
        # reply straight from its frames, as SyncRequester.call and request_map do.
        self._pending: dict[bytes, asyncio.Future[wire.Envelope]] = {}
        self._calls: dict[bytes, asyncio.Future[Any]] = {}
        self._maps: dict[bytes, asyncio.Future[dict[str, Any]]] = {}
        self._rpc = wire.RpcRequestEncoder(sender)
        self.on_unsolicited: Callable[[wire.Envelope], None] | None = None
        self.socket = AsyncSocket(sock, self._on_message)

    def connect(self, endpoint: str) -> None:
        if endpoint not in self.endpoints:
            self.socket.sock.connect(endpoint)
            self.endpoints.append(endpoint)
            self._shm = self.shm_threshold if same_host(self.endpoints) else None

    def disconnect(self, endpoint: str) -> None:
        if endpoint in self.endpoints:
            self.endpoints.remove(endpoint)
            self._shm = self.shm_threshold if same_host(self.endpoints) else None
            try:
                self.socket.sock.disconnect(endpoint)
            except zmq.ZMQError:
                pass

    def _on_message(self, frames: list[Any]) -> None:
        for waiting, decode_usual in ((self._calls, _decode_rpc_reply), (self._maps, _decode_reply_map)):
            if waiting:
                usual = decode_usual(frames, self.max_size)
                if usual is not None:
                    fut = waiting.pop(usual[0], None)
                    if fut is not None:
                        if not fut.done():
                            fut.set_result(usual[1])
                        return
        try:
            env = wire.decode(frames, max_size=self.max_size)
        except ProtocolError as exc:
            # A reply that names its request but cannot be used (its shared memory is gone, it is
            # too large) fails that request at once rather than leaving it to time out.
            header = getattr(exc, "header", None)
            fut = self._waiter(header.parent_id)[0] if header is not None else None
            if fut is not None and not fut.done():
                fut.set_exception(exc)
            else:
                log.warning("dropping an undecodable reply: %s", exc)
            return
        fut, convert = self._waiter(env.header.parent_id)
        if fut is None:
            if self.on_unsolicited is not None:
                self.on_unsolicited(env)
        elif not fut.done():
            try:
                fut.set_result(convert(env))
            except MicrokernelError as exc:  # an error reply, or (call) a reply of another type
                fut.set_exception(exc)

    def _waiter(self, parent: bytes | None) -> tuple[asyncio.Future[Any] | None, Callable[[wire.Envelope], Any]]:
        """The future waiting for the reply to ``parent`` (taken out) and how to turn the reply's
        envelope into its value; ``(None, ...)`` when nobody waits for it."""
        if parent:
            for waiting, convert in ((self._pending, _same_envelope), (self._calls, rpc_result),
                                     (self._maps, _reply_map)):
                fut = waiting.pop(parent, None)
                if fut is not None:
                    return fut, convert
        return None, _same_envelope

    def send(self, message: Any, *, deadline_ns: int | None = None) -> None:
        """Fire-and-forget (one-way messages such as heartbeats)."""
        self.socket.send(wire.encode(message, sender=self.sender, deadline_ns=deadline_ns))

    async def request(
        self, message: Any, *, timeout: float | None = None, deadline_ns: int | None = None, try_now: bool = False,
    ) -> wire.Envelope:
        """Send ``message`` and await its ok reply; raises RemoteError or CallTimeout.

        With ``try_now`` the request must leave at once (a peer is connected) or ``NoPeer`` is
        raised: a caller with a cached address checks it is still good before trusting it.
        """
        msg_id = _new_msg_id()
        if deadline_ns is None and timeout is not None:
            deadline_ns = _time_ns() + int(timeout * 1e9)
        handoffs: list[str] = []
        frames = wire.encode(message, sender=self.sender, msg_id=msg_id, deadline_ns=deadline_ns,
                             shm_threshold=self._shm, handoffs=handoffs)
        return raise_for_error(await self._exchange(self._pending, msg_id, frames, handoffs, timeout, try_now, message))

    async def request_map(self, message: Any, *, timeout: float | None = None) -> dict[str, Any]:
        """``request``'s reply as the map of its fields (what the clients return), read from the
        usual reply's frames without building the reply message (see ``SyncRequester.request_map``)."""
        msg_id = _new_msg_id()
        deadline_ns = None if timeout is None else _time_ns() + int(timeout * 1e9)
        if type(message) is _Packed:
            frames = wire.packed_request(message, self.sender, msg_id, deadline_ns)
        else:
            frames = wire.encode(message, sender=self.sender, msg_id=msg_id, deadline_ns=deadline_ns)
        return await self._exchange(self._maps, msg_id, frames, _NO_HANDOFFS, timeout, False, message)

    async def call(self, method: str, args: dict[str, Any], *, timeout: float | None = None,
                   deadline_ns: int | None = None, try_now: bool = False) -> Any:
        """The result of ``method(**args)`` on the peer: what ``request(RpcRequest(method=method,
        args=args), ...)`` returns, unwrapped to the ``rpc_reply``'s result. The hot path of
        service-to-service calls: the usual request and reply skip the message classes (see
        ``SyncRequester.call``). Raises as ``request`` does."""
        msg_id = _new_msg_id()
        if deadline_ns is None and timeout is not None:
            deadline_ns = _time_ns() + int(timeout * 1e9)
        handoffs: list[str] = []
        if deadline_ns is None:
            frames = wire.encode_rpc_request(method, args, sender=self.sender, msg_id=msg_id,
                                             shm_threshold=self._shm, handoffs=handoffs)
        else:
            frames = self._rpc.encode(method, args, msg_id, deadline_ns, self._shm, handoffs)
        return await self._exchange(self._calls, msg_id, frames, handoffs, timeout, try_now, "rpc_request")

    async def _exchange(self, pending: dict[bytes, asyncio.Future[Any]], msg_id: bytes, frames: list[Any],
                        handoffs: list[str], timeout: float | None, try_now: bool, what: Any) -> Any:
        """Send a request's ``frames`` and await what ``_on_message`` resolves its future in ``pending``
        with; ``what``: its msg_type, or the message (for error messages)."""
        fut: asyncio.Future[Any] = self.socket.loop.create_future()
        pending[msg_id] = fut
        if try_now:
            if not self.socket.try_send(frames):
                del pending[msg_id]
                if handoffs:
                    handover.reclaim(handoffs)
                raise NoPeer(f"no connected peer at {', '.join(self.endpoints) or 'nowhere'}")
        else:
            self.socket.send(frames)
        try:
            if timeout is None:
                return await fut
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            raise CallTimeout(f"no reply to {_label(what)} from {', '.join(self.endpoints) or 'nowhere'} "
                              f"within {timeout:g}s") from None
        finally:
            pending.pop(msg_id, None)

    def close(self) -> None:
        for pending in (self._pending, self._calls, self._maps):
            for fut in pending.values():
                if not fut.done():
                    fut.set_exception(MicrokernelError(ErrorCode.UNAVAILABLE, "connection closed"))
            pending.clear()
        self.socket.close()


def _not_usual(frames: list[Any], max_size: int | None) -> None:
    """The ``decode_usual`` of ``SyncRequester.request``: every reply goes to the general decoder."""
    return None


class SyncRequester:
    """Blocking request/reply over a DEALER, for scripts and the synchronous client."""

    def __init__(
        self,
        ctx: zmq.Context,
        endpoints: Sequence[str],
        *,
        sender: str,
        immediate: bool = False,
        max_size: int | None = None,
        shm_threshold: int | None = None,
    ) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        if max_size is not None:
            self.sock.setsockopt(zmq.MAXMSGSIZE, frame_size_limit(max_size))
        self._timeouts: dict[int, int] = {}
        if immediate:
            self.sock.immediate = 1
        for ep in endpoints:
            self.sock.connect(ep)
        self.endpoints = list(endpoints)
        self.sender = sender
        self.max_size = max_size
        self.shm_threshold = shm_threshold  # as for AsyncRequester
        self._shm = shm_threshold if same_host(self.endpoints) else None
        self._rpc = wire.RpcRequestEncoder(sender)

    def connect(self, endpoint: str) -> None:
        if endpoint not in self.endpoints:
            self.sock.connect(endpoint)
            self.endpoints.append(endpoint)
            self._shm = self.shm_threshold if same_host(self.endpoints) else None

    def disconnect(self, endpoint: str) -> None:
        if endpoint in self.endpoints:
            self.endpoints.remove(endpoint)
            self._shm = self.shm_threshold if same_host(self.endpoints) else None
            try:
                self.sock.disconnect(endpoint)
            except zmq.ZMQError:
                pass

    def _set_timeout(self, option: int, ms: int) -> None:
        # Timeouts are rounded to 10 ms steps so a steady caller does not set them every call.
        ms = -(-ms // 10) * 10
        if self._timeouts.get(option) != ms:
            self.sock.setsockopt(option, ms)
            self._timeouts[option] = ms

    def request(self, message: Any, *, timeout: float, deadline_ns: int | None = None, try_now: bool = False) -> wire.Envelope:
        """Send and wait for the correlated reply; raises RemoteError or CallTimeout.

        With ``try_now`` the request must leave at once or ``NoPeer`` is raised (see AsyncRequester).
        """
        msg_id, deadline = self._start(message, timeout, deadline_ns, try_now)
        return self._await_reply(msg_id, deadline, timeout, message, _not_usual)[1]

    def request_map(self, message: Any, *, timeout: float, deadline_ns: int | None = None,
                    try_now: bool = False) -> dict[str, Any]:
        """``request``'s reply as the map of its fields (what the clients return).

        The usual reply (see ``wire.decode_reply_map``) is checked into that map straight from its
        frames, without building the reply message and its envelope. Raises as ``request``.
        """
        msg_id, deadline = self._start(message, timeout, deadline_ns, try_now)
        body, env = self._await_reply(msg_id, deadline, timeout, message, _decode_reply_map)
        return body if env is None else wire.body_of(env.message)

    def _start(self, message: Any, timeout: float, deadline_ns: int | None, try_now: bool) -> tuple[bytes, float]:
        """Encode and send a request: its msg_id, and the ``time.monotonic()`` its reply is due by."""
        msg_id = _new_msg_id()
        deadline = _monotonic() + timeout
        if deadline_ns is None:
            deadline_ns = _time_ns() + int(timeout * 1e9)
        if type(message) is _Packed:  # packed once (what monitoring loops send): only the header is made
            frames = wire.packed_request(message, self.sender, msg_id, deadline_ns)
            handoffs: list[str] = _NO_HANDOFFS
        else:
            handoffs = []
            frames = wire.encode(message, sender=self.sender, msg_id=msg_id, deadline_ns=deadline_ns,
                                 shm_threshold=self._shm, handoffs=handoffs)
        # ``message`` stands for its msg_type in error messages: looked up only for one.
        self._send_request(frames, handoffs, timeout, try_now, message)
        return msg_id, deadline

    def call(self, method: str, args: dict[str, Any], *, timeout: float, try_now: bool = False) -> Any:
        """The result of ``method(**args)`` on the peer: what ``request(RpcRequest(method=method,
        args=args), ...)`` returns, unwrapped to the ``rpc_reply``'s result.

        The hot path of ``Client.call``: no message instance is built, and the usual reply (see
        ``wire.decode_rpc_reply``) is read straight from its frames. Raises ``RemoteError`` (an
        error reply), ``MicrokernelError`` (a reply of another type), ``CallTimeout``, ``NoPeer``.
        """
        msg_id = _new_msg_id()
        deadline = _monotonic() + timeout
        handoffs: list[str] = []
        frames = self._rpc.encode(method, args, msg_id, _time_ns() + int(timeout * 1e9), self._shm, handoffs)
        self._send_request(frames, handoffs, timeout, try_now, "rpc_request")
        result, env = self._await_reply(msg_id, deadline, timeout, "rpc_request", _decode_rpc_reply)
        return result if env is None else rpc_result(env)

    def call_many(self, method: str, calls: Iterable[dict[str, Any]], *, timeout: float, window: int = 64,
                  try_now: bool = False, failed: Callable[[MicrokernelError], None] | None = None,
                  ) -> Iterator[Any]:
        """``call(method, args)`` for every ``args`` of ``calls``, up to ``window`` requests in flight
        at once (pipelined); yields the results in the order of ``calls``.

        ``calls`` is read lazily, at most ``window`` ahead of the results taken. Each request has
        its own ``timeout``, counted from its sending. A failed call raises (``RemoteError``,
        ``CallTimeout``, ...) when its result is due, after every earlier result, and is passed to
        ``failed`` first; requests still in flight are then abandoned (their replies are skipped
        like late replies). ``try_now`` applies to the first request (``NoPeer`` before anything
        is yielded).
        """
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        encode = self._rpc.encode
        sock = self.sock
        timeout_ns = int(timeout * 1e9)
        inflight: collections.deque[tuple[bytes, float]] = collections.deque()  # (msg_id, due), in send order
        replies: dict[bytes, Any] = {}  # msg_id -> _AWAITED, then the reply that came before its turn
        pending = iter(calls)
        more = True
        first = True
        try:
            while True:
                while more and len(inflight) < window:
                    args = next(pending, _NO_MORE)
                    if args is _NO_MORE:
                        more = False
                        break
                    msg_id = _new_msg_id()
                    handoffs: list[str] = []
                    frames = encode(method, args, msg_id, _time_ns() + timeout_ns, self._shm, handoffs)
                    if first:  # sets the send timeout, which stays: the later sends only send
                        self._send_request(frames, handoffs, timeout, try_now, "rpc_request")
                        first = False
                    else:
                        try:
                            send_message(sock, frames)
                        except zmq.Again:
                            self._send_timed_out(handoffs, timeout, "rpc_request")
                    inflight.append((msg_id, _monotonic() + timeout))
                    replies[msg_id] = _AWAITED
                if not inflight:
                    return
                msg_id, due = inflight.popleft()
                reply = replies.pop(msg_id)
                if reply is _AWAITED:
                    reply = self._await_reply(msg_id, due, timeout, "rpc_request", _decode_rpc_reply, replies)
                elif isinstance(reply, BaseException):
                    raise reply
                result, env = reply
                yield result if env is None else rpc_result(env)
        except MicrokernelError as exc:
            if failed is not None and not isinstance(exc, NoPeer):
                failed(exc)
            raise

    def _await_reply(self, msg_id: bytes, deadline: float, timeout: float, what: Any,
                     decode_usual: Callable[[list[Any], int | None], tuple[bytes | None, Any] | None],
                     others: dict[bytes, Any] | None = None) -> tuple[Any, wire.Envelope | None]:
        """The reply to ``msg_id``: ``(value, None)`` when ``decode_usual`` reads it, else ``(None,
        envelope)`` from the general decoder (which raises for an error reply). Late replies to
        earlier requests that timed out are skipped; ``what`` names the request in a timeout.
        ``others`` (``call_many``): the replies of other requests in flight, keyed ``_AWAITED``
        until they come, are kept there as they come (an undecodable one as its error)."""
        max_size = self.max_size
        timeouts = self._timeouts
        sock = self.sock
        while True:
            # A receive timeout instead of poll()+recv(): one system call less per round trip. It
            # is rounded as _set_timeout rounds, so a steady caller does not set it every call.
            left = deadline - _monotonic()
            try:
                if left <= 0:
                    raise zmq.Again()
                ms = -(-max(1, int(left * 1000)) // 10) * 10
                if timeouts.get(_RCVTIMEO) != ms:
                    self._set_timeout(_RCVTIMEO, ms)
                frames_in = recv_reply(sock)
            except zmq.Again:
                raise CallTimeout(f"no reply to {_label(what)} from {', '.join(self.endpoints)} "
                                  f"within {timeout:g}s") from None
            usual = decode_usual(frames_in, max_size)
            if usual is not None:
                parent = usual[0]
                if parent == msg_id:
                    return usual[1], None
                if others is not None and others.get(parent) is _AWAITED:
                    others[parent] = (usual[1], None)
                continue
            env = self._reply_to(frames_in, msg_id, others)
            if env is not None:
                return None, env

    def _send_request(self, frames: list[Any], handoffs: list[str], timeout: float, try_now: bool, what: Any) -> None:
        """Send a request's ``frames``; ``what``: its msg_type, or the message (for error messages)."""
        sock = self.sock
        if try_now:
            try:
                send_message(sock, frames, NOBLOCK)
            except zmq.Again:
                if handoffs:
                    handover.reclaim(handoffs)
                raise NoPeer(f"no connected peer at {', '.join(self.endpoints)}") from None
        else:
            ms = -(-max(1, int(timeout * 1000)) // 10) * 10  # as _set_timeout rounds: a steady caller skips it
            if self._timeouts.get(_SNDTIMEO) != ms:
                self._set_timeout(_SNDTIMEO, ms)
            try:
                send_message(sock, frames)
            except zmq.Again:
                self._send_timed_out(handoffs, timeout, what)

    def _send_timed_out(self, handoffs: list[str], timeout: float, what: Any) -> NoReturn:
        """A blocking send found no room within its SNDTIMEO: reclaim its hand-overs and raise."""
        if handoffs:
            handover.reclaim(handoffs)
        raise CallTimeout(f"could not send {_label(what)} to {', '.join(self.endpoints)} within {timeout:g}s "
                          "(nobody is listening)") from None

    def _reply_to(self, frames_in: list[Any], msg_id: bytes, others: dict[bytes, Any] | None = None,
                  ) -> wire.Envelope | None:
        """The decoded reply to ``msg_id`` (``RemoteError`` for an error reply), or None when
        ``frames_in`` is something else: a late reply to an earlier request, or undecodable (or a
        reply of one of ``others``, kept there: see ``_await_reply``)."""
        try:
            env = wire.decode(frames_in, max_size=self.max_size)
        except ProtocolError as exc:
            header = getattr(exc, "header", None)
            if header is not None and header.parent_id == msg_id:
                raise  # the reply to this request cannot be used (see AsyncRequester._on_message)
            if header is not None and others is not None and others.get(header.parent_id) is _AWAITED:
                others[header.parent_id] = exc
                return None
            log.warning("dropping an undecodable reply: %s", exc)
            return None
        header = env.header
        if header.parent_id != msg_id:
            if others is not None and others.get(header.parent_id) is _AWAITED:
                others[header.parent_id] = (None, env)
            return None  # else a late reply to an earlier request that timed out: ignore it
        if header.status == wire.STATUS_ERROR:
            err = env.message
            raise RemoteError(err.code, err.reason, err.details)
        return env

    def close(self) -> None:
        forget(self.sock)
        self.sock.close(linger=0)
