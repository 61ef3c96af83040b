"""Event streams for the client: live subscription plus loss-free replay of the kernel's history.

An event stream is live when the caller gets it: the subscription handshake (the kernel's
``kernel.welcome`` on a private probe topic, see ``protocols.subscription``) completes before
``Client.events`` returns, so nothing published afterwards is missed.

Replay (``since_seq``) must neither lose nor duplicate kernel events. The order that guarantees
it: subscribe first, *then* ask for the history. Every kernel event is then either in the
history reply or arrives live (or both); those that arrive live with ``seq`` below the history
reply's ``next_seq`` were already replayed and are dropped. Events published by services carry
no ``seq`` and are never in the history, so they are always passed through.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Sequence
from typing import Any

from protocols import messages, wire
from protocols.errors import ProtocolError
from protocols.registry import build, class_for, fields_of
from protocols.subscription import AsyncSubscriber, SyncSubscriber, topic_matches

HISTORY_PAGE = 1000
# A pattern no topic matches: asks the kernel for the events endpoint without any history.
NO_MATCH_PATTERN = "_mk.endpoint-probe"

__all__ = ["AsyncEventStream", "EventStream", "HistoryReplay", "envelope_from_history", "event_seq"]


def event_seq(env: wire.Envelope) -> int | None:
    """The kernel sequence number of an event, or None (service-published events have none)."""
    msg = env.message
    if isinstance(msg, wire.Event):
        seq = msg.data.get("seq")
    else:
        seq = getattr(msg, "seq", None)
    return seq if type(seq) is int and seq > 0 else None


def envelope_from_history(entry: dict[str, Any]) -> wire.Envelope:
    """Turn one ``events_reply`` history entry ``{seq, topic, ts_ns, data}`` into an Envelope.

    The result looks like a live event (same message classes), so consumers need no second code
    path; ``header.sender`` is ``"history"`` for anyone who wants to tell them apart.
    """
    topic = str(entry.get("topic", ""))
    seq = entry.get("seq")
    data = dict(entry.get("data") or {})
    cls = class_for(topic)
    message: Any
    if cls is not None:
        if "seq" in fields_of(cls) and "seq" not in data and type(seq) is int:
            data["seq"] = seq
        try:
            message = build(cls, data)
        except ProtocolError:
            # A newer kernel may send a shape this client does not know: keep the raw data.
            message = wire.Event(topic, data)
    else:
        message = wire.Event(topic, data)
    header = wire.Header(
        msg_id=b"",
        msg_type=topic,
        version=wire.PROTOCOL_VERSION,
        sender="history",
        ts_ns=int(entry.get("ts_ns") or 0),
    )
    return wire.Envelope(routing=[], header=header, message=message, buffers=[], topic=topic)


class HistoryReplay:
    """Pages through the kernel's event history (pure bookkeeping; the client does the I/O).

    Usage: ``while not replay.done: replay.absorb(request(replay.request()))``; then
    ``replay.events`` holds the matching events in order and ``replay.live_from`` the first
    ``seq`` that is not part of the replay.
    """

    def __init__(self, since_seq: int, patterns: Sequence[str]) -> None:
        self.patterns = list(patterns) or ["*"]
        self._since = max(0, since_seq)
        self.events: list[wire.Envelope] = []
        self.live_from = self._since
        self.done = False

    def request(self) -> messages.EventsRequest:
        """The next page to ask for. One pattern is filtered by the kernel, several locally."""
        pattern = self.patterns[0] if len(self.patterns) == 1 else "*"
        return messages.EventsRequest(since_seq=self._since, pattern=pattern, limit=HISTORY_PAGE)

    def absorb(self, reply: messages.EventsReply) -> None:
        """Take one ``events_reply`` page; sets ``done`` when the history is exhausted."""
        last_seq = None
        for entry in reply.events:
            seq = entry.get("seq")
            if type(seq) is int:
                last_seq = seq if last_seq is None else max(last_seq, seq)
            if topic_matches(self.patterns, str(entry.get("topic", ""))):
                self.events.append(envelope_from_history(entry))
        self.live_from = max(self.live_from, reply.next_seq, (last_seq or 0) + 1)
        if len(reply.events) >= HISTORY_PAGE and last_seq is not None:
            self._since = last_seq + 1
        else:
            self.done = True


def _is_replayed(env: wire.Envelope, live_from: int | None) -> bool:
    if live_from is None:
        return False
    seq = event_seq(env)
    return seq is not None and seq < live_from


class EventStream:
    """A blocking iterator of events (``wire.Envelope``), already subscribed when created.

    Iterate it (``for env in stream``) or call ``next_event(timeout)``. Close it (or use it as a
    context manager) to release the socket. Not thread-safe: consume it from one thread.
    """

    def __init__(self, subscriber: SyncSubscriber, replay: HistoryReplay | None = None) -> None:
        self._subscriber = subscriber
        self._backlog: collections.deque[wire.Envelope] = collections.deque(replay.events if replay else ())
        self._live_from = replay.live_from if replay else None

    @property
    def endpoint(self) -> str:
        """The kernel's event (XPUB) endpoint this stream is connected to."""
        return self._subscriber.endpoint

    def next_event(self, timeout: float | None = None) -> wire.Envelope | None:
        """The next event, or None if ``timeout`` seconds pass without one (None: wait forever)."""
        if self._backlog:
            return self._backlog.popleft()
        while True:
            env = self._subscriber.next_event(timeout)
            if env is None or not _is_replayed(env, self._live_from):
                return env
            # A duplicate of a replayed event: skip it (the timeout restarts; it is a ceiling).

    def __iter__(self) -> EventStream:
        return self

    def __next__(self) -> wire.Envelope:
        env = self.next_event(None)
        assert env is not None  # no timeout: next_event only returns with an event
        return env

    def close(self) -> None:
        """Unsubscribe and close the socket."""
        self._subscriber.close()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Wakes readers of a closed AsyncEventStream (never a real event).
