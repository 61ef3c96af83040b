"""Reading one child's stdout and stderr on the kernel's loop, without a thread or a task per child.

Each stream is a pipe created here: the write end becomes the child's fd 1 or 2 at spawn (and is
closed in the kernel right after), the non-blocking read end is watched with ``loop.add_reader`` —
an idle replica costs nothing, a chatty one a read per loop iteration. Exit detection never depends
on these pipes (it awaits the child's pid, see :mod:`microkernel.supervisor.process`), so a
grandchild that inherited them cannot hide an exit; :meth:`OutputCapture.close`, called once the
replica's tree is dead, drains what is left, writes a partial last line, and closes the read ends
(a descendant that escaped the tree kill and writes later gets ``EPIPE``, like any writer whose
reader is gone).

The destination can change: a warm standby is started before anyone knows which replica it will
become. Its records wait in a small buffer until :meth:`OutputCapture.assign` names the service
file and replica index; they are then written there with the index filled in.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Final

from microkernel.logs.files import LogFile
from microkernel.logs.lines import LineSplitter, format_record, timestamp

__all__ = ["OutputCapture"]

log = logging.getLogger("microkernel.logs")

READ_SIZE: Final = 64 * 1024
READS_PER_WAKEUP: Final = 4
"""At most this many reads per stream per loop iteration: a flood cannot starve the loop."""
DRAIN_LIMIT: Final = 4 * 1024 * 1024
"""What :meth:`OutputCapture.close` still reads from a pipe after the child is gone."""
UNASSIGNED_LIMIT: Final = 256
"""Records a standby may print before it is assigned (the rest is counted, not kept)."""

STREAMS: Final = ("out", "err")


class OutputCapture:
    """The two output pipes of one child process and where their records go.

    ``on_write(file)`` is called after records were appended to ``file`` (the owner flushes
    once per loop iteration).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, on_write: Callable[[LogFile], None]) -> None:
        self._loop = loop
        self._on_write = on_write
        self.file: LogFile | None = None
        self.replica: int | None = None
        self._pending: list[tuple[str, str, bytes]] = []
        self._overflow = 0
        self._splitters = {stream: LineSplitter() for stream in STREAMS}
        self._read_fds: dict[str, int] = {}
        self._write_fds: dict[str, int] = {}
        try:
            for stream in STREAMS:
                r, w = os.pipe()  # both close-on-exec; spawn dup2()s the write end onto fd 1/2
                self._read_fds[stream] = r
                self._write_fds[stream] = w
                os.set_blocking(r, False)
        except OSError:
            self._close_fds()
            raise
        self.closed = False

    @property
    def stdout(self) -> int:
        """The write end to pass as the child's stdout."""
        return self._write_fds["out"]

    @property
    def stderr(self) -> int:
        """The write end to pass as the child's stderr."""
        return self._write_fds["err"]

    def started(self) -> None:
        """The child holds the write ends now: close ours (so EOF can come) and start reading."""
        for fd in self._write_fds.values():
            os.close(fd)
        self._write_fds.clear()
        for stream, fd in self._read_fds.items():
            self._loop.add_reader(fd, self._on_readable, stream)

    def assign(self, file: LogFile, replica: int) -> None:
        """From now on records go to ``file`` as ``replica``; buffered ones are written first."""
        self.file, self.replica = file, replica
        if self._pending:
            for stamp, stream, raw in self._pending:
                file.write(format_record(stamp, replica, stream, raw), stream)
            self._pending.clear()
            self._on_write(file)
        if self._overflow:
            file.write(format_record(timestamp(), replica, "err",
                                     f"[microkernel: {self._overflow} earlier lines of this process were dropped]".encode()), "err")
            self._overflow = 0
            self._on_write(file)

    def _on_readable(self, stream: str) -> None:
        fd = self._read_fds.get(stream)
        if fd is None:
            return
        for _ in range(READS_PER_WAKEUP):
            try:
                data = os.read(fd, READ_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:
                log.warning("reading a child's std%s failed: %s", stream, exc)
                data = b""
            if not data:  # EOF: every writer is gone
                self._finish(stream)
                return
            self._emit(stream, self._splitters[stream].feed(data))
            if len(data) < READ_SIZE:
                return

    def _emit(self, stream: str, lines: list[bytes]) -> None:
        if not lines:
            return
        stamp = timestamp()
        file = self.file
        if file is None:
            room = UNASSIGNED_LIMIT - len(self._pending)
            self._pending.extend((stamp, stream, raw) for raw in lines[:max(0, room)])
            self._overflow += max(0, len(lines) - max(0, room))
            return
        for raw in lines:
            file.write(format_record(stamp, self.replica, stream, raw), stream)
        self._on_write(file)

    def _finish(self, stream: str) -> None:
        fd = self._read_fds.pop(stream, None)
        if fd is None:
            return
        self._loop.remove_reader(fd)
        os.close(fd)
        rest = self._splitters[stream].flush()
        if rest is not None:
            self._emit(stream, [rest])

    def close(self) -> list[str]:
        """Drain what the pipes still hold (bounded), write partial lines, stop reading.

        Returns the records of output that never got a destination (a standby that was never
        assigned), for the caller to log.
        """
        for stream in list(self._read_fds):
            fd = self._read_fds[stream]
            left = DRAIN_LIMIT
            while left > 0:
                try:
                    data = os.read(fd, min(READ_SIZE, left))
                except (BlockingIOError, OSError):
                    break
                if not data:
                    break
                left -= len(data)
                self._emit(stream, self._splitters[stream].feed(data))
            self._finish(stream)
        self._close_fds()
        self.closed = True
        orphaned = [format_record(stamp, None, stream, raw).rstrip("\n") for stamp, stream, raw in self._pending]
        self._pending.clear()
        return orphaned

    def _close_fds(self) -> None:
        for fds in (self._read_fds, self._write_fds):
            for fd in fds.values():
                try:
                    self._loop.remove_reader(fd)
                except (ValueError, RuntimeError):
                    pass
                try:
                    os.close(fd)
                except OSError:
                    pass
            fds.clear()
