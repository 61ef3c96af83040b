"""The event bus: an XSUB/XPUB proxy inside the kernel's loop, plus the kernel's own events.

Services publish to the XSUB side; anyone subscribes on the XPUB side. Frames are forwarded
untouched (no decode on the hot path). The kernel publishes its own events (``service.ready``,
``service.exited`` …) directly on the XPUB with a monotonically increasing ``seq`` and keeps
the last N in a history ring so late joiners can catch up (``events_request``).

Slow joiners: the XPUB runs verbose, so the kernel sees every subscription. A subscription to
``_mk.welcome.<token>`` is answered with ``kernel.welcome`` on that topic; ZeroMQ applies one
peer's subscriptions in order, so the subscriber then knows all its subscriptions are live.
"""

from __future__ import annotations

import collections
import fnmatch
import logging
import time
from typing import Any

import zmq

from protocols import messages, wire
from protocols.subscription import WELCOME_PREFIX
from protocols.transport import AsyncSocket

log = logging.getLogger("microkernel.events")

_WELCOME = WELCOME_PREFIX.encode()


class EventBus:
    """Owns the XSUB (publish-in) and XPUB (subscribe) sockets and the event history."""

    def __init__(self, ctx: zmq.Context, *, events_in: str, events_out: str, history: int, sender: str = "kernel") -> None:
        self.sender = sender
        self.events_out = events_out
        self._seq = 0
        self.history: collections.deque[dict[str, Any]] = collections.deque(maxlen=max(1, history))
        self.forwarded = 0
        xsub = ctx.socket(zmq.XSUB)
        xsub.linger = 0
        xsub.bind(events_in)
        xpub = ctx.socket(zmq.XPUB)
        xpub.linger = 0
        xpub.setsockopt(zmq.XPUB_VERBOSE, 1)
        # Subscribers that cannot keep up lose events at the HWM instead of stalling the kernel.
        xpub.setsockopt(zmq.SNDHWM, 100_000)
        xpub.bind(events_out)
        self._xpub = AsyncSocket(xpub, self._on_subscription, drop_when_full=True)
        self._xsub = AsyncSocket(xsub, self._on_published)
        # Subscribe upstream to everything once, instead of forwarding each subscriber's filters:
        # a service's events then reach the proxy before any subscription could, so a subscriber
        # that has its welcome cannot lose an event to a filter still travelling to the service.
        self._xsub.send([b"\x01"])

    @property
    def next_seq(self) -> int:
        return self._seq + 1

    def _on_published(self, frames: list[Any]) -> None:
        # Hot path: forward as-is. Decoding (and validating) is the subscribers' business.
        self.forwarded += 1
        self._xpub.send(frames)

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
        self._xsub.close()
        self._xpub.close()
