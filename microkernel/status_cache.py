"""The status reply, built once per change instead of once per request.

Monitoring polls ``status_request`` in loops; building the reply (every service, every replica,
their resources) costs far more than answering a ping. The reply is rebuilt when anything it shows
has changed (the supervisor's records, admissions, placements, leases, waiting lease requests, the
warm standby) and at least every ``TTL_S``: the time-dependent figures (``uptime_s``, the last
memory samples, host memory) are at most that old, while states, pids, endpoints, restarts and
leases are always current.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Any

TTL_S = 0.1


class StatusCache:
    """Remembers built replies by request, valid while ``key()`` is unchanged and younger than ``ttl``."""

    def __init__(self, key: Callable[[], Hashable], *, ttl: float = TTL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._key = key
        self._ttl = ttl
        self._clock = clock
        self._current: Hashable = None
        self._expires = 0.0
        self._replies: dict[Hashable, Any] = {}

    def get(self, request: Hashable, build: Callable[[], Any]) -> Any:
        """The cached reply to ``request``, or ``build()`` when something changed (which is cached)."""
        now = self._clock()
        key = self._key()
        if key != self._current or now >= self._expires:
            self._replies.clear()
            self._current = key
            self._expires = now + self._ttl
        reply = self._replies.get(request)
        if reply is None:
            reply = self._replies[request] = build()
        return reply