_CLOSED: Any = object()

# Opens the subscription for an AsyncEventStream: given the callback that receives live events,
# returns the subscriber (already live) and the replay (or None without since_seq).
AsyncOpener = Callable[[Callable[[wire.Envelope], None]], Any]


class AsyncEventStream:
    """An async iterator of events from ``AsyncClient.events``.

    The subscription is opened by ``await stream`` / ``async with stream`` (after which nothing
    published is missed) or, lazily, by the first ``async for`` step. Live events are queued
    without bound until consumed.
    """

    def __init__(self, opener: AsyncOpener) -> None:
        self._opener = opener
        self._queue: asyncio.Queue[wire.Envelope] = asyncio.Queue()
        self._subscriber: AsyncSubscriber | None = None
        self._backlog: collections.deque[wire.Envelope] = collections.deque()
        self._live_from: int | None = None
        self._closed = False

    async def open(self) -> AsyncEventStream:
        """Subscribe (and replay the history if asked); idempotent."""
        if self._subscriber is None and not self._closed:
            subscriber, replay = await self._opener(self._queue.put_nowait)
            self._subscriber = subscriber
            if replay is not None:
                self._backlog.extend(replay.events)
                self._live_from = replay.live_from
        return self

    def __await__(self) -> Any:
        return self.open().__await__()

    async def next_event(self, timeout: float | None = None) -> wire.Envelope | None:
        """The next event, or None if ``timeout`` seconds pass without one (None: wait forever)
        or the stream is closed."""
        if self._closed:
            return None
        await self.open()
        if self._backlog:
            return self._backlog.popleft()
        try:
            async with asyncio.timeout(timeout):
                while True:
                    env = await self._queue.get()
                    if env is _CLOSED:
                        self._queue.put_nowait(env)  # wake every other waiter too
                        return None
                    if not _is_replayed(env, self._live_from):
                        return env
        except TimeoutError:
            return None

    def __aiter__(self) -> AsyncEventStream:
        return self

    async def __anext__(self) -> wire.Envelope:
        env = await self.next_event(None)
        if env is None:  # closed
            raise StopAsyncIteration
        return env

    def close(self) -> None:
        """Unsubscribe and close the socket; pending and later reads end (``None`` / iteration stops)."""
        if self._closed:
            return
        self._closed = True
        self._queue.put_nowait(_CLOSED)
        if self._subscriber is not None:
            self._subscriber.close()

    async def __aenter__(self) -> AsyncEventStream:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        self.close()
