"""Memory budgets: parsing, the crossing tracker, and process-tree sampling.

The sampler is tested twice: against real processes (a child whose grandchild allocates 64 MiB,
cross-checked with psutil), and against a directory laid out like ``/proc`` for the cases real
processes cannot be made to produce on demand (pid reuse, an exact CPU figure).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st

from microkernel.resources.memory import (
    SOFT_FRACTION,
    BudgetError,
    BudgetEvent,
    BudgetTracker,
    MemoryBudget,
    parse_memory_budget,
)
from microkernel.resources.sampling import TreeSampler, sample_trees, tree_rss
from tests import processes

GiB = 1024**3
MiB = 1024**2
CEILING = 20.0

# --- parsing ------------------------------------------------------------------------------------


def test_a_single_size_is_the_hard_limit_with_soft_at_ninety_percent() -> None:
    budget = parse_memory_budget("2GiB")
    assert budget == MemoryBudget(soft=2 * GiB * 9 // 10, hard=2 * GiB)
    assert SOFT_FRACTION == 0.9
    assert parse_memory_budget(1000) == MemoryBudget(soft=900, hard=1000)
    assert parse_memory_budget(1).soft == 1  # soft stays > 0


def test_a_table_sets_exactly_what_it_names() -> None:
    assert parse_memory_budget({"soft": "1.5GiB", "hard": "2GiB"}) == MemoryBudget(soft=3 * GiB // 2, hard=2 * GiB)
    assert parse_memory_budget({"soft": "1GiB"}) == MemoryBudget(soft=GiB, hard=None)
    assert parse_memory_budget({"hard": 4096}) == MemoryBudget(soft=None, hard=4096)


@pytest.mark.parametrize(
    ("value", "key", "fragment"),
    [
        ({"soft": "3GiB", "hard": "2GiB"}, "soft", "above the hard limit"),
        ({"hard": "2gib"}, "hard", "case-sensitive"),
        ({"soft": "lots"}, "soft", "expected a size"),
        ({"soft": "1GiB", "max": "2GiB"}, "max", "unknown key 'max'"),
        ({"hard": 0}, "hard", "> 0"),
        ({}, None, "empty table"),
        ("0", None, "> 0"),
        ("2 parsecs", None, "unknown size unit"),
        (True, None, "expected a size"),
        (["2GiB"], None, "expected a size"),
        (-5, None, "negative"),
    ],
)
def test_errors_name_the_sub_key(value: object, key: str | None, fragment: str) -> None:
    with pytest.raises(BudgetError) as info:
        parse_memory_budget(value)
    assert info.value.key == key
    assert fragment in info.value.reason
    assert isinstance(info.value, ValueError)
    assert str(info.value) == (f"{key}: {info.value.reason}" if key else info.value.reason)


def test_budget_value_type_validates_itself() -> None:
    with pytest.raises(BudgetError, match="soft or a hard"):
        MemoryBudget()
    with pytest.raises(BudgetError, match="hard: expected a size > 0"):
        MemoryBudget(hard=0)
    with pytest.raises(BudgetError, match="soft: expected a size > 0"):
        MemoryBudget(soft=True)
    budget = MemoryBudget(soft=MiB, hard=2 * MiB)
    assert budget.to_wire() == {"soft": MiB, "hard": 2 * MiB}
    assert str(budget) == "soft 1 MiB, hard 2 MiB"


# --- crossing tracker -----------------------------------------------------------------------------

BUDGET = MemoryBudget(soft=1000, hard=2000)


def kinds(events: list[BudgetEvent]) -> list[str]:
    return [e.kind for e in events]


def test_soft_crossing_is_reported_once_then_cleared_below_the_hysteresis_band() -> None:
    tracker = BudgetTracker(hysteresis=0.05)
    assert tracker.observe("a", 900, BUDGET) == []
    [event] = tracker.observe("a", 1001, BUDGET)
    assert event == BudgetEvent(kind="soft_exceeded", key="a", rss=1001, soft=1000, hard=2000)
    assert event.topic == "memory.soft_exceeded"
    assert event.to_data() == {"kind": "soft_exceeded", "rss": 1001, "soft": 1000, "hard": 2000}
    assert tracker.over_soft("a")
    assert tracker.observe("a", 1500, BUDGET) == []
    assert tracker.observe("a", 990, BUDGET) == []  # below soft, but inside the 5 % band
    assert tracker.observe("a", 1010, BUDGET) == []  # so this is not a new crossing
    assert kinds(tracker.observe("a", 949, BUDGET)) == ["soft_cleared"]
    assert not tracker.over_soft("a")
    assert kinds(tracker.observe("a", 1001, BUDGET)) == ["soft_exceeded"]


def test_hard_crossing_is_reported_once_per_crossing_after_soft() -> None:
    tracker = BudgetTracker()
    assert kinds(tracker.observe("a", 2001, BUDGET)) == ["soft_exceeded", "hard_exceeded"]
    assert tracker.observe("a", 3000, BUDGET) == []
    assert tracker.observe("a", 2000, BUDGET) == []  # at the limit is not over it; re-armed
    assert kinds(tracker.observe("a", 2001, BUDGET)) == ["hard_exceeded"]


def test_keys_are_independent_and_forget_rearms() -> None:
    tracker = BudgetTracker()
    assert kinds(tracker.observe(("svc", 0), 1500, BUDGET)) == ["soft_exceeded"]
    assert kinds(tracker.observe(("svc", 1), 1500, BUDGET)) == ["soft_exceeded"]
    tracker.forget(("svc", 0))
    assert kinds(tracker.observe(("svc", 0), 1500, BUDGET)) == ["soft_exceeded"]
    assert tracker.observe(("svc", 1), 1500, BUDGET) == []


def test_budget_changes_apply_from_the_next_sample() -> None:
    tracker = BudgetTracker()
    assert tracker.observe("a", 1500, None) == []
    assert kinds(tracker.observe("a", 1500, BUDGET)) == ["soft_exceeded"]
    # A reload raises the soft limit far above: cleared, with the new numbers.
    [cleared] = tracker.observe("a", 1500, MemoryBudget(soft=5000, hard=6000))
    assert (cleared.kind, cleared.soft) == ("soft_cleared", 5000)
    assert kinds(tracker.observe("a", 1500, BUDGET)) == ["soft_exceeded"]
    # The soft limit removed while exceeded: cleared too.
    [cleared] = tracker.observe("a", 1500, MemoryBudget(hard=2000))
    assert (cleared.kind, cleared.soft) == ("soft_cleared", None)
    assert tracker.observe("a", 1500, None) == []


def test_hysteresis_is_validated() -> None:
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="hysteresis"):
            BudgetTracker(hysteresis=bad)
    assert BudgetTracker(hysteresis=0.0).hysteresis == 0.0


SOFT = 10_000
REARM = 9_500  # soft * (1 - 5 %)

# One excursion: samples that stay at or above the re-arm line (some above soft, some in the band),
# ended by one sample below it. The count of excursions that reach above soft is the number of
# crossings, built independently of the tracker's own state machine.
_above = st.integers(SOFT + 1, 3 * SOFT)
_band = st.integers(REARM, SOFT)
_below = st.integers(0, REARM - 1)
_excursion = st.tuples(st.lists(st.one_of(_above, _band), max_size=8), _below)


@given(st.lists(_excursion, max_size=12), st.lists(st.one_of(_above, _band), max_size=5))
def test_exactly_one_soft_exceeded_per_crossing(excursions: list[tuple[list[int], int]], tail: list[int]) -> None:
    samples = [v for stay, end in excursions for v in (*stay, end)] + tail
    expected = sum(any(v > SOFT for v in stay) for stay, _ in excursions) + any(v > SOFT for v in tail)
    tracker = BudgetTracker(hysteresis=0.05)
    budget = MemoryBudget(soft=SOFT)
    seen = [e for rss in samples for e in tracker.observe("k", rss, budget)]
    exceeded = [e for e in seen if e.kind == "soft_exceeded"]
    assert len(exceeded) == expected
    assert all(e.rss > SOFT for e in exceeded)
    assert all(e.rss < REARM for e in seen if e.kind == "soft_cleared")
    # Strict alternation, starting with an exceed.
    assert kinds(seen) == ["soft_exceeded", "soft_cleared"] * (len(seen) // 2) + ["soft_exceeded"] * (len(seen) % 2)


# --- sampling real process trees -----------------------------------------------------------------

# The grandchild says "started", allocates and touches 64 MiB when it reads "alloc", says "ready",
# then blocks until its stdin closes. Its parent (the tree root) just waits for it.
GRANDCHILD = textwrap.dedent(
    """
    import os, sys
    print("started", os.getpid(), flush=True)
    sys.stdin.readline()
    block = bytearray(64 * 1024 * 1024)
    block[::4096] = b"\\x01" * (len(block) // 4096)  # touch every page: calloc'd pages are not resident
    print("ready", flush=True)
    sys.stdin.read()
    """
)
ROOT = textwrap.dedent(
    """
    import subprocess, sys
    sys.exit(subprocess.call([sys.executable, "-c", sys.argv[1]]))
    """
)


class LineReader:
    """Reads whole lines from a child's stdout, with a ceiling (never a sleep)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self._stream = proc.stdout
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._stream, selectors.EVENT_READ)

    def line(self) -> str:
        if not self._selector.select(timeout=CEILING):
            raise AssertionError(f"no output from the child within {CEILING} s")
        return self._stream.readline().decode().strip()

    def close(self) -> None:
        self._selector.close()


