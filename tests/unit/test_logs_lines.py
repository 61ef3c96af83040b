"""Line splitting and the record format of captured replica output."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from microkernel.logs.lines import LineSplitter, format_record, record_replica, timestamp


def test_lines_are_split_across_chunks_and_the_partial_rest_waits() -> None:
    s = LineSplitter()
    assert s.feed(b"one\ntw") == [b"one"]
    assert s.pending == 2
    assert s.feed(b"o\nthree\n") == [b"two", b"three"]
    assert s.flush() is None


def test_a_partial_last_line_is_returned_by_flush() -> None:
    s = LineSplitter()
    assert s.feed(b"done\nno newline") == [b"done"]
    assert s.flush() == b"no newline"
    assert s.flush() is None


def test_a_long_line_is_cut_into_records_of_at_most_max_line_bytes_without_losing_bytes() -> None:
    s = LineSplitter(max_line=10)
    out = s.feed(b"a" * 25)  # no newline yet: cut as soon as it is too long
    assert out == [b"a" * 10, b"a" * 10]
    out += s.feed(b"bb\nc" * 1 + b"\n")
    assert out == [b"a" * 10, b"a" * 10, b"aaaaabb", b"c"]
    assert s.pending == 0


@given(st.lists(st.binary(max_size=40), max_size=20), st.integers(min_value=1, max_value=16))
def test_splitting_loses_and_reorders_nothing(chunks: list[bytes], max_line: int) -> None:
    s = LineSplitter(max_line=max_line)
    lines = [line for chunk in chunks for line in s.feed(chunk)]
    rest = s.flush()
    data = b"".join(chunks)
    assert all(len(line) <= max_line for line in lines)
    assert all(b"\n" not in line for line in lines)
    # Rejoining gives the input back, modulo where long lines were cut.
    assert b"".join(lines) + (rest or b"") == data.replace(b"\n", b"")


def test_record_format_replaces_bad_bytes_and_drops_a_carriage_return() -> None:
    stamp = timestamp(1_795_334_462_123_456_789)
    assert stamp == "2026-11-22T08:01:02.123Z"
    record = format_record(stamp, 3, "err", b"bad \xff\xfe bytes\r")
    assert record == "2026-11-22T08:01:02.123Z 3 err bad \ufffd\ufffd bytes\n"
    assert record_replica(record) == "3"
    assert format_record(stamp, None, "out", b"standby").split(" ")[1] == "-"


def test_timestamp_is_utc_with_milliseconds() -> None:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", timestamp())
