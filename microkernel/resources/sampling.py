"""Process-tree sampling: RSS, thread count and CPU of whole process trees.

:class:`TreeSampler` is cheap enough to run every 250 ms for hundreds of replicas. Blocking (reads
``/proc``): run it in the kernel's thread pool. Linux only, like the rest of the supervisor: it
reads ``/proc/<pid>/stat`` directly.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["TreeSampler", "TreeUsage", "sample_trees", "tree_rss"]

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
        # Roots not asked for this time (sampled less often) keep their baseline for the next time.
        for root, tree in self._trees.items():
            if root not in trees and root in self._known and self._known[root][0] == tree[0]:
                trees[root] = tree
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
