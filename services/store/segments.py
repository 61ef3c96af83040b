"""Shared-memory segments the store reads large blobs into, so a reply hands them over without a copy.

A blob read for a ``get`` (or a large ``read``) goes from the page cache straight into a segment
(``protocols.shm``); the reply's arrays are views of it, and the wire hands a same-host caller
the segment itself (a hard link, see ``protocols.handover``) instead of copying the payload.
A fresh segment costs a page allocation per 4 KiB on first write (≈ 1–2 GB/s here, slower
than the copy itself), so segments are kept and reused once nobody uses them:

* no array of this process still views it (the buffer handed out is tracked by a weak reference),
* no hand-over name of it is left (link count 1: every receiver claimed or the sender expired it),
* no receiver maps it (each receiver holds a shared ``flock`` for as long as its mapping lives,
  so an exclusive one succeeds only when none does).

Pooled segments idle for ``idle_s`` are released; the pool keeps at most ``capacity`` bytes, and
beyond that a read gets a segment of its own, unlinked when its last array is gone. When the
store process dies, the kernel unlinks its segments (``mk.<kernel>.<pid>.*``).
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
import weakref
from dataclasses import dataclass

import numpy as np

from protocols import shm

DEFAULT_IDLE_S = 30.0
_TAG = "store"


@dataclass(slots=True, kw_only=True)
class _Entry:
    """One pooled segment (mutable: its lease and last use change with every read)."""

    segment: shm.Segment
    fd: int  # kept open for flock and the link count
    lease: weakref.ref[memoryview] | None = None
    used: float = 0.0


class SegmentPool:
    """Reusable segments for blob reads (thread-safe); see the module docstring."""

    def __init__(self, capacity: int = shm.DEFAULT_POOL_BYTES, *, idle_s: float = DEFAULT_IDLE_S) -> None:
        self.capacity = capacity
        self.idle_s = idle_s
        self._lock = threading.Lock()
        self._entries: list[_Entry] = []

    @property
    def pooled_bytes(self) -> int:
        """Bytes held in pooled segments."""
        with self._lock:
            return sum(e.segment.size for e in self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def buffer(self, nbytes: int) -> np.ndarray:
        """A writable uint8 array of ``nbytes`` in shared memory: a free pooled segment (a new one if
        the pool has room), else a segment of its own; plain memory if /dev/shm refuses."""
        if nbytes <= 0:
            return np.empty(0, dtype=np.uint8)
        with self._lock:
            now = time.monotonic()
            self._trim(now)
            entry = self._free_entry(nbytes) or self._new_entry(nbytes)
            if entry is not None:
                out = np.frombuffer(entry.segment.buffer, dtype=np.uint8, count=nbytes)
                # numpy holds the buffer through its own memoryview: alive exactly as long as some
                # array made from ``out`` (all of them reach the segment through it).
                assert type(out.base) is memoryview
                entry.lease = weakref.ref(out.base)
                entry.used = now
                return out
        try:
            return shm.empty(nbytes, "uint8", tag="s")
        except OSError:
            return np.empty(nbytes, dtype=np.uint8)

    def _free_entry(self, nbytes: int) -> _Entry | None:
        # Not much larger than needed: a receiver maps (and keeps) the whole segment.
        for entry in self._entries:
            if nbytes <= entry.segment.size <= 2 * nbytes + (1 << 20) and _is_free(entry):
                return entry
        return None

    def _new_entry(self, nbytes: int) -> _Entry | None:
        size = -(-nbytes // shm.PAGE) * shm.PAGE
        if size > self.capacity:
            return None
        free = sorted((e for e in self._entries if _is_free(e)), key=lambda e: e.used)
        while free and sum(e.segment.size for e in self._entries) + size > self.capacity:
            self._drop(free.pop(0))
        if sum(e.segment.size for e in self._entries) + size > self.capacity:
            return None
        try:
            segment = shm.Segment.create(size, tag=_TAG, populate=True)  # pages allocated once, here
        except OSError:
            return None
        try:
            fd = os.open(shm.path_of(segment.name), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            segment.unlink()
            segment.close()
            return None
        entry = _Entry(segment=segment, fd=fd)
        self._entries.append(entry)
        return entry

    def trim(self) -> int:
        """Release free segments idle for ``idle_s``; returns how many."""
        with self._lock:
            return self._trim(time.monotonic())

    def _trim(self, now: float) -> int:
        idle = [e for e in self._entries if now - e.used > self.idle_s and _is_free(e)]
        for entry in idle:
            self._drop(entry)
        return len(idle)

    def clear(self) -> None:
        """Release every segment (on stop); ones still in use stay mapped where they are used."""
        with self._lock:
            for entry in list(self._entries):
                self._drop(entry)

    def _drop(self, entry: _Entry) -> None:
        self._entries.remove(entry)
        entry.segment.unlink()
        os.close(entry.fd)
        try:
            entry.segment.close()
        except BufferError:  # arrays of it are still alive here: the mapping goes with the last one
            pass


def _is_free(entry: _Entry) -> bool:
    """Nobody uses the segment: no array here, no hand-over name, no receiver's lock."""
    if entry.lease is not None and entry.lease() is not None:
        return False
    if os.fstat(entry.fd).st_nlink != 1:
        return False
    try:
        fcntl.flock(entry.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    fcntl.flock(entry.fd, fcntl.LOCK_UN)
    return True
