"""Host memory budgets: the per-service budget and budget crossings.

* :class:`MemoryBudget` and :func:`parse_memory_budget` — the ``memory`` setting of a service.
* :class:`BudgetTracker` — pure bookkeeping that turns a stream of RSS samples into crossing
  events: ``soft_exceeded`` / ``soft_cleared`` / ``hard_exceeded``.

The samples come from :class:`~microkernel.resources.sampling.TreeSampler`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from microkernel.units import UnitError, format_size, parse_size

__all__ = [
    "SOFT_FRACTION",
    "BudgetError",
    "BudgetEvent",
    "BudgetEventKind",
    "BudgetTracker",
    "MemoryBudget",
    "parse_memory_budget",
]

SOFT_FRACTION: Final = 0.9
"""The soft limit implied by a single-size budget (``memory = "2GiB"``), as a fraction of hard."""

_BUDGET_KEYS: Final = ("soft", "hard")
_BUDGET_EXAMPLES = "a size such as '2GiB' or a table such as {soft = \"1.5GiB\", hard = \"2GiB\"}"


class BudgetError(ValueError):
    """An invalid memory budget.

    ``key`` is the sub-key at fault (``"soft"``, ``"hard"``, an unknown key) or ``None`` when the
    value as a whole is wrong; ``reason`` says what is wrong without any key, so the config loader
    can prefix its own dotted path (``services.x.memory.soft``) and line.
    """

    def __init__(self, *, key: str | None, value: object, reason: str) -> None:
        self.key = key
        self.value = value
        self.reason = reason
        super().__init__(f"{key}: {reason}" if key else reason)


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryBudget:
    """A replica's host memory budget in bytes, measured as the RSS of its whole process tree.

    Crossing ``soft`` is reported (an event); crossing ``hard`` kills that replica with reason
    ``budget``. Either may be ``None`` (not both); when both are set, ``soft <= hard``.
    """

    soft: int | None = None
    hard: int | None = None

    def __post_init__(self) -> None:
        for name in _BUDGET_KEYS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise BudgetError(key=name, value=value, reason=f"expected a size > 0 bytes, got {value!r}")
        if self.soft is None and self.hard is None:
            raise BudgetError(key=None, value=None, reason="a memory budget needs a soft or a hard limit (or both)")
        if self.soft is not None and self.hard is not None and self.soft > self.hard:
            raise BudgetError(
                key="soft",
                value=self.soft,
                reason=f"the soft limit ({format_size(self.soft)}) is above the hard limit ({format_size(self.hard)})",
            )

    def to_wire(self) -> dict[str, int | None]:
        """The msgpack-native form for status replies: ``{"soft": ..., "hard": ...}`` in bytes."""
        return {"soft": self.soft, "hard": self.hard}

    def __str__(self) -> str:
        parts = [f"{name} {format_size(v)}" for name, v in (("soft", self.soft), ("hard", self.hard)) if v is not None]
        return ", ".join(parts)


def parse_memory_budget(value: object) -> MemoryBudget:
    """Parse a service's ``memory`` setting.

    * A single size (``memory = "2GiB"`` or a byte count) is the **hard** limit, and the soft limit
      is :data:`SOFT_FRACTION` (90 %) of it: an early warning before the kill.
    * A table (``memory = {soft = "1.5GiB", hard = "2GiB"}``) sets exactly what it names: either key
      may be left out (``{soft = "1GiB"}`` only reports, ``{hard = "2GiB"}`` only kills); unknown
      keys are rejected.

    Raises :class:`BudgetError` (a ``ValueError``) naming the sub-key at fault.
    """
    if isinstance(value, Mapping):
        unknown = [k for k in value if k not in _BUDGET_KEYS]
        if unknown:
            key = str(unknown[0])
            raise BudgetError(key=key, value=value[unknown[0]], reason=f"unknown key {key!r}; expected 'soft' and/or 'hard'")
        if not value:
            raise BudgetError(key=None, value=value, reason="expected 'soft' and/or 'hard' in the table, got an empty table")
        sizes = {name: _parse_positive(value[name], key=name) for name in _BUDGET_KEYS if name in value}
        return MemoryBudget(**sizes)
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        hard = _parse_positive(value, key=None)
        # max(1, ...): a 1-byte budget is silly but valid, and soft must stay > 0.
        return MemoryBudget(soft=max(1, hard * 9 // 10), hard=hard)
    raise BudgetError(key=None, value=value, reason=f"expected {_BUDGET_EXAMPLES}, got {value!r}")


def _parse_positive(value: object, *, key: str | None) -> int:
    try:
        size = parse_size(value, key=key or "memory")
    except UnitError as exc:
        raise BudgetError(key=key, value=value, reason=exc.reason) from None
    if size <= 0:
        raise BudgetError(key=key, value=value, reason=f"expected a size > 0 bytes, got {value!r}")
    return size


# --- Crossing tracker -------------------------------------------------------------------------

BudgetEventKind = Literal["soft_exceeded", "soft_cleared", "hard_exceeded"]


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetEvent:
    """One budget crossing of one replica, with the numbers that caused it (bytes).

    ``key`` is whatever the caller passed to :meth:`BudgetTracker.observe` (it is not part of
    :meth:`to_data`, because the caller's key need not be msgpack-native: it adds the service and
    replica itself).
    """

    kind: BudgetEventKind
    key: Hashable
    rss: int
    soft: int | None
    hard: int | None

    @property
    def topic(self) -> str:
        """The suggested event topic: ``memory.soft_exceeded``, ``memory.soft_cleared``, ``memory.hard_exceeded``."""
        return f"memory.{self.kind}"

    def to_data(self) -> dict[str, Any]:
        """The event data: ``{"kind", "rss", "soft", "hard"}``, sizes in bytes."""
        return {"kind": self.kind, "rss": self.rss, "soft": self.soft, "hard": self.hard}


class BudgetTracker:
    """Turns RSS samples into budget crossings, per replica; pure bookkeeping, no I/O.

    * ``soft_exceeded`` once when RSS rises above ``soft``; not again until it has fallen below
      ``soft * (1 - hysteresis)``, which emits ``soft_cleared`` and re-arms. The hysteresis keeps a
      replica hovering around its soft limit from flooding the event stream.
    * ``hard_exceeded`` once when RSS rises above ``hard``; the caller kills that replica (reason
      ``budget``). It re-arms when RSS is back at or below ``hard`` (the kill normally ends the
      replica first, and the caller calls :meth:`forget`).

    When both limits are crossed in one sample, ``soft_exceeded`` comes first. A budget may change
    between samples (a reload); the new limits apply from the next sample, and a replica whose soft
    limit was removed while exceeded gets ``soft_cleared``.
    """

    __slots__ = ("_hard_over", "_hysteresis", "_soft_over")

    def __init__(self, *, hysteresis: float = 0.05) -> None:
        if not 0 <= hysteresis < 1:
            raise ValueError(f"hysteresis must be in [0, 1), got {hysteresis!r}")
        self._hysteresis = hysteresis
        self._soft_over: set[Hashable] = set()
        self._hard_over: set[Hashable] = set()

    @property
    def hysteresis(self) -> float:
        """How far below ``soft`` (a fraction of it) RSS must fall to re-arm ``soft_exceeded``."""
        return self._hysteresis

    def observe(self, key: Hashable, rss: int, budget: MemoryBudget | None) -> list[BudgetEvent]:
        """Record one RSS sample of replica ``key``; return the crossings it causes (often none)."""
        soft = budget.soft if budget is not None else None
        hard = budget.hard if budget is not None else None
        events: list[BudgetEvent] = []

        def emit(kind: BudgetEventKind) -> None:
            events.append(BudgetEvent(kind=kind, key=key, rss=rss, soft=soft, hard=hard))

        if key in self._soft_over:
            if soft is None or rss < soft * (1 - self._hysteresis):
                self._soft_over.discard(key)
                emit("soft_cleared")
        elif soft is not None and rss > soft:
            self._soft_over.add(key)
            emit("soft_exceeded")

        if key in self._hard_over:
            if hard is None or rss <= hard:
                self._hard_over.discard(key)
        elif hard is not None and rss > hard:
            self._hard_over.add(key)
            emit("hard_exceeded")
        return events

    def over_soft(self, key: Hashable) -> bool:
        """True while ``key`` is above its soft limit (between ``soft_exceeded`` and ``soft_cleared``)."""
        return key in self._soft_over

    def forget(self, key: Hashable) -> None:
        """Drop the state of a replica that went away (its successor starts armed)."""
        self._soft_over.discard(key)
        self._hard_over.discard(key)
