"""Heartbeat liveness bookkeeping with an explicit fake clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from microkernel.bus.heartbeat import Liveness


def test_peer_expires_after_liveness_missed_intervals() -> None:
    live: Liveness[str] = Liveness(interval=1.0, liveness=3)
    live.beat("a", 10.0)
    assert live.expired(12.9) == []
    assert live.expired(13.0) == []  # exactly interval * liveness of silence is still alive
    assert live.expired(13.01) == ["a"]


def test_each_silent_peer_is_reported_once_until_it_beats_again() -> None:
    live: Liveness[str] = Liveness(interval=1.0, liveness=2)
    live.beat("a", 0.0)
    assert live.expired(5.0) == ["a"]
    assert live.expired(6.0) == []
    assert "a" in live  # still known until forgotten
    live.beat("a", 7.0)
    assert live.expired(8.0) == []
    assert live.expired(9.5) == ["a"]


def test_beats_keep_a_peer_alive_and_reports_are_oldest_first() -> None:
    live: Liveness[tuple[str, int]] = Liveness(interval=0.5, liveness=3)
    live.beat(("b", 0), 0.0)
    live.beat(("a", 0), 0.2)
    live.beat(("c", 0), 0.4)
    live.beat(("b", 0), 1.0)  # b is fresh again: now the newest
    assert live.expired(1.95) == [("a", 0), ("c", 0)]
    assert live.expired(2.6) == [("b", 0)]


def test_beats_recorded_out_of_time_order_still_expire() -> None:
    """The kernel feeds the heartbeat board's beats replica by replica, with the times the replicas
    wrote: a silent peer may be recorded after a fresher one and must not hide behind it."""
    live: Liveness[str] = Liveness(interval=1.0, liveness=3)
    live.beat("fresh", 10.0)
    live.beat("silent", 9.0)
    assert live.next_deadline() == 12.0
    assert live.expired(12.5) == ["silent"]
    assert live.expired(13.5) == ["fresh"]


def test_forget_stops_tracking() -> None:
    live: Liveness[str] = Liveness(interval=1.0, liveness=1)
    live.beat("a", 0.0)
    live.beat("b", 0.0)
    live.forget("a")
    live.forget("never-seen")
    assert "a" not in live
    assert len(live) == 1
    assert live.expired(5.0) == ["b"]
    live.forget("b")
    assert len(live) == 0
    assert live.last_seen("b") is None


def test_last_seen_deadline_and_next_deadline() -> None:
    live: Liveness[str] = Liveness(interval=2.0, liveness=3)
    assert live.next_deadline() is None
    assert live.deadline("a") is None
    live.beat("a", 1.0)
    live.beat("b", 4.0)
    assert live.timeout == 6.0
    assert live.last_seen("a") == 1.0
    assert live.deadline("a") == 7.0
    assert live.next_deadline() == 7.0
    assert live.expired(7.5) == ["a"]
    # A reported peer keeps its last-seen time but no longer drives the timer.
    assert live.last_seen("a") == 1.0
    assert live.deadline("a") == 7.0
    assert live.next_deadline() == 10.0
    assert len(live) == 2
    assert (live.interval, live.liveness) == (2.0, 3)
    assert "live=1" in repr(live)


@pytest.mark.parametrize(("interval", "liveness"), [(0.0, 3), (-1.0, 3), (1.0, 0)])
def test_invalid_arguments(interval: float, liveness: int) -> None:
    with pytest.raises(ValueError):
        Liveness(interval, liveness)


events = st.lists(
    st.tuples(st.sampled_from(["beat", "forget", "check"]), st.integers(0, 4), st.floats(0.0, 3.0)),
    max_size=60,
)


@given(events)
def test_matches_a_brute_force_model(steps: list[tuple[str, int, float]]) -> None:
    live: Liveness[int] = Liveness(interval=1.0, liveness=2)
    last: dict[int, float] = {}
    reported: set[int] = set()
    now = 0.0
    for action, key, gap in steps:
        now += gap
        if action == "beat":
            live.beat(key, now)
            last[key] = now
            reported.discard(key)
        elif action == "forget":
            live.forget(key)
            last.pop(key, None)
            reported.discard(key)
        else:
            expected = {k for k, t in last.items() if now - t > 2.0 and k not in reported}
            assert set(live.expired(now)) == expected
            reported |= expected
        assert len(live) == len(last)
        assert all(live.last_seen(k) == t for k, t in last.items())
