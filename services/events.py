"""A replica's side of the event bus: publishing events and delivering subscribed ones.

Publishing uses an XPUB socket connected to the kernel's XSUB rather than a plain PUB. Both
look the same to the kernel, but the XPUB also *receives* the subscriptions the kernel's XSUB
forwards. A PUB silently drops everything sent before those subscriptions reach it (the
publisher-side slow joiner); with the XPUB, events published before the first subscription
message arrives are held in a bounded backlog and flushed when it does. The XSUB sends all of
its subscriptions in one batch when the connection attaches, and the XPUB applies a batch
before handing the first message of it to us, so "first subscription seen" means "synced".
(This is exact when the kernel's XSUB subscribes to everything; when it only forwards its
subscribers' subscriptions, events published while nobody subscribes at all wait in the
backlog until someone does, which is why the backlog is small.)

Subscribed events go through ``protocols.subscription.AsyncSubscriber`` (the welcome
handshake). Events are held back until the service is ready, then delivered in order: sync
handlers inline, async handlers through one bounded queue and worker task per handler, so a
slow handler delays only itself and never reorders its own events.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any

import zmq

from protocols import wire
from protocols.registry import class_for
from protocols.subscription import INTERNAL_PREFIX, AsyncSubscriber, topic_matches
from protocols.transport import AsyncSocket
from services.handlers import SubscriptionHandler, portable

BACKLOG_LIMIT = 1_000
TOPICS_REMEMBERED = 1_024  # event topics whose name was checked once (more are checked every time)
QUEUE_LIMIT = 10_000
SUBSCRIPTION_MAX_SIZE = 64 * 1024  # bytes; ZMQ_MAXMSGSIZE of the publisher's XPUB (subscriptions only)
_SUBSCRIBE = 1  # first byte of an XPUB subscription message; 0 is unsubscribe


class EventPublisher:
    """Publishes events to the kernel's XSUB endpoint without losing the first ones."""

    def __init__(self, ctx: zmq.Context, endpoint: str, *, sender: str, log: logging.Logger,
                 backlog_limit: int = BACKLOG_LIMIT) -> None:
        sock = ctx.socket(zmq.XPUB)
        sock.linger = 0
        # It only ever receives the kernel's subscriptions (short topic patterns): anything larger
        # disconnects the sender before it is buffered, as on the kernel's own subscribe side.
        sock.setsockopt(zmq.MAXMSGSIZE, SUBSCRIPTION_MAX_SIZE)
        sock.connect(endpoint)
        self.sender = sender
        self.log = log
        self._encoder = wire.EventEncoder(sender)  # the loop thread's (see publish)
        self._topics: set[str] = set()  # topics that passed _check_topic
        self.synced = False
        self._backlog: collections.deque[list[Any]] = collections.deque()
        self._backlog_limit = backlog_limit
        self._dropped = 0
        self.socket = AsyncSocket(sock, self._on_subscription)

    def _on_subscription(self, frames: list[Any]) -> None:
        if self.synced or not frames:
            return
        first = frames[0]
        data = first.bytes if isinstance(first, zmq.Frame) else bytes(first)
        if data[:1] == bytes((_SUBSCRIBE,)):
            self.synced = True
            while self._backlog:
                self.socket.send(self._backlog.popleft())
            if self._dropped:
                self.log.info("dropped %d events published before any subscription reached this replica", self._dropped)

    def _check_topic(self, topic: str) -> None:
        if type(topic) is str and topic in self._topics:
            return
        if not isinstance(topic, str) or not topic:
            raise TypeError(f"event topic must be a non-empty string, got {topic!r}")
        if topic.startswith(INTERNAL_PREFIX) or class_for(topic) is not None:
            raise ValueError(f"event topic {topic!r} is reserved for the kernel")
        if len(self._topics) < TOPICS_REMEMBERED:
            self._topics.add(topic)

    def encode(self, topic: str, data: dict[str, Any]) -> list[Any]:
        """The frames of an event; raises TypeError/ValueError for unusable input.

        Pure (touches no socket), so it may run in any thread; ``send`` must run on the loop.
        """
        self._check_topic(topic)
        if not isinstance(data, dict):
            raise TypeError(f"event data must be a dict, got {type(data).__name__}")
        try:
            return wire.encode(wire.Event(topic, data), sender=self.sender, topic=topic)
        except (TypeError, ValueError, OverflowError):
            return wire.encode(wire.Event(topic, portable(data)), sender=self.sender, topic=topic)

    def send(self, frames: list[Any]) -> None:
        """Send encoded event frames now, or hold them until the bus connection is synced."""
        if self.synced:
            self.socket.send(frames)
            return
        if len(self._backlog) >= self._backlog_limit:
            self._backlog.popleft()
            self._dropped += 1
            if self._dropped == 1:
                self.log.info("no event subscription reached this replica yet: keeping only the latest %d events",
                              self._backlog_limit)
        self._backlog.append(frames)

    def publish(self, topic: str, data: dict[str, Any]) -> None:
        """``send(encode(topic, data))``, on the loop's thread only: the usual event is built by
        the loop's own ``wire.EventEncoder`` (the same bytes, fewer steps)."""
        self._check_topic(topic)
        frames = self._encoder.encode(topic, data)  # None for anything but the usual event
        self.send(frames if frames is not None else self.encode(topic, data))

    def close(self, linger: int = 0) -> None:
        if self._backlog:
            self.log.debug("%d events were never sent: no subscription reached this replica", len(self._backlog))
        self.socket.close(linger=linger)


