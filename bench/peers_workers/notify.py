"""The benchmark's end of the workers' datagrams (``bench/peers_workers/worker.py``).

One unix datagram socket, one reader thread; every datagram ``KIND TAG PID T_NS`` becomes a
``Note`` in the queue of its (kind, tag). Waiting is blocking on that queue with a ceiling: no
polling of any supervisor is involved in noticing that a worker runs.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
from collections import defaultdict
from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class Note:
    """One datagram: ``kind`` (``up`` | ``cross``), the worker's tag, pid and monotonic stamp."""

    kind: str
    tag: str
    pid: int
    t_ns: int


class Listener:
    """Binds ``path`` and files every datagram by (kind, tag); a context manager."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(path)
        self._sock.settimeout(0.2)  # lets the reader see close() (a blocked recv would not wake)
        self._closed = False
        self._lock = threading.Lock()
        self._queues: dict[tuple[str, str], queue.Queue[Note]] = defaultdict(queue.Queue)
        self._up_tags: set[str] = set()
        self._up_changed = threading.Condition(self._lock)
        self._thread = threading.Thread(target=self._read, name="peers-notify", daemon=True)
        self._thread.start()

    def _queue(self, kind: str, tag: str) -> queue.Queue[Note]:
        with self._lock:
            return self._queues[(kind, tag)]

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self._sock.recv(512)
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            try:
                kind, tag, pid, t_ns = data.decode().split()
                note = Note(kind=kind, tag=tag, pid=int(pid), t_ns=int(t_ns))
            except ValueError:
                continue
            self._queue(kind, tag).put(note)
            if kind == "up":
                with self._up_changed:
                    self._up_tags.add(tag)
                    self._up_changed.notify_all()

    def wait(self, kind: str, tag: str, timeout: float, *, not_pid: int | None = None) -> Note:
        """The next ``kind`` note of ``tag`` (skipping ones from ``not_pid``); raises on timeout."""
        q = self._queue(kind, tag)
        while True:
            try:
                note = q.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"no {kind!r} from {tag} within {timeout:g}s") from None
            if note.pid != not_pid:
                return note

    def drain(self, kind: str, tag: str) -> list[Note]:
        """Everything queued for (kind, tag) right now."""
        q = self._queue(kind, tag)
        out = []
        while True:
            try:
                out.append(q.get_nowait())
            except queue.Empty:
                return out

    def wait_up_count(self, prefix: str, count: int, timeout: float) -> int:
        """Block until ``count`` distinct tags starting with ``prefix`` said ``up``; return how many did."""

        def seen() -> int:
            return sum(1 for t in self._up_tags if t.startswith(prefix))

        with self._up_changed:
            self._up_changed.wait_for(lambda: seen() >= count, timeout)
            return seen()

    def close(self) -> None:
        self._closed = True
        self._thread.join(1.0)
        self._sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
