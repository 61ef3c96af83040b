"""The event bus: an XSUB/XPUB proxy in libzmq's own forwarding loop, plus the kernel's own events.

Services publish to the XSUB side; anyone subscribes on the XPUB side. Frames are forwarded by
``zmq.proxy_steerable`` in a thread of its own — C code that never takes the GIL per message, so a
storm of service events costs the kernel's event loop nothing. The kernel publishes its own events
(``service.ready``, ``service.exited`` …) through an XPUB of its own connected to the proxy's XSUB
over inproc, with a monotonically increasing ``seq``, and keeps the last N in a history ring so late
joiners can catch up (``events_request``).

Slow joiners: the proxy's XPUB runs verbose and forwards every subscription upstream, so the
kernel's XPUB (verbose too) sees each one. A subscription to ``_mk.welcome.<token>`` is answered
with ``kernel.welcome`` on that topic; ZeroMQ applies one peer's subscriptions in order, so the
subscriber then knows all its subscriptions are live.
"""

from __future__ import annotations

import collections
import fnmatch
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from protocols import messages, wire
from protocols.subscription import WELCOME_PREFIX
from protocols.transport import AsyncSocket

log = logging.getLogger("microkernel.events")

_WELCOME = WELCOME_PREFIX.encode()
SUBSCRIPTION_MAX_SIZE = 64 * 1024  # bytes; the ZMQ_MAXMSGSIZE of the subscribe side


class EventBus:
    """Owns the XSUB (publish-in) and XPUB (subscribe) sockets and the event history."""

    def __init__(self, ctx: zmq.Context, *, events_in: str, events_out: str, history: int, sender: str = "kernel",
                 max_size: int | None = None, bind_more: Callable[[zmq.Socket], None] | None = None) -> None:
        """``max_size``: the largest frame a publisher may send (``kernel.max_message_size``); a
        larger one disconnects that publisher (ZMQ_MAXMSGSIZE), the bus carries on."""
        self.sender = sender
        self.events_out = events_out
        self._seq = 0
        self.published: collections.Counter[str] = collections.Counter()
        """Kernel events published, by topic (the metrics endpoint reports them)."""
        self.observers: list[Callable[[Any], None]] = []
        """Called with every kernel event as it is emitted (e.g. the metrics' exit counters); must be cheap."""
        self.history: collections.deque[dict[str, Any]] = collections.deque(maxlen=max(1, history))
        internal = f"inproc://mk-bus-{os.getpid()}-{id(self):x}"
        xsub = ctx.socket(zmq.XSUB)
        xsub.linger = 0
        if max_size is not None:
            # Nobody can be answered on a bus: an oversized frame just drops its publisher's
            # connection (which reconnects) before the proxy buffers it. inproc is not limited.
            xsub.setsockopt(zmq.MAXMSGSIZE, max_size)
        xsub.bind(events_in)
        xsub.bind(internal)
        # Subscribe upstream to everything once, instead of relying on each subscriber's filters:
        # a service's events then reach the proxy before any subscription could, so a subscriber
        # that has its welcome cannot lose an event to a filter still travelling to the service.
        xsub.send(b"\x01")
        xpub = ctx.socket(zmq.XPUB)
        xpub.linger = 0
        xpub.setsockopt(zmq.XPUB_VERBOSE, 1)
        # Subscribers that cannot keep up lose events at the HWM instead of stalling the proxy.
        xpub.setsockopt(zmq.SNDHWM, 100_000)
        # Subscribers only send subscriptions (topic prefixes) here: anything larger is hostile.
        xpub.setsockopt(zmq.MAXMSGSIZE, SUBSCRIPTION_MAX_SIZE)
        xpub.bind(events_out)
        if bind_more is not None:  # e.g. a CURVE tcp endpoint (microkernel.security.gate.Gate.bind_events)
            bind_more(xpub)
        control_addr = internal + "-control"
        self._control = ctx.socket(zmq.PAIR)
        self._control.linger = 0
        self._control.bind(control_addr)
        proxy_control = ctx.socket(zmq.PAIR)
        proxy_control.linger = 0
        proxy_control.connect(control_addr)
        # The proxy thread owns these three sockets from here on (handed over before it starts).
        self._thread = threading.Thread(target=_forward, args=(xsub, xpub, proxy_control), name="mk-bus", daemon=True)
        self._thread.start()
        publisher = ctx.socket(zmq.XPUB)
        publisher.linger = 0
        publisher.setsockopt(zmq.XPUB_VERBOSE, 1)
        publisher.setsockopt(zmq.SNDHWM, 100_000)
        publisher.connect(internal)
        self._xpub = AsyncSocket(publisher, self._on_subscription, drop_when_full=True)

    @property
    def next_seq(self) -> int:
        return self._seq + 1

    def _on_subscription(self, frames: list[Any]) -> None:
        raw = frames[0].bytes if hasattr(frames[0], "bytes") else bytes(frames[0])
        if raw[:1] == b"\x01" and raw[1:].startswith(_WELCOME):
            topic = raw[1:].decode("utf-8", "replace")
            self._send(messages.KernelWelcome(next_seq=self.next_seq), topic)

    def _send(self, event: Any, topic: str) -> None:
        self._xpub.send(wire.encode(event, sender=self.sender, topic=topic))

    def emit(self, event_type: type, **fields: Any) -> Any:
        """Publish a kernel event of ``event_type`` (a registered event class); returns it."""
        self._seq += 1
        event = event_type(seq=self._seq, **fields)
        topic = wire.msg_type_of(event)
        self.history.append({"seq": self._seq, "topic": topic, "ts_ns": time.time_ns(), "data": wire.body_of(event)})
        self._send(event, topic)
        self.published[topic] += 1
        for observer in self.observers:
            try:
                observer(event)
            except Exception:  # an observer's bug must not break whoever emitted the event
                log.exception("event observer %r failed on %s", observer, topic)
        log.debug("event %s %s", topic, fields)
        return event

    def past(self, since_seq: int, pattern: str, limit: int) -> list[dict[str, Any]]:
        """Kernel events from the history ring with ``seq >= since_seq`` matching ``pattern``."""
        out = []
        for entry in self.history:
            if entry["seq"] < since_seq:
                continue
            if pattern not in ("", "*") and not fnmatch.fnmatchcase(entry["topic"], pattern):
                continue
            out.append(entry)
            if len(out) >= limit:
                break
        return out

    def close(self) -> None:
        """Stop the proxy thread and close every socket of the bus."""
        if self._thread.is_alive():
            try:
                self._control.send(b"TERMINATE")
            except zmq.ZMQError:
                pass
            self._thread.join(timeout=_JOIN_CEILING)
        self._control.close()
        self._xpub.close()


_JOIN_CEILING = 5.0  # seconds; the proxy returns as soon as it reads TERMINATE


def _forward(xsub: zmq.Socket, xpub: zmq.Socket, control: zmq.Socket) -> None:
    """The proxy thread: forward both ways until TERMINATE arrives on ``control``, then close."""
    try:
        zmq.proxy_steerable(xsub, xpub, None, control)
    except zmq.ContextTerminated:
        pass
    except zmq.ZMQError as exc:
        log.error("the event bus proxy stopped: %s", exc)
    finally:
        for sock in (xsub, xpub, control):
            sock.close(linger=0)