class EventDispatcher:
    """Delivers subscribed events to a service's ``@subscribe`` handlers."""

    def __init__(self, ctx: zmq.Context, endpoint: str, handlers: list[SubscriptionHandler], *,
                 log: logging.Logger, max_size: int | None = None, queue_limit: int = QUEUE_LIMIT) -> None:
        self.handlers = handlers
        self.log = log
        self._queue_limit = queue_limit
        # Events that arrive before start() (while setup runs) wait here, in order.
        self._held: collections.deque[tuple[SubscriptionHandler, str, dict[str, Any]]] | None = collections.deque()
        self._queues: dict[str, asyncio.Queue[tuple[str, dict[str, Any]]]] = {}
        self._workers: set[asyncio.Task[None]] = set()
        self._dropped = 0
        patterns = list(dict.fromkeys(p for h in handlers for p in h.patterns))
        self.subscriber = AsyncSubscriber(ctx, endpoint, patterns, self._on_event, max_size=max_size)

    async def wait_live(self, timeout: float) -> None:
        """Return once every subscription is live at the kernel (raises CallTimeout)."""
        await self.subscriber.wait_live(timeout)

    def start(self) -> None:
        """Begin delivering: start one worker per async handler, then flush held events."""
        loop = asyncio.get_running_loop()
        for handler in self.handlers:
            if handler.is_async:
                queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue(self._queue_limit)
                self._queues[handler.name] = queue
                task = loop.create_task(self._worker(handler, queue), name=f"subscriber:{handler.name}")
                self._workers.add(task)
                task.add_done_callback(self._workers.discard)
        held, self._held = self._held, None
        for handler, topic, data in held or ():
            self._deliver(handler, topic, data)

    def _on_event(self, env: wire.Envelope) -> None:
        topic = env.topic or env.msg_type
        message = env.message
        data = message.data if type(message) is wire.Event else wire.body_of(message)
        for handler in self.handlers:
            if not topic_matches(handler.patterns, topic):
                continue
            held = self._held
            if held is None:
                self._deliver(handler, topic, data)
            elif len(held) < self._queue_limit:
                held.append((handler, topic, data))
            else:
                self._drop(handler, topic)

    def _deliver(self, handler: SubscriptionHandler, topic: str, data: dict[str, Any]) -> None:
        if handler.is_async:
            try:
                self._queues[handler.name].put_nowait((topic, data))
            except asyncio.QueueFull:
                self._drop(handler, topic)
            return
        try:
            handler.fn(topic, data)
        except Exception:
            self.log.exception("event handler %s failed on %s", handler.name, topic)

    def _drop(self, handler: SubscriptionHandler, topic: str) -> None:
        self._dropped += 1
        if self._dropped == 1 or self._dropped % 1000 == 0:
            self.log.warning("event handler %s is behind: dropped %s (%d events dropped so far)",
                             handler.name, topic, self._dropped)

    async def _worker(self, handler: SubscriptionHandler, queue: asyncio.Queue[tuple[str, dict[str, Any]]]) -> None:
        while True:
            topic, data = await queue.get()
            try:
                await handler.fn(topic, data)
            except Exception:
                self.log.exception("event handler %s failed on %s", handler.name, topic)

    async def stop(self) -> None:
        """Stop delivering (undelivered events are discarded) and close the socket."""
        self.subscriber.close()
        workers = list(self._workers)
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)

    def close(self) -> None:
        self.subscriber.close()
        for task in self._workers:
            task.cancel()
