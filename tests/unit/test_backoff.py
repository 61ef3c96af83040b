"""Restart backoff with explicit fake times: growth, cap, reset after stable uptime."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from microkernel.supervisor.backoff import Backoff
from microkernel.supervisor.spec import BackoffSpec

SPEC = BackoffSpec(initial=1.0, factor=2.0, max=10.0, reset_after=30.0)


def crash_loop(backoff: Backoff, count: int, *, uptime: float = 0.5) -> list[float]:
    """Exit ``count`` times after ``uptime`` seconds each; return the delays."""
    delays = []
    now = 1000.0
    for _ in range(count):
        started = now
        now += uptime
        delay = backoff.on_exit(started, now)
        delays.append(delay)
        now += delay
    return delays


def test_first_restart_is_immediate_then_grows_exponentially_up_to_the_cap() -> None:
    backoff = Backoff(SPEC)
    assert crash_loop(backoff, 8) == [0.0, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    assert backoff.consecutive == 8


def test_stable_uptime_resets_the_streak() -> None:
    backoff = Backoff(SPEC)
    crash_loop(backoff, 4)
    assert backoff.consecutive == 4
    assert backoff.on_exit(started_at=0.0, now=30.0) == 0.0  # ran exactly reset_after: stable
    assert backoff.consecutive == 1
    assert backoff.on_exit(started_at=30.0, now=31.0) == 1.0


def test_uptime_just_below_reset_after_keeps_growing() -> None:
    backoff = Backoff(SPEC)
    assert backoff.on_exit(started_at=0.0, now=29.9) == 0.0
    assert backoff.on_exit(started_at=30.0, now=59.9) == 1.0
    assert backoff.on_exit(started_at=60.0, now=89.9) == 2.0


def test_reset_starts_a_new_streak() -> None:
    backoff = Backoff(SPEC)
    crash_loop(backoff, 5)
    backoff.reset()
    assert backoff.consecutive == 0
    assert crash_loop(backoff, 2) == [0.0, 1.0]


def test_factor_one_is_constant_delay() -> None:
    backoff = Backoff(BackoffSpec(initial=0.25, factor=1.0, max=5.0))
    assert crash_loop(backoff, 5) == [0.0, 0.25, 0.25, 0.25, 0.25]


def test_huge_streaks_do_not_overflow() -> None:
    backoff = Backoff(SPEC)
    assert backoff.delay_for(100_000) == 10.0
    assert Backoff(BackoffSpec(factor=1e300, max=7.0)).delay_for(5) == 7.0


def test_default_spec() -> None:
    backoff = Backoff(BackoffSpec())
    assert backoff.spec == BackoffSpec(initial=0.1, factor=2.0, max=30.0, reset_after=30.0)
    assert crash_loop(backoff, 4) == pytest.approx([0.0, 0.1, 0.2, 0.4])
    assert "consecutive=4" in repr(backoff)


@given(
    initial=st.floats(min_value=0.0, max_value=10.0),
    factor=st.floats(min_value=1.0, max_value=10.0),
    extra=st.floats(min_value=0.0, max_value=100.0),
    count=st.integers(min_value=1, max_value=200),
)
def test_delays_are_monotonic_and_capped(initial: float, factor: float, extra: float, count: int) -> None:
    spec = BackoffSpec(initial=initial, factor=factor, max=initial + extra)
    delays = crash_loop(Backoff(spec), count, uptime=0.0)
    assert delays[0] == 0.0
    assert all(0.0 <= d <= spec.max for d in delays)
    assert delays == sorted(delays)
