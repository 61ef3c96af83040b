"""Host memory pressure: the victim policy, the one-victim-at-a-time guard, and reading host RAM."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from microkernel.resources.pressure import (
    Candidate,
    HostMemory,
    HostPressure,
    choose_victim,
    parse_threshold,
    rank,
    read_host_memory,
    victim_order,
)

MiB = 1024**2
GiB = 1024**3
TOTAL = 64 * GiB


def cand(service: str, replica: int = 0, *, priority: int = 0, rss: int = GiB, soft: int | None = None,
         hard: int | None = None, started_at: float = 0.0) -> Candidate:
    return Candidate(service=service, replica=replica, key=(service, replica), pid=1000 + replica,
                     priority=priority, rss=rss, soft=soft, hard=hard, started_at=started_at)


def victim(*candidates: Candidate) -> str:
    decision = choose_victim(candidates, total=TOTAL, available=GiB, threshold_fraction=0.95)
    assert decision is not None
    return decision.victim.service


def test_lowest_priority_goes_first_whatever_its_size() -> None:
    assert victim(cand("big", priority=5, rss=40 * GiB), cand("small", priority=1, rss=MiB)) == "small"


def test_then_the_most_bytes_over_budget() -> None:
    # A small worker at twice its budget frees less than a big one 10 % over: bytes, not ratio.
    small = cand("small", rss=200 * MiB, hard=100 * MiB)
    big = cand("big", rss=22 * GiB, hard=20 * GiB)
    assert victim(small, big) == "big"


def test_soft_limit_is_the_measure_when_set() -> None:
    a = cand("a", rss=3 * GiB, soft=1 * GiB, hard=4 * GiB)  # 2 GiB over soft, under hard
    b = cand("b", rss=3 * GiB, hard=2 * GiB)  # 1 GiB over hard
    assert (a.budget, a.excess, b.budget, b.excess) == (GiB, 2 * GiB, 2 * GiB, GiB)
    assert victim(a, b) == "a"


def test_no_budget_counts_all_rss_as_excess() -> None:
    unbudgeted = cand("free", rss=2 * GiB)
    keeps_budget = cand("kept", rss=3 * GiB, hard=4 * GiB)
    assert unbudgeted.excess == 2 * GiB
    assert victim(unbudgeted, keeps_budget) == "free"
    assert victim(cand("tiny", rss=10 * MiB), cand("over", rss=5 * GiB, hard=2 * GiB)) == "over"


def test_then_the_newest() -> None:
    assert victim(cand("old", started_at=10.0), cand("new", started_at=20.0), cand("mid", started_at=15.0)) == "new"


def test_nothing_to_kill() -> None:
    assert choose_victim([], total=TOTAL, available=0, threshold_fraction=0.9) is None
    assert choose_victim([cand("gone", rss=0)], total=TOTAL, available=0, threshold_fraction=0.9) is None


def test_decision_reason_and_event_data() -> None:
    decision = choose_victim(
        [cand("trainer", 2, priority=1, rss=5 * GiB, soft=3 * GiB, hard=6 * GiB), cand("store", rss=GiB, priority=9)],
        total=TOTAL, available=2 * GiB, threshold_fraction=0.95,
    )
    assert decision is not None
    assert "trainer[2]" in decision.reason
    assert "2 GiB over its soft budget of 3 GiB" in decision.reason
    assert "96.9% used" in decision.reason and "95% threshold" in decision.reason
    data = decision.to_data()
    assert data["service"] == "trainer" and data["replica"] == 2 and data["excess"] == 2 * GiB
    assert data["host_total"] == TOTAL and data["host_available"] == 2 * GiB and data["candidates"] == 2
    assert data["used_fraction"] == pytest.approx(1 - 2 / 64)
    assert msgpack.unpackb(msgpack.packb(data)) == data  # msgpack-native, round-trips


def test_reason_for_an_unbudgeted_and_an_under_budget_victim() -> None:
    only = choose_victim([cand("x", rss=GiB)], total=TOTAL, available=0, threshold_fraction=0.9)
    assert only is not None and "no memory budget" in only.reason and "among 1 candidate" in only.reason
    under = choose_victim([cand("y", rss=GiB, hard=2 * GiB)], total=TOTAL, available=0, threshold_fraction=0.9)
    assert under is not None and "1 GiB under its hard budget" in under.reason


candidates = st.builds(
    cand,
    st.sampled_from(["a", "b", "c", "d"]),
    st.integers(0, 50),
    priority=st.integers(-3, 3),
    rss=st.integers(0, 8 * GiB),
    soft=st.none() | st.integers(1, 4 * GiB),
    hard=st.none() | st.integers(4 * GiB, 8 * GiB),
    started_at=st.floats(0, 1e6, allow_nan=False),
)


@given(st.lists(candidates, max_size=20))
def test_the_victim_is_first_in_kill_order(pool: list[Candidate]) -> None:
    decision = choose_victim(pool, total=TOTAL, available=0, threshold_fraction=0.9)
    eligible = [c for c in pool if c.rss > 0]
    if not eligible:
        assert decision is None
        return
    assert decision is not None
    assert decision.victim in eligible
    assert all(victim_order(decision.victim) <= victim_order(c) for c in eligible)
    ordered = rank(eligible)
    assert [victim_order(c) for c in ordered] == sorted(victim_order(c) for c in eligible)
    # Nobody with a lower priority survives the victim.
    assert decision.victim.priority == min(c.priority for c in eligible)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_threshold_boundary() -> None:
    guard = HostPressure(0.9, 1000)
    assert guard.threshold_bytes == 900
    assert not guard.is_over(100)  # exactly 90 % used
    assert guard.is_over(99)
    assert guard.used_fraction(250) == pytest.approx(0.75)
    assert guard.check(100, [cand("a")]) is None


def test_one_victim_at_a_time_until_it_is_gone_or_settle_passes() -> None:
    clock = FakeClock()
    guard = HostPressure(0.9, 1000, settle=5.0, clock=clock)
    pool = [cand("a", rss=300, started_at=1), cand("b", rss=300, started_at=2)]
    first = guard.check(50, pool)
    assert first is not None and first.victim.service == "b"
    assert guard.dying == {("b", 0)}
    clock.now = 4.9
    assert guard.check(50, pool) is None  # b is still dying: one spike must not kill twice
    guard.victim_gone(("b", 0))
    pool = pool[:1]
    second = guard.check(50, pool)
    assert second is not None and second.victim.service == "a"
    clock.now = 10.0  # a never went away (stuck), but settle has passed: act again, never on a
    assert guard.check(50, pool) is None  # nobody else to kill
    third = guard.check(50, [*pool, cand("c", rss=10)])
    assert third is not None and third.victim.service == "c"
    assert guard.dying == {("a", 0), ("c", 0)}
    guard.victim_gone(("nobody", 1))  # unknown keys are fine


def test_guard_validates_its_settings() -> None:
    for args in [(0.0, 1000), (1.5, 1000), (0.9, 0)]:
        with pytest.raises(ValueError):
            HostPressure(*args)
    with pytest.raises(ValueError, match="settle"):
        HostPressure(0.9, 1000, settle=-1)
    guard = HostPressure(1.0, 1000)
    assert (guard.threshold_fraction, guard.total_bytes) == (1.0, 1000)
    assert not guard.is_over(0)  # a threshold of 100 % never triggers


@pytest.mark.parametrize(("value", "expected"), [("95%", 0.95), (" 90 % ", 0.9), ("100%", 1.0), (0.8, 0.8), (1, 1.0)])
def test_parse_threshold(value: object, expected: float) -> None:
    assert parse_threshold(value) == pytest.approx(expected)


@pytest.mark.parametrize("value", ["0%", "101%", "x%", "95", 0, 1.5, True, None, float("nan")])
def test_parse_threshold_rejects(value: object) -> None:
    with pytest.raises(ValueError, match=r"^kernel\.memory_pressure: expected a percentage"):
        parse_threshold(value, key="kernel.memory_pressure")


def test_read_host_memory_on_this_machine() -> None:
    host = read_host_memory()
    assert host.total > 0
    assert 0 <= host.available <= host.total
    assert host.used == host.total - host.available
    assert 0.0 <= host.used_fraction <= 1.0
    assert HostMemory(total=0, available=0).used_fraction == 0.0
