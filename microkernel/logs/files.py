"""One service's log file: buffered appends, size rotation, and a signal for followers.

The file is written from the kernel's loop in small amounts: records are appended to a buffered
file object and flushed once per batch (see :class:`~microkernel.logs.manager.ServiceLogs`), so a
chatty replica costs a ``write(2)`` per loop iteration, not per line. Rotation renames
``<name>.log.N-1`` to ``<name>.log.N`` … and ``<name>.log`` to ``<name>.log.1`` before a write
would make the file exceed ``max_bytes`` — a few metadata operations, cheap enough for the loop.
Files are created ``0600``: logs can hold secrets.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import BinaryIO

__all__ = ["LogFile", "rotated_path"]

log = logging.getLogger("microkernel.logs")

FILE_MODE = 0o600
WRITE_BUFFER = 64 * 1024


def rotated_path(path: Path, index: int) -> Path:
    """``<name>.log.<index>`` (index 0 is the live file)."""
    return path if index == 0 else path.with_name(f"{path.name}.{index}")


class LogFile:
    """Appends records to ``path`` (opened lazily), rotating at ``max_bytes`` into ``backups`` files.

    A write error (disk full, directory removed) drops the records and is logged once until a
    write succeeds again: output capture must never take the kernel down.
    """

    def __init__(self, path: Path, *, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.lines = {"out": 0, "err": 0}
        """Records written per stream (for the metrics)."""
        self.dropped = 0
        """Records lost to write errors."""
        self._file: BinaryIO | None = None
        self._size = 0
        self._dirty = False
        self._failing = False
        self._written = asyncio.Event()

    def write(self, record: str, stream: str) -> None:
        """Append one record (newline included); rotates first if it would not fit."""
        data = record.encode("utf-8", errors="replace")
        try:
            if self._file is None:
                self._open()
            if self._size > 0 and self._size + len(data) > self.max_bytes:
                self.rotate()
            assert self._file is not None
            self._file.write(data)
        except OSError as exc:
            self.dropped += 1
            self._fail(exc)
            return
        self._size += len(data)
        self._dirty = True
        self.lines[stream] = self.lines.get(stream, 0) + 1

    def _open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        self._file = os.fdopen(fd, "ab", buffering=WRITE_BUFFER)
        self._size = os.fstat(fd).st_size

    def rotate(self) -> None:
        """Close the live file and shift it to ``.1`` (dropping the oldest backup)."""
        self._close_file()
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
        else:
            for index in range(self.backups - 1, -1, -1):
                source = rotated_path(self.path, index)
                if source.exists():
                    os.replace(source, rotated_path(self.path, index + 1))
        self._open()

    def flush(self) -> bool:
        """Write buffered records to the file; True if there was something to write."""
        if not self._dirty or self._file is None:
            return False
        self._dirty = False
        try:
            self._file.flush()
        except OSError as exc:
            self._fail(exc)
            self._close_file()  # what was buffered is lost; the next write reopens the file
            return False
        self._failing = False
        # Wake long-polling followers, then arm a fresh event for the next batch.
        self._written.set()
        self._written = asyncio.Event()
        return True

    def next_batch(self) -> asyncio.Event:
        """An event set when the next batch of records is flushed (take it before reading the file)."""
        return self._written

    async def wait_written(self, timeout: float, event: asyncio.Event | None = None) -> bool:
        """Wait (at most ``timeout`` s) for the next flushed batch — or for ``event`` from
        :meth:`next_batch`, taken earlier; True if one came."""
        event = self._written if event is None else event
        try:
            async with asyncio.timeout(max(0.0, timeout)):
                await event.wait()
        except TimeoutError:
            return False
        return True

    def _fail(self, exc: OSError) -> None:
        if not self._failing:
            log.error("cannot write %s: %s (records are dropped until it works again)", self.path, exc)
            self._failing = True

    def _close_file(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except OSError as exc:
                self._fail(exc)

    def close(self) -> None:
        """Flush and close (a later write reopens the file)."""
        self.flush()
        self._close_file()
