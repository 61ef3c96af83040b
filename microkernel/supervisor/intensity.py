"""Restart intensity: how many restarts a supervisor tolerates within a sliding time window."""

from __future__ import annotations

from collections import deque

__all__ = ["RestartWindow"]


class RestartWindow:
    """OTP's MaxR/MaxT: more than ``intensity`` restarts within ``period`` seconds means give up.

    Pure bookkeeping with an injected clock: callers pass a monotonic ``now``. A restart at
    time ``t`` counts while ``now - t <= period`` (inclusive, as in OTP's ``supervisor.erl``).
    ``intensity = 0`` means the very first restart already exceeds the limit.
    """

    __slots__ = ("_intensity", "_period", "_times")

    def __init__(self, intensity: int, period: float) -> None:
        if intensity < 0:
            raise ValueError(f"intensity must be >= 0, got {intensity!r}")
        if period <= 0:
            raise ValueError(f"period must be > 0, got {period!r}")
        self._intensity = intensity
        self._period = period
        self._times: deque[float] = deque()

    @property
    def intensity(self) -> int:
        """The number of restarts tolerated within one period."""
        return self._intensity

    @property
    def period(self) -> float:
        """The window length in seconds."""
        return self._period

    def add(self, now: float) -> bool:
        """Record a restart at ``now``; False when that makes more than ``intensity`` in the window.

        The restart is recorded either way (as OTP does); once a supervisor gives up, it should
        :meth:`reset` the window before an operator-initiated start.
        """
        self._prune(now)
        self._times.append(now)
        return len(self._times) <= self._intensity

    def count(self, now: float) -> int:
        """The number of restarts within the window ending at ``now``."""
        self._prune(now)
        return len(self._times)

    def reset(self) -> None:
        """Forget all recorded restarts."""
        self._times.clear()

    def _prune(self, now: float) -> None:
        # Times arrive in order from a monotonic clock, so expired ones are at the left. The test
        # is written as `now - t > period` (not `t < now - period`) so that it agrees exactly,
        # float rounding included, with the documented rule.
        while self._times and now - self._times[0] > self._period:
            self._times.popleft()

    def __repr__(self) -> str:
        return f"RestartWindow(intensity={self._intensity}, period={self._period}, recorded={len(self._times)})"
