"""Host memory budgets: the per-service budget, process-tree sampling, and budget crossings.

Three parts, each usable alone:

* :class:`MemoryBudget` and :func:`parse_memory_budget` — the ``memory`` setting of a service.
* :class:`TreeSampler` — RSS, thread count and CPU of whole process trees, cheap enough to run every
  250 ms for hundreds of replicas. Blocking (reads ``/proc``): run it in the kernel's thread pool.
* :class:`BudgetTracker` — pure bookkeeping that turns a stream of RSS samples into crossing
  events: ``soft_exceeded`` / ``soft_cleared`` / ``hard_exceeded``.

Linux only, like the rest of the supervisor: the sampler reads ``/proc/<pid>/stat`` directly.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
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
    "TreeSampler",
    "TreeUsage",
    "parse_memory_budget",
    "sample_trees",
    "tree_rss",
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


# --- Process-tree sampling ----------------------------------------------------------------------

_PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE")
_CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True, kw_only=True)
class TreeUsage:
    """Resource use of one process tree: a replica's process and everything it started.

    ``rss`` sums the resident set of every live process, so pages shared between them (fork
    copy-on-write, shared memory) count once per process: an over-estimate, which is the safe side
    for a budget, and the only figure cheap enough to read every 250 ms (PSS walks page tables).
    ``cpu_percent`` is 100 per fully used core, over the time since the previous sample of the
    same tree; ``None`` on the first sample. ``pids`` are the live processes counted, root first
    when it is alive (zombies hold no memory and are left out).
    """

    pid: int
    rss: int
    processes: int
    threads: int
    cpu_percent: float | None
    pids: tuple[int, ...]

    def to_data(self) -> dict[str, Any]:
        """The msgpack-native form for status replies and ``mkctl top``."""
        return {
            "pid": self.pid,
            "rss": self.rss,
            "processes": self.processes,
            "threads": self.threads,
            "cpu_percent": self.cpu_percent,
        }


@dataclass(slots=True)
class _Stat:
    """The fields of ``/proc/<pid>/stat`` the sampler uses (times in clock ticks)."""

    starttime: int
    ppid: int
    pgrp: int
    zombie: bool
    cpu_ticks: int
    threads: int


def _read(path: str) -> bytes | None:
    """The content of a small ``/proc`` file; ``None`` if its process is gone (it may exit at any moment)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)


def _read_stat(proc: str, pid: int) -> _Stat | None:
    data = _read(f"{proc}/{pid}/stat")
    if data is None:
        return None
    try:
        # The command name is in parentheses and may itself contain spaces and parentheses.
        f = data[data.rindex(b")") + 2 :].split()
        return _Stat(
            starttime=int(f[19]),
            ppid=int(f[1]),
            pgrp=int(f[2]),
            zombie=f[0] in (b"Z", b"X"),
            cpu_ticks=int(f[11]) + int(f[12]),
            threads=int(f[17]),
        )
    except (ValueError, IndexError):
        return None


def _read_rss_pages(proc: str, pid: int) -> int | None:
    data = _read(f"{proc}/{pid}/statm")
    if data is None:
        return None
    try:
        return int(data.split()[1])
    except (ValueError, IndexError):
        return None


