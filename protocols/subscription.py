"""Subscribing to the kernel's event bus without losing early events.

PUB/SUB subscriptions propagate asynchronously: a subscriber that connects and immediately
expects events can miss them (the "slow joiner"). We never sleep to paper over that. Instead a
subscriber also subscribes to a private probe topic ``_mk.welcome.<token>``; the kernel's XPUB
sees that subscription arrive and publishes ``kernel.welcome`` on exactly that topic. ZeroMQ
processes one peer's subscriptions in order, so when the welcome arrives every earlier
subscription of the socket is live.

Topic patterns are globs (``service.*``, ``train.progress``, ``*``); the socket subscribes to the
literal prefix before the first wildcard and the exact match is checked locally.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import zmq

from protocols import wire
from protocols.errors import CallTimeout, ProtocolError
from protocols.transport import NOBLOCK, AsyncSocket, frame_size_limit, recv_message

log = logging.getLogger("microkernel.subscription")

WELCOME_PREFIX = "_mk.welcome."
INTERNAL_PREFIX = "_mk."

# How long a wait without a timeout blocks in one poll before it checks for signals again.
_IDLE_SLICE_MS = 500


def topic_prefix(pattern: str) -> str:
    """The literal prefix of a glob pattern: what the SUB socket subscribes to."""
    for i, ch in enumerate(pattern):
        if ch in "*?[":
            return pattern[:i]
    return pattern


def topic_matches(patterns: Sequence[str], topic: str) -> bool:
    """Whether ``topic`` matches any of the glob ``patterns`` (internal topics never do)."""
    if topic.startswith(INTERNAL_PREFIX):
        return False
    return any(p == topic or fnmatch.fnmatchcase(topic, p) for p in patterns)


class TopicMatcher:
    """``topic_matches`` for fixed patterns, remembering the answer per topic (topics repeat)."""

    __slots__ = ("patterns", "_known")

    _LIMIT = 4096  # distinct topics remembered; past it the memory starts over

    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = tuple(patterns)
        self._known: dict[str, bool] = {}

    def __call__(self, topic: str) -> bool:
        known = self._known.get(topic)
        if known is None:
            if len(self._known) >= self._LIMIT:
                self._known.clear()
            known = self._known[topic] = topic_matches(self.patterns, topic)
        return known


def _new_token() -> str:
    return os.urandom(8).hex()


def _limit_size(sock: zmq.Socket, max_size: int | None) -> None:
    """Cap inbound frames (ZMQ_MAXMSGSIZE) so an absurd event is refused before it is buffered;
    events over ``max_size`` but under the cap are dropped by ``wire.decode``."""
    if max_size is not None:
        sock.setsockopt(zmq.MAXMSGSIZE, frame_size_limit(max_size))


def _subscribe(sock: zmq.Socket, patterns: Sequence[str], token: str) -> None:
    for prefix in sorted({topic_prefix(p) for p in patterns}):
        sock.setsockopt(zmq.SUBSCRIBE, prefix.encode())
    sock.setsockopt(zmq.SUBSCRIBE, (WELCOME_PREFIX + token).encode())


class AsyncSubscriber:
    """Event subscriber inside an asyncio loop; ``on_event`` gets each matching Envelope."""

    def __init__(
        self,
        ctx: zmq.Context,
        endpoint: str,
        patterns: Sequence[str],
        on_event: Callable[[wire.Envelope], None],
        *,
        max_size: int | None = None,
    ) -> None:
        self.patterns = list(patterns)
        self._matches = TopicMatcher(self.patterns)
        self.on_event = on_event
        self.max_size = max_size
        self._token = _new_token()
        self._welcome_topic = WELCOME_PREFIX + self._token
        self._live = asyncio.get_running_loop().create_future()
        sock = ctx.socket(zmq.SUB)
        sock.linger = 0
        _limit_size(sock, max_size)
        _subscribe(sock, self.patterns, self._token)
        sock.connect(endpoint)
        self.endpoint = endpoint
        self.socket = AsyncSocket(sock, self._on_message)

    def _on_message(self, frames: list[Any]) -> None:
        try:
            env = wire.decode(frames, topic=True, max_size=self.max_size)
        except ProtocolError as exc:
            log.warning("dropping an undecodable event: %s", exc)
            return
        topic = env.topic or env.msg_type
        if topic == self._welcome_topic:
            if not self._live.done():
                self._live.set_result(env.message)
            return
        if self._matches(topic):
            self.on_event(env)

    async def wait_live(self, timeout: float = 10.0) -> None:
        """Return once every subscription of this socket is live at the kernel."""
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._live)
        except TimeoutError:
            raise CallTimeout(f"no welcome from the event bus at {self.endpoint} within {timeout:g}s") from None

    def close(self) -> None:
        self.socket.close()


class SyncSubscriber:
    """Blocking event subscriber; iterate it or call ``next_event``."""

    def __init__(
        self,
        ctx: zmq.Context,
        endpoint: str,
        patterns: Sequence[str],
        *,
        timeout: float = 10.0,
        max_size: int | None = None,
    ) -> None:
        self.patterns = list(patterns) or ["*"]
        self.max_size = max_size
        self.endpoint = endpoint
        token = _new_token()
        self._welcome_topic = WELCOME_PREFIX + token
        self.sock = ctx.socket(zmq.SUB)
        self.sock.linger = 0
        _limit_size(self.sock, max_size)
        _subscribe(self.sock, self.patterns, token)
        self.sock.connect(endpoint)
        self._backlog: list[wire.Envelope] = []
        self._matches = TopicMatcher(self.patterns)
        self._wait_live(timeout)

    def _wait_live(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(max(1, int(left * 1000))):
                self.close()
                raise CallTimeout(f"no welcome from the event bus at {self.endpoint} within {timeout:g}s (is the kernel running?)")
            env = self._recv()
            if env is None:
                continue
            if env.topic == self._welcome_topic:
                return
            if self._matches(env.topic or env.msg_type):
                self._backlog.append(env)

    def _recv(self, flags: int = 0) -> wire.Envelope | None:
        frames = recv_message(self.sock, flags)
        try:
            return wire.decode(frames, topic=True, max_size=self.max_size)
        except ProtocolError as exc:
            log.warning("dropping an undecodable event: %s", exc)
            return None

    def next_event(self, timeout: float | None = None) -> wire.Envelope | None:
        """The next matching event, or None when ``timeout`` seconds pass without one."""
        if self._backlog:
            return self._backlog.pop(0)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            # Events come in bursts: try the queue first and poll only when it is empty.
            try:
                env = self._recv(NOBLOCK)
            except zmq.Again:
                if deadline is None:
                    # Waiting forever, but in slices: a signal (Ctrl-C) delivered to another
                    # thread of the process does not interrupt this one's poll, and its Python
                    # handler only runs once this thread is back in the interpreter.
                    self.sock.poll(_IDLE_SLICE_MS)
                    continue
                left = deadline - time.monotonic()
                if left <= 0 or not self.sock.poll(max(1, int(left * 1000))):
                    return None
                continue
            if env is not None and self._matches(env.topic or env.msg_type):
                return env

    def __iter__(self) -> Iterator[wire.Envelope]:
        while True:
            env = self.next_event()
            if env is not None:
                yield env

    def close(self) -> None:
        self.sock.close(linger=0)
