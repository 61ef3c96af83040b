"""Heartbeat liveness bookkeeping (ZeroMQ MDP / Paranoid Pirate style), with an injected clock.

A peer is presumed dead once it has been silent for ``interval * liveness`` seconds, i.e. after
``liveness`` missed heartbeats. This module only keeps the books; the bus feeds it beats and asks
it, on a timer armed from :meth:`Liveness.next_deadline`, which peers have expired.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["Liveness"]

K = TypeVar("K", bound=Hashable)


class Liveness(Generic[K]):
    """Last-heard times of peers, and which of them have gone silent for too long.

    ``now`` must come from one monotonic clock. Each silent peer is reported by :meth:`expired`
    once; it is reported again only after it beats again (and falls silent again). A reported peer
    stays known (``key in liveness``, :meth:`last_seen`) until :meth:`forget`.
    """

    __slots__ = ("_expired", "_interval", "_live", "_liveness")

    def __init__(self, interval: float, liveness: int) -> None:
        if interval <= 0:
            raise ValueError(f"heartbeat interval must be > 0, got {interval!r}")
        if liveness < 1:
            raise ValueError(f"heartbeat liveness must be >= 1, got {liveness!r}")
        self._interval = interval
        self._liveness = liveness
        # Beats may be recorded out of time order (the kernel reads the heartbeat board replica by
        # replica, with the times the replicas wrote): expired() and next_deadline() look at every
        # peer rather than trusting the first to be the oldest (a few hundred at most).
        self._live: dict[K, float] = {}
        self._expired: dict[K, float] = {}

    @property
    def interval(self) -> float:
        """Seconds between heartbeats."""
        return self._interval

    @property
    def liveness(self) -> int:
        """How many heartbeats may be missed before a peer is presumed dead."""
        return self._liveness

    @property
    def timeout(self) -> float:
        """Seconds of silence after which a peer expires: ``interval * liveness``."""
        return self._interval * self._liveness

    def beat(self, key: K, now: float) -> None:
        """Record that ``key`` was heard from at ``now`` (any message counts, not just heartbeats)."""
        self._expired.pop(key, None)
        self._live.pop(key, None)
        self._live[key] = now

    def forget(self, key: K) -> None:
        """Stop tracking ``key`` (it disconnected or was stopped). Unknown keys are ignored."""
        self._live.pop(key, None)
        self._expired.pop(key, None)

    def expired(self, now: float) -> list[K]:
        """Peers silent for more than :attr:`timeout` at ``now`` and not reported before, oldest first."""
        timeout = self.timeout
        live = self._live
        deadline_passed = sorted((key for key, seen in live.items() if now - seen > timeout), key=live.__getitem__)
        for key in deadline_passed:
            self._expired[key] = live.pop(key)
        return deadline_passed

    def last_seen(self, key: K) -> float | None:
        """When ``key`` was last heard from, or ``None`` if it is not tracked."""
        seen = self._live.get(key)
        return seen if seen is not None else self._expired.get(key)

    def deadline(self, key: K) -> float | None:
        """When ``key`` expires if it stays silent, or ``None`` if it is not tracked."""
        seen = self.last_seen(key)
        return None if seen is None else seen + self.timeout

    def next_deadline(self) -> float | None:
        """The earliest deadline among peers not yet reported, to arm a timer (``None``: nothing to watch)."""
        return min(self._live.values()) + self.timeout if self._live else None

    def __len__(self) -> int:
        return len(self._live) + len(self._expired)

    def __contains__(self, key: object) -> bool:
        return key in self._live or key in self._expired

    def __repr__(self) -> str:
        return (
            f"Liveness(interval={self._interval}, liveness={self._liveness}, "
            f"live={len(self._live)}, expired={len(self._expired)})"
        )