class TreeSampler:
    """Samples process trees repeatedly, reading as little of ``/proc`` as it can.

    A tree is the root process, its descendants (through parent links), and — when the root leads
    its own process group, as every replica does — the members of that group, which keeps counting
    a grandchild that was re-parented after its parent died.

    Why it reads ``/proc`` itself rather than through ``psutil.Process``: psutil finds children by
    scanning every process on the host once per root, which is quadratic for hundreds of replicas,
    and reads three files per process (``stat``, ``statm``, ``status``). Here ``stat`` gives parent,
    group, start time, CPU ticks and thread count, and ``statm`` the RSS — the same figure as
    psutil's ``memory_info().rss``. (``stat`` has an RSS field too, but recent kernels fill it from
    the fast per-CPU approximation, which can be off by a batch of pages per CPU the process ran
    on; ``statm`` sums the counters.)

    What it caches, keyed by pid with the start time as identity (a reused pid has a different
    start time, so it is treated as a new process): the parent and group of every process seen.
    Each call lists ``/proc`` and reads the stat of new pids, of the roots and of the members of
    the trees it sampled last time — not of the host's other processes, whose parent can only
    change by re-parenting, which never moves a process *into* one of our trees. Every
    ``full_scan_every`` calls it re-reads everything anyway, to catch a pid reused between two
    calls. CPU is the sum over each tree of per-process tick deltas since the previous call, so
    processes that exit between calls do not make the figure jump backwards (their last interval is
    lost instead).

    Blocking; thread-safe (calls are serialised). Roots missing from a call lose their CPU baseline.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        full_scan_every: int = 40,
        proc: str = "/proc",
    ) -> None:
        if full_scan_every < 1:
            raise ValueError(f"full_scan_every must be >= 1, got {full_scan_every!r}")
        self._clock = clock
        self._full_scan_every = full_scan_every
        self._proc = proc
        self._lock = threading.Lock()
        self._calls = 0
        # pid -> (starttime, ppid, pgrp) of every process seen and still listed in /proc.
        self._known: dict[int, tuple[int, int, int]] = {}
        # root -> (root starttime, time of its last sample, {member pid: (starttime, cpu ticks)}).
        self._trees: dict[int, tuple[int, float, dict[int, tuple[int, int]]]] = {}

    def sample_trees(self, pids: Iterable[int]) -> dict[int, TreeUsage]:
        """Sample the trees rooted at ``pids``; roots that no longer exist are absent from the result."""
        roots = list(dict.fromkeys(pids))
        with self._lock:
            return self._sample(roots)

    def _sample(self, roots: list[int]) -> dict[int, TreeUsage]:
        self._calls += 1
        listed = self._list_pids()
        for gone in self._known.keys() - listed:
            del self._known[gone]
        if self._calls % self._full_scan_every == 1 or self._full_scan_every == 1:
            wanted = listed
        else:
            wanted = listed - self._known.keys()
            wanted.update(r for r in roots if r in listed)
            for root in roots:
                previous = self._trees.get(root)
                if previous is not None:
                    wanted.update(m for m in previous[2] if m in listed)
        fresh: dict[int, _Stat] = {}
        self._read(wanted, fresh)
        now = self._clock()

        children, groups = self._index()
        trees: dict[int, tuple[int, float, dict[int, tuple[int, int]]]] = {}
        result: dict[int, TreeUsage] = {}
        for root in roots:
            if root not in self._known:
                continue
            members = self._members(root, children, groups)
            unread = [m for m in members if m not in fresh]
            if unread:
                # Descendants that existed before their root was first sampled (seen then as
                # strangers, not re-read since). Reading them may correct a stale parent (a reused
                # pid), hence the second walk.
                self._read(unread, fresh)
                children, groups = self._index()
                members = self._members(root, children, groups)
            usage, baseline = self._usage(root, [m for m in members if m in fresh], fresh, now)
            if usage is None:
                continue
            result[root] = usage
            trees[root] = (self._known[root][0], now, baseline)
        self._trees = trees
        return result

    def _list_pids(self) -> set[int]:
        return {int(name) for name in os.listdir(self._proc) if name.isdigit()}

    def _read(self, pids: Iterable[int], into: dict[int, _Stat]) -> None:
        for pid in pids:
            stat = _read_stat(self._proc, pid)
            if stat is None:
                self._known.pop(pid, None)
                continue
            into[pid] = stat
            self._known[pid] = (stat.starttime, stat.ppid, stat.pgrp)

    def _index(self) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
        children: dict[int, list[int]] = {}
        groups: dict[int, list[int]] = {}
        for pid, (_, ppid, pgrp) in self._known.items():
            children.setdefault(ppid, []).append(pid)
            groups.setdefault(pgrp, []).append(pid)
        return children, groups

    def _members(self, root: int, children: dict[int, list[int]], groups: dict[int, list[int]]) -> list[int]:
        members = [root]
        seen = {root}
        # Group members only when the root leads its group: otherwise the group is someone else's
        # (a shell's job, say) and not part of this tree.
        stack = [root, *groups.get(root, ())] if self._known[root][2] == root else [root]
        while stack:
            pid = stack.pop()
            if pid not in seen:
                seen.add(pid)
                members.append(pid)
            for child in children.get(pid, ()):
                if child not in seen:
                    stack.append(child)
        return members

    def _usage(
        self, root: int, members: list[int], fresh: dict[int, _Stat], now: float
    ) -> tuple[TreeUsage | None, dict[int, tuple[int, int]]]:
        if root not in fresh:
            return None, {}
        previous = self._trees.get(root)
        if previous is not None and previous[0] != fresh[root].starttime:
            previous = None  # the root pid now belongs to another process
        rss_pages = threads = 0
        live: list[int] = []
        baseline: dict[int, tuple[int, int]] = {}
        delta_ticks = 0
        for pid in members:
            stat = fresh[pid]
            baseline[pid] = (stat.starttime, stat.cpu_ticks)
            if previous is not None:
                before = previous[2].get(pid)
                # A member without a baseline started after the previous sample: all its CPU is new.
                start_ticks = before[1] if before is not None and before[0] == stat.starttime else 0
                delta_ticks += max(0, stat.cpu_ticks - start_ticks)
            if stat.zombie:
                continue
            pages = _read_rss_pages(self._proc, pid)
            if pages is None:
                continue  # exited since its stat was read
            live.append(pid)
            rss_pages += pages
            threads += stat.threads
        cpu_percent: float | None = None
        if previous is not None and now > previous[1]:
            cpu_percent = 100.0 * delta_ticks / _CLOCK_TICKS / (now - previous[1])
        usage = TreeUsage(
            pid=root,
            rss=rss_pages * _PAGE_SIZE,
            processes=len(live),
            threads=threads,
            cpu_percent=cpu_percent,
            pids=tuple(live),
        )
        return usage, baseline


def sample_trees(pids: Iterable[int]) -> dict[int, TreeUsage]:
    """Sample the trees rooted at ``pids`` once (no CPU figure: that needs a :class:`TreeSampler`).

    Blocking; for repeated sampling keep one :class:`TreeSampler` and call its ``sample_trees``.
    """
    return TreeSampler().sample_trees(pids)


def tree_rss(pid: int) -> TreeUsage:
    """Sample the tree rooted at ``pid`` once; raises ``ProcessLookupError`` if ``pid`` does not exist."""
    usage = sample_trees([pid]).get(pid)
    if usage is None:
        raise ProcessLookupError(f"no process with pid {pid}")
    return usage
