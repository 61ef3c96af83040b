"""Sizes and durations: parsing config values and formatting them for people."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from microkernel.units import UnitError, format_duration, format_size, parse_duration, parse_size

KiB, MiB, GiB, TiB = 1024, 1024**2, 1024**3, 1024**4


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (512, 512),
        (3.0, 3),
        ("512", 512),
        ("512B", 512),
        ("64KiB", 64 * KiB),
        ("64Ki", 64 * KiB),
        ("2GiB", 2 * GiB),
        ("1.5GiB", 3 * GiB // 2),
        ("1.5 GiB", 3 * GiB // 2),
        ("  8 MiB ", 8 * MiB),
        ("1TiB", TiB),
        ("100MB", 100_000_000),
        ("100M", 100_000_000),
        ("1kB", 1000),
        ("1KB", 1000),
        ("1k", 1000),
        ("2GB", 2_000_000_000),
        ("1TB", 10**12),
        (".5KiB", 512),
        ("1.1KiB", 1126),  # 1126.4 rounds to the nearest byte
    ],
)
def test_parse_size_accepts(value: object, expected: int) -> None:
    assert parse_size(value, key="k") == expected


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("three", "expected a size"),
        ("", "expected a size"),
        ("12XB", "unknown size unit 'XB'"),
        ("2gib", "did you mean 'GiB'?"),
        ("100mb", "did you mean 'MB'?"),
        ("-1", "must not be negative"),
        ("-1KiB", "must not be negative"),
        (-5, "must not be negative"),
        ("1.5", "whole number of bytes"),
        ("1.5B", "whole number of bytes"),
        (1.5, "whole number of bytes"),
        (math.inf, "whole number of bytes"),
        (True, "expected a size"),
        (None, "expected a size"),
        ([1], "expected a size"),
        ("1 2 KiB", "expected a size"),
    ],
)
def test_parse_size_rejects_with_key_and_value(value: object, fragment: str) -> None:
    with pytest.raises(UnitError) as info:
        parse_size(value, key="kernel.max_message_size")
    message = str(info.value)
    assert message.startswith("kernel.max_message_size: ")
    assert fragment in message
    assert repr(value) in message or "unknown size unit" in message
    assert info.value.key == "kernel.max_message_size"
    assert info.value.value is value
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0.0),
        (2, 2.0),
        (2.5, 2.5),
        ("2.5", 2.5),
        ("250ms", 0.25),
        ("1.5s", 1.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("500us", 0.0005),
        ("500µs", 0.0005),
        ("500μs", 0.0005),
        (" 10 s ", 10.0),
        ("1h30m", 5400.0),
        ("2m 03s", 123.0),
        ("1h 02m 03s", 3723.0),
        ("1s 500ms", 1.5),
    ],
)
def test_parse_duration_accepts(value: object, expected: float) -> None:
    assert parse_duration(value, key="k") == pytest.approx(expected)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (-1, "must not be negative"),
        (-0.5, "must not be negative"),
        ("-1s", "must not be negative"),
        (math.inf, "must be finite"),
        (math.nan, "must be finite"),
        ("fast", "expected a duration"),
        ("", "expected a duration"),
        ("   ", "expected a duration"),
        ("10x", "unknown duration unit 'x'"),
        ("10MS", "did you mean 'ms'?"),
        ("10S", "did you mean 's'?"),
        ("1s 2m", "largest to smallest"),
        ("1m 1m", "largest to smallest"),
        ("1m 30", "needs a unit"),
        (True, "expected a duration"),
        (None, "expected a duration"),
    ],
)
def test_parse_duration_rejects_with_key(value: object, fragment: str) -> None:
    with pytest.raises(UnitError) as info:
        parse_duration(value, key="services.echo.start_timeout")
    assert str(info.value).startswith("services.echo.start_timeout: ")
    assert fragment in str(info.value)
    assert info.value.reason in str(info.value)


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (1023, "1023 B"),
        (1024, "1 KiB"),
        (1536, "1.5 KiB"),
        (64 * KiB, "64 KiB"),
        (3 * GiB // 2, "1.5 GiB"),
        (5 * GiB // 4, "1.25 GiB"),
        (2 * TiB, "2 TiB"),
        (4096 * TiB, "4096 TiB"),
        (MiB - 1, "1 MiB"),  # 1023.999 KiB rounds up into the next unit
        (-2048, "-2 KiB"),
    ],
)
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0 s"),
        (0.0005, "500 us"),
        (0.85, "850 ms"),
        (0.9996, "1.0 s"),
        (1.5, "1.5 s"),
        (59.94, "59.9 s"),
        (59.96, "1m 00s"),
        (123, "2m 03s"),
        (3599.6, "1h 00m 00s"),
        (3723, "1h 02m 03s"),
        (3 * 86400 + 4 * 3600 + 5 * 60 + 7, "3d 04h 05m"),
        (-0.85, "-850 ms"),
        (math.inf, "inf"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@given(st.integers(min_value=0, max_value=2**62))
def test_parse_size_of_plain_integer_string_round_trips(n: int) -> None:
    assert parse_size(str(n), key="k") == n
    assert parse_size(f"{n}B", key="k") == n


@given(st.integers(min_value=0, max_value=1023), st.sampled_from([1, KiB, MiB, GiB, TiB]))
def test_format_size_is_exact_for_whole_units(count: int, unit: int) -> None:
    assert parse_size(format_size(count * unit), key="k") == count * unit


@given(st.integers(min_value=0, max_value=2**60))
def test_format_size_parses_back_within_half_a_percent(n: int) -> None:
    parsed = parse_size(format_size(n), key="k")
    assert abs(parsed - n) <= n * 0.005


def _shown_precision(seconds: float) -> float:
    if seconds < 1e-3:
        return 0.5e-6
    if seconds < 1:
        return 0.5e-3
    if seconds < 60:
        return 0.05
    if seconds < 86400:
        return 0.5
    return 30.0


@given(st.floats(min_value=0, max_value=10 * 365 * 86400, allow_nan=False))
def test_format_duration_parses_back_to_the_precision_shown(seconds: float) -> None:
    parsed = parse_duration(format_duration(seconds), key="k")
    assert abs(parsed - seconds) <= _shown_precision(seconds) + 1e-9 * max(1.0, seconds)
