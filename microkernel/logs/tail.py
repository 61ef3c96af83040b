"""Reading a service's log back: the last N records, and what was appended after a cursor.

Blocking file I/O: the kernel calls these in its thread pool. Both are bounded — the tail reads
the files backwards in blocks and stops once it has N records (or has scanned
:data:`MAX_SCAN` bytes), a follow step reads at most ``max_bytes`` — so a 10 GiB file costs
what the answer costs.

A :class:`Cursor` is a position in one file *by identity* (device, inode) plus a byte offset, so
it survives rotation: if the live file is no longer the one the cursor names, the rest of the
rotated file (now ``.1`` or older) is read first, then the newer ones. Only complete lines are
returned; a record still being written stays for the next read.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final

from microkernel.logs.files import rotated_path
from microkernel.logs.lines import record_replica

__all__ = ["MAX_SCAN", "Cursor", "read_after", "read_tail"]

BLOCK: Final = 64 * 1024
MAX_SCAN: Final = 64 * 1024 * 1024
"""The most a tail reads backwards (over all files) looking for N records of one replica."""
FOLLOW_BYTES: Final = 1024 * 1024
"""The most one follow step returns."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Cursor:
    """Where a reader stopped: file identity (``dev``, ``ino``; 0 = no file yet) and byte ``offset``."""

    dev: int = 0
    ino: int = 0
    offset: int = 0

    def to_wire(self) -> dict[str, int]:
        """The msgpack map sent in ``logs_reply`` and back in the next ``logs_request``."""
        return {"dev": self.dev, "ino": self.ino, "offset": self.offset}

    @classmethod
    def from_wire(cls, data: Any) -> Cursor:
        """Parse a client's cursor map; ``ValueError`` names what is wrong."""
        if not isinstance(data, dict):
            raise ValueError(f"cursor must be a map with dev, ino and offset, got {type(data).__name__}")
        values = {}
        for key in ("dev", "ino", "offset"):
            value = data.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"cursor.{key} must be an integer >= 0, got {value!r}")
            values[key] = value
        return cls(**values)


def _open(path: Path) -> tuple[BinaryIO, tuple[int, int], int] | None:
    try:
        f = open(path, "rb")
    except OSError:
        return None
    st = os.fstat(f.fileno())
    return f, (st.st_dev, st.st_ino), st.st_size


def _wanted(line: bytes, replica: int | None) -> bool:
    if replica is None:
        return True
    return record_replica(line.decode("utf-8", "replace")) == str(replica)


def _backwards(f: BinaryIO, end: int, budget: list[int]) -> Iterator[bytes]:
    """Complete lines of ``f[:end]`` from the last one back (``end`` must follow a newline or be 0)."""
    pos = end
    carry = b""
    while pos > 0 and budget[0] > 0:
        start = max(0, pos - BLOCK)
        f.seek(start)
        block = f.read(pos - start)
        budget[0] -= len(block)
        pos = start
        parts = (block + carry).split(b"\n")
        carry = parts[0]
        yield from reversed(parts[1:])
    if pos == 0 and carry:
        yield carry


def read_tail(path: Path, *, backups: int, lines: int, replica: int | None = None) -> tuple[list[str], Cursor]:
    """The last ``lines`` records (of one ``replica`` if given), oldest first, and the cursor after them.

    Rotated files are read too when the live one has fewer records.
    """
    out: list[bytes] = []
    cursor = Cursor()
    budget = [MAX_SCAN]
    for index in range(backups + 1):
        opened = _open(rotated_path(path, index))
        if opened is None:
            if index == 0:
                continue  # nothing written yet (or it was just rotated away): try the backups
            break
        f, (dev, ino), size = opened
        with f:
            end = _last_newline_end(f, size)
            if index == 0:
                cursor = Cursor(dev=dev, ino=ino, offset=end)
            for raw in _backwards(f, end, budget) if lines > 0 else ():
                if len(out) >= lines:
                    break
                if raw and _wanted(raw, replica):
                    out.append(raw)
        if len(out) >= lines or budget[0] <= 0:
            break
    out.reverse()
    return [raw.decode("utf-8", "replace") for raw in out], cursor


def _last_newline_end(f: BinaryIO, size: int) -> int:
    """The offset just after the file's last newline (a record being written is not complete yet)."""
    pos = size
    while pos > 0:
        start = max(0, pos - BLOCK)
        f.seek(start)
        block = f.read(pos - start)
        found = block.rfind(b"\n")
        if found >= 0:
            return start + found + 1
        pos = start
        if size - pos > MAX_SCAN:
            break
    return 0


def read_after(
    path: Path, cursor: Cursor, *, backups: int, replica: int | None = None, max_bytes: int = FOLLOW_BYTES
) -> tuple[list[str], Cursor]:
    """Records appended after ``cursor`` (at most about ``max_bytes``), and the cursor after them."""
    live = _open(path)
    if live is None:
        return [], cursor
    files = [live]
    opened_all = [live]
    try:
        start = 0
        if (cursor.dev, cursor.ino) == live[1]:
            start = cursor.offset if cursor.offset <= live[2] else 0  # smaller: truncated by someone
        elif cursor.ino != 0:
            # Rotated since: the cursor's file is one of the backups (or gone, then start afresh).
            for index in range(1, backups + 1):
                opened = _open(rotated_path(path, index))
                if opened is None:
                    break
                opened_all.append(opened)
                files.append(opened)
                if opened[1] == (cursor.dev, cursor.ino):
                    start = min(cursor.offset, opened[2])
                    break
            if files[-1][1] != (cursor.dev, cursor.ino):
                files[1:] = []
        out: list[bytes] = []
        left = max_bytes
        position = cursor
        # Oldest first: the cursor's backup, the newer backups, then the live file.
        for f, (dev, ino), size in reversed(files):
            f.seek(start)
            data = f.read(min(left, max(0, size - start)))
            end = data.rfind(b"\n") + 1
            out.extend(raw for raw in data[:end].split(b"\n")[:-1] if raw and _wanted(raw, replica))
            position = Cursor(dev=dev, ino=ino, offset=start + end)
            left -= end
            if start + end < size or left <= 0:
                break  # more to read in this file: the next request continues here
            start = 0
        return [raw.decode("utf-8", "replace") for raw in out], position
    finally:
        for f, _, _ in opened_all:
            f.close()
