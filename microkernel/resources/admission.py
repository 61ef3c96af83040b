"""Admission control for host memory: a replica starts only if its hard budget fits in the pool.

The pool is a share of host RAM (``"80%"``) or an explicit size. Each replica slot reserves its hard
budget before its first start and keeps it across restarts (so a crash loop cannot lose its room to
another service), until it is stopped or scaled away. Pure bookkeeping: nothing here measures memory;
the budgets are promises, enforced by sampling and by cgroups elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from microkernel.units import UnitError, format_size, parse_size

__all__ = ["AdmissionError", "MemoryPool", "Slot", "parse_pool"]

Slot = tuple[str, int]
"""A replica slot: ``(service, replica index)``. Incarnations of one slot share its reservation."""

# How many services the holders summary of an AdmissionError names before "and N more".
_SUMMARY_SERVICES = 5


class AdmissionError(Exception):
    """A reservation does not fit in the memory pool.

    ``requested`` is what the refused request needed on top of what its slots already held,
    ``free`` and ``capacity`` describe the pool at that moment, and ``holders`` summarises who holds
    the rest (biggest first), so an operator can see what to stop or shrink.
    """

    def __init__(self, *, what: str, requested: int, free: int, capacity: int, holders: str) -> None:
        self.what = what
        self.requested = requested
        self.free = free
        self.capacity = capacity
        self.holders = holders
        super().__init__(
            f"not enough host memory for {what}: needs {format_size(requested)}, "
            f"{format_size(free)} free of a {format_size(capacity)} pool (held by: {holders})"
        )


class MemoryPool:
    """Reservations of hard memory budgets per replica slot, never above ``capacity`` in total.

    Reserving for a slot that already holds memory replaces its reservation (a budget changed on
    reload); it fits when the pool can cover the difference. Lowering the capacity below what is
    reserved revokes nothing: new reservations are refused until enough is released.
    """

    __slots__ = ("_capacity", "_held", "_used")

    def __init__(self, capacity_bytes: int) -> None:
        self._capacity = _check_capacity(capacity_bytes)
        self._held: dict[Slot, int] = {}
        self._used = 0

    @property
    def capacity(self) -> int:
        """The pool size in bytes."""
        return self._capacity

    @property
    def used(self) -> int:
        """Bytes reserved."""
        return self._used

    @property
    def free(self) -> int:
        """Bytes that can still be reserved (0 if the capacity was lowered below :attr:`used`)."""
        return max(0, self._capacity - self._used)

    def set_capacity(self, capacity_bytes: int) -> None:
        """Change the pool size (a reload); existing reservations are kept even if they no longer fit."""
        self._capacity = _check_capacity(capacity_bytes)

    def held(self, key: Slot) -> int | None:
        """Bytes reserved by ``key``, or ``None`` if it holds no reservation."""
        return self._held.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._held

    def __len__(self) -> int:
        return len(self._held)

    def reserve(self, key: Slot, nbytes: int) -> None:
        """Reserve ``nbytes`` for ``key`` (replacing what it held); raises :class:`AdmissionError` if it does not fit."""
        self.reserve_many([(key, nbytes)])

    def reserve_many(self, items: Iterable[tuple[Slot, int]] | Mapping[Slot, int]) -> None:
        """Reserve for several slots at once, all or nothing (starting or scaling a service by N replicas).

        Raises :class:`AdmissionError` without reserving anything if the total does not fit, and
        ``ValueError`` for a negative size or a slot listed twice.
        """
        pairs = list(items.items()) if isinstance(items, Mapping) else list(items)
        wanted: dict[Slot, int] = {}
        for key, nbytes in pairs:
            if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
                raise ValueError(f"reservation for {_label(key)} must be a byte count >= 0, got {nbytes!r}")
            if key in wanted:
                raise ValueError(f"{_label(key)} is listed twice in one reservation")
            wanted[key] = nbytes
        delta = sum(n - self._held.get(k, 0) for k, n in wanted.items())
        if delta > 0 and self._used + delta > self._capacity:
            raise AdmissionError(
                what=_describe(wanted),
                requested=delta,
                free=self.free,
                capacity=self._capacity,
                holders=self._summary(),
            )
        self._held.update(wanted)
        self._used += delta

    def release(self, key: Slot) -> int:
        """Release ``key``'s reservation; return the bytes freed (0 if it held none)."""
        nbytes = self._held.pop(key, 0)
        self._used -= nbytes
        return nbytes

    def snapshot(self) -> dict[str, Any]:
        """The msgpack-native form for status: capacity/used/free and every holder, biggest first."""
        holders = sorted(self._held.items(), key=lambda item: (-item[1], item[0]))
        return {
            "capacity": self._capacity,
            "used": self._used,
            "free": self.free,
            "holders": [{"service": k[0], "replica": k[1], "bytes": n} for k, n in holders],
        }

    def _summary(self) -> str:
        by_service: dict[str, list[int]] = {}
        for (service, _), nbytes in self._held.items():
            by_service.setdefault(service, []).append(nbytes)
        if not by_service:
            return "nobody"
        ranked = sorted(by_service.items(), key=lambda item: (-sum(item[1]), item[0]))
        parts = [
            f"{service} {format_size(sum(sizes))} ({len(sizes)} replica{'s' if len(sizes) != 1 else ''})"
            for service, sizes in ranked[:_SUMMARY_SERVICES]
        ]
        if len(ranked) > _SUMMARY_SERVICES:
            parts.append(f"and {len(ranked) - _SUMMARY_SERVICES} more services")
        return ", ".join(parts)

    def __repr__(self) -> str:
        return f"MemoryPool(capacity={self._capacity}, used={self._used}, holders={len(self._held)})"


def _check_capacity(capacity_bytes: int) -> int:
    if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int) or capacity_bytes < 0:
        raise ValueError(f"capacity must be a byte count >= 0, got {capacity_bytes!r}")
    return capacity_bytes


def _label(key: Slot) -> str:
    return f"{key[0]}[{key[1]}]"


def _describe(wanted: Mapping[Slot, int]) -> str:
    services = sorted({k[0] for k in wanted})
    if len(wanted) == 1:
        return _label(next(iter(wanted)))
    if len(services) == 1:
        return f"{len(wanted)} replicas of {services[0]}"
    return f"{len(wanted)} replicas of {', '.join(services)}"


def parse_pool(value: object, total_bytes: int, *, key: str = "memory_pool") -> int:
    """Parse the pool size: a share of host RAM (``"80%"``, ``"62.5%"``) or a size (``"48GiB"``, bytes).

    A size above ``total_bytes`` is accepted (deliberate over-commit, or admission effectively off).
    Raises :class:`~microkernel.units.UnitError` (a ``ValueError``) naming ``key``.
    """
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            percent = Decimal(value.strip()[:-1].strip())
        except InvalidOperation:
            percent = Decimal("NaN")
        if not percent.is_finite() or not 0 < percent <= 100:
            raise UnitError(key=key, value=value, reason=f"expected a percentage in (0%, 100%], got {value!r}")
        return int(total_bytes * percent / 100)
    if isinstance(value, float) and not isinstance(value, bool) and 0 < value < 1:
        raise UnitError(key=key, value=value, reason=f"write a share of RAM as a percentage (e.g. '80%'), got {value!r}")
    size = parse_size(value, key=key)
    if size <= 0:
        raise UnitError(key=key, value=value, reason=f"expected a size > 0 bytes or a percentage, got {value!r}")
    return size
