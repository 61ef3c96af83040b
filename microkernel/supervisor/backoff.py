"""Restart backoff: how long to wait before starting a replica that just exited."""

from __future__ import annotations

from microkernel.supervisor.spec import BackoffSpec

__all__ = ["Backoff"]


class Backoff:
    """Exponential, capped backoff that resets after stable uptime.

    One instance per replica. Pure: the caller passes the replica's start time and the current
    time from the same monotonic clock. The first restart after a stable run is immediate (a
    one-off crash should cost nothing); consecutive failures then wait ``initial``,
    ``initial * factor``, … up to ``max``.
    """

    __slots__ = ("_consecutive", "_spec")

    def __init__(self, spec: BackoffSpec) -> None:
        self._spec = spec
        self._consecutive = 0

    @property
    def spec(self) -> BackoffSpec:
        """The backoff parameters."""
        return self._spec

    @property
    def consecutive(self) -> int:
        """Failures in a row since the last stable run (or :meth:`reset`)."""
        return self._consecutive

    def on_exit(self, started_at: float, now: float) -> float:
        """Record an exit at ``now`` of a replica started at ``started_at``; return the delay in seconds."""
        if now - started_at >= self._spec.reset_after:
            self._consecutive = 0
        self._consecutive += 1
        return self.delay_for(self._consecutive)

    def delay_for(self, consecutive: int) -> float:
        """The delay before restart number ``consecutive`` of a failure streak (1-based)."""
        if consecutive <= 1:
            return 0.0
        spec = self._spec
        try:
            delay = spec.initial * spec.factor ** (consecutive - 2)
        except OverflowError:
            # A long crash loop can push factor**n past float range; the cap applies anyway.
            return spec.max
        return min(spec.max, delay)

    def reset(self) -> None:
        """Start the next failure streak from scratch (e.g. after an operator restart)."""
        self._consecutive = 0

    def __repr__(self) -> str:
        return f"Backoff({self._spec!r}, consecutive={self._consecutive})"
