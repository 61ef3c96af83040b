"""CPU budgets: which CPUs a replica's process tree may run on, and how many threads it should use.

A service declares ``cpus = N`` (any N CPUs; replicas are spread over the host so that two
replicas of one service do not share CPUs while there are enough of them) or ``cpus = [0, 1]``
(exactly these CPUs, for every replica). The kernel makes the budget real twice:

* **Affinity** (``sched_setaffinity``) of the replica's process, set between fork and exec, and
  re-applied by the sampling loop to descendants that changed theirs;
* **Thread counts** through the environment (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``,
  ``OPENBLAS_NUM_THREADS``, ``MK_CPU_THREADS``), which the BLAS libraries read at start and the SDK
  hands to ``torch.set_num_threads``. A value the service sets itself in its ``env`` wins.

Pure except :func:`apply_affinity` and :func:`host_cpus`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "THREAD_ENV",
    "CpuBudget",
    "CpuBudgetError",
    "apply_affinity",
    "drifted",
    "host_cpus",
    "parse_cpus",
    "thread_env",
]

THREAD_ENV: Final = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MK_CPU_THREADS")
"""The variables :func:`thread_env` sets; ``MK_CPU_THREADS`` is the SDK's own (``torch.set_num_threads``)."""


class CpuBudgetError(ValueError):
    """An invalid ``cpus`` value; ``reason`` says why without the key (the config loader adds it)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def host_cpus() -> tuple[int, ...]:
    """The CPUs this process may run on (its own affinity), sorted."""
    return tuple(sorted(os.sched_getaffinity(0)))


@dataclass(frozen=True, slots=True, kw_only=True)
class CpuBudget:
    """``count`` CPUs per replica; ``cpus`` pins every replica to exactly those CPUs when given."""

    count: int
    cpus: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise CpuBudgetError(f"expected a CPU count >= 1, got {self.count!r}")
        if self.cpus is not None and len(self.cpus) != self.count:
            raise CpuBudgetError(f"count {self.count} does not match the CPU list {list(self.cpus)}")

    def affinity(self, replica: int, available: Sequence[int]) -> tuple[int, ...]:
        """The CPUs replica ``replica`` runs on, out of ``available`` (the kernel's own affinity).

        An explicit list is returned as is. A count takes consecutive CPUs starting at
        ``replica * count`` (wrapping around), so replicas of one service land on different CPUs as
        long as there are enough of them.
        """
        if self.cpus is not None:
            return self.cpus
        pool = sorted(available)
        if not pool:
            raise CpuBudgetError("no CPU available")
        n = min(self.count, len(pool))
        start = (replica * n) % len(pool)
        return tuple(sorted(pool[(start + k) % len(pool)] for k in range(n)))

    def to_wire(self) -> dict[str, Any]:
        """The msgpack-native form for status replies."""
        return {"count": self.count, "cpus": None if self.cpus is None else list(self.cpus)}


def parse_cpus(value: object, available: Sequence[int] | None = None) -> CpuBudget:
    """Parse a service's ``cpus``: a count (``cpus = 2``) or a list of CPU numbers (``cpus = [0, 1]``).

    ``available`` (default: :func:`host_cpus`) bounds both: a count may not exceed it and listed
    CPUs must be in it. Raises :class:`CpuBudgetError`.
    """
    pool = tuple(available) if available is not None else host_cpus()
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise CpuBudgetError(f"expected a CPU count >= 1 or a list of CPU numbers, got {value!r}")
        if value > len(pool):
            raise CpuBudgetError(f"{value} CPUs asked for, but the kernel may only use {len(pool)} ({_show(pool)})")
        return CpuBudget(count=value)
    if isinstance(value, list):
        if not value:
            raise CpuBudgetError("expected a non-empty list of CPU numbers, got []")
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in value):
            raise CpuBudgetError(f"expected a list of CPU numbers (integers), got {value!r}")
        if len(set(value)) != len(value):
            duplicate = next(c for c in value if value.count(c) > 1)
            raise CpuBudgetError(f"CPU {duplicate} is listed twice")
        unknown = [c for c in value if c not in pool]
        if unknown:
            raise CpuBudgetError(f"CPU {unknown[0]} is not available to the kernel (available: {_show(pool)})")
        return CpuBudget(count=len(value), cpus=tuple(sorted(value)))
    raise CpuBudgetError(f"expected a CPU count such as 2 or a list such as [0, 1], got {value!r}")


def _show(cpus: Iterable[int]) -> str:
    return ",".join(str(c) for c in cpus) or "none"


def thread_env(threads: int) -> dict[str, str]:
    """The thread-count environment for a budget of ``threads`` CPUs."""
    return dict.fromkeys(THREAD_ENV, str(threads))


def apply_affinity(pids: Iterable[int], cpus: Iterable[int]) -> list[int]:
    """Set the affinity of every process in ``pids`` (all its threads) to ``cpus``; blocking but cheap.

    Returns the pids it could set (processes that exited meanwhile are skipped). Threads started
    after this call inherit the affinity of the thread that creates them.
    """
    wanted = set(cpus)
    done = []
    for pid in pids:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
        for tid in tids:
            try:
                os.sched_setaffinity(tid, wanted)
            except (ProcessLookupError, PermissionError):
                continue
        done.append(pid)
    return done


def drifted(pids: Iterable[int], cpus: Iterable[int]) -> list[int]:
    """The processes among ``pids`` whose (main thread's) affinity is not ``cpus`` any more."""
    wanted = set(cpus)
    out = []
    for pid in pids:
        try:
            if os.sched_getaffinity(pid) != wanted:
                out.append(pid)
        except (ProcessLookupError, PermissionError):
            continue
    return out
