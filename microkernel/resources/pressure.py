"""Host memory pressure guard: above a threshold of total RAM, pick one replica to kill.

The kernel's OOM killer picks by badness score and may take the daemon, a well-behaved worker, or
half of a training job. This guard acts first, while it can still choose by policy (as Ray's
memory monitor does): the lowest priority, then the replica most over its budget, then the newest.

Everything here is pure except :func:`read_host_memory`, so the policy is testable with numbers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

import psutil

from microkernel.units import format_size

__all__ = [
    "Candidate",
    "HostMemory",
    "HostPressure",
    "PressureDecision",
    "choose_victim",
    "parse_threshold",
    "rank",
    "read_host_memory",
    "victim_order",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class HostMemory:
    """One reading of host RAM, in bytes. "Used" means not available (page cache is reclaimable)."""

    total: int
    available: int

    @property
    def used(self) -> int:
        """Bytes that cannot be had without reclaiming from processes: ``total - available``."""
        return self.total - self.available

    @property
    def used_fraction(self) -> float:
        """``1 - available / total``."""
        return 1.0 - self.available / self.total if self.total > 0 else 0.0


def read_host_memory() -> HostMemory:
    """Read host RAM now (``psutil.virtual_memory``; ``available`` is MemAvailable). Blocking but cheap."""
    vm = psutil.virtual_memory()
    return HostMemory(total=int(vm.total), available=int(vm.available))


def parse_threshold(value: object, *, key: str = "memory_pressure") -> float:
    """Parse a pressure threshold: ``"95%"`` or a fraction such as ``0.95``; must be in (0, 1].

    Raises ``ValueError`` whose message starts with ``key``.
    """
    fraction: float | None = None
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            fraction = float(Decimal(value.strip()[:-1].strip()) / 100)
        except InvalidOperation:
            fraction = None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        fraction = float(value)
    if fraction is None or not math.isfinite(fraction) or not 0 < fraction <= 1:
        raise ValueError(f"{key}: expected a percentage such as '95%' or a fraction in (0, 1], got {value!r}")
    return fraction


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    """A replica that may be killed to relieve host memory pressure.

    ``key`` is the caller's handle on the replica (passed back in the decision); ``service`` and
    ``replica`` name it for people and events. ``priority``: lower is killed first. ``rss`` is the
    whole tree's RSS in bytes; ``soft``/``hard`` its budget (either may be ``None``).
    ``started_at`` is any timestamp that orders starts (e.g. ``started_at_ns``): larger is newer.
    """

    service: str
    replica: int
    key: Hashable
    pid: int
    priority: int = 0
    rss: int
    soft: int | None = None
    hard: int | None = None
    started_at: float

    @property
    def budget(self) -> int | None:
        """What the replica was promised: its soft limit if it has one, else its hard limit."""
        return self.soft if self.soft is not None else self.hard

    @property
    def excess(self) -> int:
        """Bytes above :attr:`budget` (negative when under it); all of ``rss`` without a budget."""
        budget = self.budget
        return self.rss - (budget if budget is not None else 0)


def victim_order(candidate: Candidate) -> tuple[int, int, float]:
    """The sort key of the kill order: the smallest key is killed first.

    1. Lowest ``priority`` first: the operator's word beats any heuristic.
    2. Then the largest :attr:`Candidate.excess`, in bytes over its budget. Bytes rather than a
       ratio because the point is to free memory: a 100 MiB worker at twice its budget frees far
       less than a 20 GiB one 10 % over it, and the ratio would kill small workers one after
       another. The soft limit is the measure when set (the replica has already been warned at
       it). A replica without a budget promised nothing, so all of its RSS counts as excess: it
       goes before budgeted replicas that keep to their budget, and a big unbudgeted process
       before a small one.
    3. Then the newest (largest ``started_at``): it has lost the least work.
    """
    return (candidate.priority, -candidate.excess, -candidate.started_at)


def rank(candidates: Iterable[Candidate]) -> list[Candidate]:
    """All ``candidates`` in kill order (see :func:`victim_order`); equal keys keep their input order."""
    return sorted(candidates, key=victim_order)


@dataclass(frozen=True, slots=True, kw_only=True)
class PressureDecision:
    """The replica to kill to relieve host memory pressure, why, and the numbers behind it."""

    victim: Candidate
    reason: str
    total: int
    available: int
    threshold_fraction: float
    candidates: int

    @property
    def used_fraction(self) -> float:
        """Host RAM in use when the decision was taken (``1 - available / total``)."""
        return HostMemory(total=self.total, available=self.available).used_fraction

    def to_data(self) -> dict[str, Any]:
        """The data of a ``memory.pressure`` event (msgpack-native; sizes in bytes)."""
        v = self.victim
        return {
            "service": v.service,
            "replica": v.replica,
            "pid": v.pid,
            "priority": v.priority,
            "rss": v.rss,
            "soft": v.soft,
            "hard": v.hard,
            "budget": v.budget,
            "excess": v.excess,
            "host_total": self.total,
            "host_available": self.available,
            "used_fraction": self.used_fraction,
            "threshold_fraction": self.threshold_fraction,
            "candidates": self.candidates,
            "reason": self.reason,
        }


def choose_victim(
    candidates: Iterable[Candidate], *, total: int, available: int, threshold_fraction: float
) -> PressureDecision | None:
    """Pick the first replica in kill order; ``None`` when there is nothing worth killing.

    Candidates with no resident memory are skipped: killing them frees nothing. The host figures
    only go into the decision (reason and event data); whether to act at all is
    :class:`HostPressure`'s call.
    """
    eligible = [c for c in candidates if c.rss > 0]
    if not eligible:
        return None
    victim = min(eligible, key=victim_order)
    used_fraction = HostMemory(total=total, available=available).used_fraction
    budget = victim.budget
    if budget is None:
        standing = "no memory budget"
    else:
        which = "soft" if victim.soft is not None else "hard"
        relation = "over" if victim.excess > 0 else "under"
        standing = f"{format_size(abs(victim.excess))} {relation} its {which} budget of {format_size(budget)}"
    reason = (
        f"host memory {used_fraction:.1%} used, above the {threshold_fraction:.0%} threshold: "
        f"killing {victim.service}[{victim.replica}] (pid {victim.pid}, priority {victim.priority}, "
        f"rss {format_size(victim.rss)}, {standing}); policy: lowest priority, then most bytes over "
        f"budget, then newest, among {len(eligible)} candidate{'s' if len(eligible) != 1 else ''}"
    )
    return PressureDecision(
        victim=victim,
        reason=reason,
        total=total,
        available=available,
        threshold_fraction=threshold_fraction,
        candidates=len(eligible),
    )


class HostPressure:
    """Decides when to kill for host memory pressure, one victim at a time.

    Over the threshold (``used > threshold_fraction * total``), :meth:`check` returns a decision.
    Memory comes back only once the victim has exited, so after a decision it waits: no new
    decision while a victim is dying, until the caller reports it gone (:meth:`victim_gone`) or
    ``settle`` seconds have passed (a victim stuck in uninterruptible sleep, or memory that its
    death did not free, such as files in ``/dev/shm``). Without this, one spike sampled four times
    a second would kill four workers. A dying victim is never chosen again.
    """

    __slots__ = ("_clock", "_dying", "_settle", "_threshold", "_total")

    def __init__(
        self,
        threshold_fraction: float,
        total_bytes: int,
        *,
        settle: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < threshold_fraction <= 1:
            raise ValueError(f"threshold_fraction must be in (0, 1], got {threshold_fraction!r}")
        if total_bytes <= 0:
            raise ValueError(f"total_bytes must be > 0, got {total_bytes!r}")
        if settle < 0:
            raise ValueError(f"settle must be >= 0, got {settle!r}")
        self._threshold = threshold_fraction
        self._total = total_bytes
        self._settle = settle
        self._clock = clock
        self._dying: dict[Hashable, float] = {}

    @property
    def threshold_fraction(self) -> float:
        """The fraction of total RAM in use above which :meth:`check` acts."""
        return self._threshold

    @property
    def total_bytes(self) -> int:
        """Host RAM in bytes."""
        return self._total

    @property
    def threshold_bytes(self) -> int:
        """Used bytes above which the host is under pressure."""
        return int(self._total * self._threshold)

    @property
    def dying(self) -> frozenset[Hashable]:
        """Keys of victims chosen and not yet reported gone."""
        return frozenset(self._dying)

    def used_fraction(self, available_bytes: int) -> float:
        """``1 - available / total``."""
        return HostMemory(total=self._total, available=available_bytes).used_fraction

    def is_over(self, available_bytes: int) -> bool:
        """True when more than the threshold of RAM is in use."""
        return self._total - available_bytes > self.threshold_bytes

    def check(self, available_bytes: int, candidates: Iterable[Candidate]) -> PressureDecision | None:
        """Return the replica to kill now, or ``None`` (no pressure, a victim still dying, nobody to kill).

        The returned victim counts as dying from now on: the caller must kill it (SIGKILL: under
        pressure there is no time for a graceful stop) and call :meth:`victim_gone` when it exited.
        """
        if not self.is_over(available_bytes):
            return None
        now = self._clock()
        if any(now - since < self._settle for since in self._dying.values()):
            return None
        decision = choose_victim(
            (c for c in candidates if c.key not in self._dying),
            total=self._total,
            available=available_bytes,
            threshold_fraction=self._threshold,
        )
        if decision is not None:
            self._dying[decision.victim.key] = now
        return decision

    def victim_gone(self, key: Hashable) -> None:
        """The replica ``key`` exited (for whatever reason): stop waiting for it. Unknown keys are ignored."""
        self._dying.pop(key, None)