@contextlib.contextmanager
def session(*argv: str) -> Iterator[tuple[subprocess.Popen[bytes], LineReader]]:
    """A Python process in its own session (like a replica), with its whole group killed afterwards."""
    proc = subprocess.Popen(
        [sys.executable, "-c", *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    reader = LineReader(proc)
    try:
        yield proc, reader
    finally:
        family = _group(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=CEILING)
        reader.close()
        for stream in (proc.stdin, proc.stdout):
            assert stream is not None
            with contextlib.suppress(BrokenPipeError):
                stream.close()
        processes.assert_all_gone(family, CEILING)


def _group(pgid: int) -> list[int]:
    members = []
    for pid in psutil.pids():
        with contextlib.suppress(ProcessLookupError):
            if os.getpgid(pid) == pgid:
                members.append(pid)
    return members


def psutil_tree_rss(pid: int) -> int:
    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


def test_tree_rss_counts_a_grandchilds_memory() -> None:
    with session(ROOT, GRANDCHILD) as (proc, out):
        started, grandchild = out.line().split()
        assert started == "started"
        sampler = TreeSampler()
        before = sampler.sample_trees([proc.pid])[proc.pid]
        assert set(before.pids) == {proc.pid, int(grandchild)}
        assert before.pids[0] == proc.pid
        assert (before.processes, before.cpu_percent) == (2, None)
        assert before.threads >= 2
        assert before.rss == pytest.approx(psutil_tree_rss(proc.pid), abs=MiB)

        assert proc.stdin is not None
        proc.stdin.write(b"alloc\n")
        proc.stdin.flush()
        assert out.line() == "ready"

        after = sampler.sample_trees([proc.pid])[proc.pid]
        assert after.rss >= before.rss + 50 * MiB
        assert after.cpu_percent is not None and after.cpu_percent >= 0
        # The one-shot functions agree with the sampler and with psutil.
        once = tree_rss(proc.pid)
        assert once.rss == pytest.approx(after.rss, abs=MiB)
        assert once.rss == pytest.approx(psutil_tree_rss(proc.pid), abs=MiB)
        assert sample_trees([proc.pid, int(grandchild)])[int(grandchild)].rss >= 64 * MiB
        assert after.to_data()["rss"] == after.rss


def test_a_reparented_grandchild_still_counts_through_the_process_group() -> None:
    # The grandchild's parent exits at once; the grandchild (re-parented to pytest, a subreaper)
    # stays in the root's process group and must still be counted.
    middle = textwrap.dedent(
        """
        import subprocess, sys
        subprocess.Popen([sys.executable, "-c", sys.argv[1]])
        """
    )
    orphan = "import os, sys\nprint('orphan', os.getpid(), flush=True)\nsys.stdin.read()\n"
    root = textwrap.dedent(
        """
        import subprocess, sys
        subprocess.call([sys.executable, "-c", sys.argv[1], sys.argv[2]])
        print("middle gone", flush=True)
        sys.stdin.read()
        """
    )
    with session(root, middle, orphan) as (proc, out):
        lines = {out.line(), out.line()}
        orphan_pid = int(next(line for line in lines if line.startswith("orphan")).split()[1])
        assert "middle gone" in lines
        assert psutil.Process(orphan_pid).ppid() != proc.pid
        usage = tree_rss(proc.pid)
        assert orphan_pid in usage.pids
        assert usage.processes == 2


def test_missing_roots_are_absent_and_tree_rss_says_so() -> None:
    impossible = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    assert sample_trees([impossible]) == {}
    with pytest.raises(ProcessLookupError):
        tree_rss(impossible)
    mine = sample_trees([os.getpid(), impossible, os.getpid()])
    assert list(mine) == [os.getpid()]


# --- sampling a directory laid out like /proc ------------------------------------------------------


class FakeProc:
    """Writes ``<dir>/<pid>/stat`` and ``statm`` as Linux formats them (only the fields we read matter)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def put(self, pid: int, *, ppid: int, pgrp: int, start: int, ticks: int = 0, threads: int = 1,
            pages: int = 10, state: str = "S", name: str = "py (x) y") -> None:
        d = self.root / str(pid)
        d.mkdir(exist_ok=True)
        stat = (f"{pid} ({name}) {state} {ppid} {pgrp} {pgrp} 0 -1 4194304 0 0 0 0 {ticks} 0 0 0 20 0 "
                f"{threads} 0 {start} 1000000 {pages} 0 0 0 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0\n")
        (d / "stat").write_text(stat)
        (d / "statm").write_text(f"1000 {pages} 5 1 0 50 0\n")

    def remove(self, pid: int) -> None:
        for name in ("stat", "statm"):
            (self.root / str(pid) / name).unlink()
        (self.root / str(pid)).rmdir()


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_fake_proc_cpu_percent_threads_and_zombies(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path)
    proc.put(1, ppid=0, pgrp=1, start=1)
    proc.put(100, ppid=1, pgrp=100, start=50, ticks=10, threads=4, pages=100)  # a replica root
    proc.put(101, ppid=100, pgrp=100, start=51, ticks=0, threads=2, pages=50)
    proc.put(102, ppid=101, pgrp=100, start=52, state="Z", pages=0)  # zombie: not counted
    proc.put(200, ppid=1, pgrp=200, start=60, pages=1000)  # a stranger
    clock = FakeClock()
    page = os.sysconf("SC_PAGE_SIZE")
    ticks_per_s = os.sysconf("SC_CLK_TCK")
    sampler = TreeSampler(clock=clock, proc=str(tmp_path))

    first = sampler.sample_trees([100])[100]
    assert (first.rss, first.processes, first.threads, first.cpu_percent) == (150 * page, 2, 6, None)
    assert first.pids == (100, 101)

    clock.now += 2.0
    proc.put(100, ppid=1, pgrp=100, start=50, ticks=10 + ticks_per_s, threads=4, pages=100)  # 1 s of CPU
    proc.put(103, ppid=101, pgrp=100, start=90, ticks=ticks_per_s // 2, pages=7)  # new: 0.5 s, all new
    proc.remove(101)  # exited between samples: its last interval is lost, nothing goes negative
    second = sampler.sample_trees([100])[100]
    assert second.cpu_percent == pytest.approx(75.0)  # 1.5 s of CPU in 2 s
    assert set(second.pids) == {100, 103}  # 103's parent is gone; found through the group
    assert second.rss == 107 * page


def test_fake_proc_pid_reuse(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path)
    proc.put(1, ppid=0, pgrp=1, start=1)
    proc.put(100, ppid=1, pgrp=100, start=50)
    proc.put(300, ppid=1, pgrp=300, start=55, pages=500)  # a stranger
    clock = FakeClock()
    sampler = TreeSampler(clock=clock, proc=str(tmp_path), full_scan_every=3)
    assert sampler.sample_trees([100])[100].pids == (100,)  # call 1: full scan

    # Between two calls the stranger exits and its pid is reused by a child of the replica. The
    # cheap calls do not re-read strangers, so the periodic full scan is what finds it.
    proc.put(300, ppid=100, pgrp=100, start=70, pages=500)
    assert sampler.sample_trees([100])[100].pids == (100,)  # call 2
    assert sampler.sample_trees([100])[100].pids == (100,)  # call 3
    assert set(sampler.sample_trees([100])[100].pids) == {100, 300}  # call 4: full scan

    # The root pid itself reused by another process: a new tree, so no CPU baseline.
    clock.now += 1.0
    proc.put(100, ppid=1, pgrp=100, start=80, ticks=500)
    assert sampler.sample_trees([100])[100].cpu_percent is None
    clock.now += 1.0
    assert sampler.sample_trees([100])[100].cpu_percent == 0.0


def test_fake_proc_a_root_sampled_late_gets_its_older_descendants(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path)
    proc.put(1, ppid=0, pgrp=1, start=1)
    proc.put(100, ppid=1, pgrp=100, start=50)
    sampler = TreeSampler(proc=str(tmp_path), full_scan_every=1000)
    assert sampler.sample_trees([1])[1].processes == 2
    proc.put(101, ppid=100, pgrp=100, start=60)  # new: read because it is new
    proc.put(102, ppid=101, pgrp=100, start=61)
    sampler.sample_trees([1])
    # Now 100 becomes a root of its own; its descendants were seen (as part of 1's tree) before.
    assert set(sampler.sample_trees([100])[100].pids) == {100, 101, 102}


def test_sampler_validates_its_settings() -> None:
    with pytest.raises(ValueError, match="full_scan_every"):
        TreeSampler(full_scan_every=0)
