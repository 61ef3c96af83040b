"""Restart intensity (OTP MaxR/MaxT) with an explicit fake clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from microkernel.supervisor.intensity import RestartWindow


def test_allows_up_to_intensity_restarts_within_the_period() -> None:
    window = RestartWindow(intensity=3, period=10.0)
    assert window.add(0.0)
    assert window.add(1.0)
    assert window.add(2.0)
    assert not window.add(3.0)  # the fourth within 10 s exceeds MaxR = 3
    assert window.count(3.0) == 4


def test_intensity_zero_means_the_first_restart_exceeds() -> None:
    window = RestartWindow(intensity=0, period=5.0)
    assert not window.add(100.0)


def test_old_restarts_slide_out_of_the_window() -> None:
    window = RestartWindow(intensity=2, period=10.0)
    assert window.add(0.0)
    assert window.add(5.0)
    assert window.add(10.5)  # 0.0 is now older than the period
    assert window.count(10.5) == 2
    assert window.count(15.1) == 1
    assert window.count(100.0) == 0


def test_window_boundary_is_inclusive_like_otp() -> None:
    window = RestartWindow(intensity=1, period=10.0)
    assert window.add(0.0)
    assert not window.add(10.0)  # exactly `period` ago still counts
    window.reset()
    assert window.add(0.0)
    assert window.add(10.000001)


def test_reset_forgets_everything() -> None:
    window = RestartWindow(intensity=1, period=60.0)
    window.add(1.0)
    assert not window.add(2.0)
    window.reset()
    assert window.count(2.0) == 0
    assert window.add(3.0)


def test_properties_and_repr() -> None:
    window = RestartWindow(intensity=4, period=30.0)
    assert (window.intensity, window.period) == (4, 30.0)
    assert "intensity=4" in repr(window)


@pytest.mark.parametrize(("intensity", "period"), [(-1, 10.0), (1, 0.0), (1, -5.0)])
def test_invalid_arguments(intensity: int, period: float) -> None:
    with pytest.raises(ValueError):
        RestartWindow(intensity, period)


@given(
    intensity=st.integers(min_value=0, max_value=6),
    period=st.floats(min_value=0.5, max_value=50.0),
    gaps=st.lists(st.floats(min_value=0.0, max_value=20.0), min_size=1, max_size=40),
)
def test_matches_a_brute_force_model(intensity: int, period: float, gaps: list[float]) -> None:
    window = RestartWindow(intensity, period)
    history: list[float] = []
    now = 0.0
    for gap in gaps:
        now += gap
        history.append(now)
        in_window = [t for t in history if now - t <= period]
        assert window.add(now) == (len(in_window) <= intensity)
        assert window.count(now) == len(in_window)
