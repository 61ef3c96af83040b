"""Turning a child's raw output into log records: line splitting, cutting, the record format.

A record is one line of a service's log file::

    2026-11-22T08:01:02.123Z 0 err Traceback (most recent call last):

time (UTC, milliseconds), replica index (``-`` for output of a warm standby that was never
assigned), stream (``out`` or ``err``), then the text. Bytes that are not UTF-8 are replaced
(U+FFFD), a trailing ``\\r`` is dropped, and a line longer than :data:`MAX_LINE` bytes is cut into
several records so nothing is lost and no record is unbounded.
"""

from __future__ import annotations

import time
from typing import Final

__all__ = ["MAX_LINE", "LineSplitter", "format_record", "record_replica", "timestamp"]

MAX_LINE: Final = 64 * 1024
"""Longest text of one record, in bytes; longer lines are cut into several records."""


class LineSplitter:
    """Splits a byte stream into lines; keeps the partial last line until more data (or :meth:`flush`)."""

    __slots__ = ("_buffer", "_max")

    def __init__(self, max_line: int = MAX_LINE) -> None:
        if max_line < 1:
            raise ValueError(f"max_line must be >= 1, got {max_line}")
        self._buffer = bytearray()
        self._max = max_line

    @property
    def pending(self) -> int:
        """Bytes of a partial line waiting for its end."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        """The complete lines (without their newline) that ``data`` finishes, in order."""
        buf = self._buffer
        buf += data
        lines: list[bytes] = []
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            self._cut(buf, start, end, lines)
            start = end + 1
        # A partial line that is already too long is cut now: the buffer never grows unbounded.
        while len(buf) - start >= self._max:
            lines.append(bytes(buf[start : start + self._max]))
            start += self._max
        del buf[:start]
        return lines

    def _cut(self, buf: bytearray, start: int, end: int, out: list[bytes]) -> None:
        while end - start > self._max:
            out.append(bytes(buf[start : start + self._max]))
            start += self._max
        out.append(bytes(buf[start:end]))

    def flush(self) -> bytes | None:
        """The partial last line (the process exited without a final newline), if any."""
        if not self._buffer:
            return None
        rest = bytes(self._buffer)
        self._buffer.clear()
        return rest


def timestamp(ns: int | None = None) -> str:
    """``2026-11-22T08:01:02.123Z`` for ``ns`` (default: now)."""
    ns = time.time_ns() if ns is None else ns
    seconds, rest = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{rest // 1_000_000:03d}Z"


def format_record(stamp: str, replica: int | None, stream: str, raw: bytes) -> str:
    """One record, newline included (see the module docstring)."""
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    text = raw.decode("utf-8", errors="replace")
    return f"{stamp} {'-' if replica is None else replica} {stream} {text}\n"


def record_replica(record: str) -> str | None:
    """The replica field of a record (``"0"``, ``"-"``); ``None`` if it is not a record."""
    parts = record.split(" ", 3)
    return parts[1] if len(parts) >= 3 else None
