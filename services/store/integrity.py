"""Checking what a read returns: per-block CRC32s, and the blobs verified since their file last changed.

Every blob has a CRC32 per 1 MiB block, computed from the bytes as they were written (next to
the sha256 that names it) and kept in the index. A read checks the blocks it copies against
them, in the buffer it returns, so what was checked is what the caller gets.

A whole blob that passed that check is remembered (:class:`VerifiedBlobs`) together with the
state of its file: device, inode, size, mtime and ctime. Any change to the file through the file
system (a write, a truncate, a rename over it, a ``chmod``) moves its ctime, which nothing but the
kernel can set; so while the state is unchanged, and for at most ``ttl`` seconds, a read of the
same blob skips the check. A state is remembered only if it held for the whole read and its
ctime is more than ``SETTLE_NS`` old when the read started: file timestamps come from a clock
that advances in ticks of a few milliseconds, and a change made within the tick of the last
change could otherwise leave the ctime as it was.
"""

from __future__ import annotations

import os
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

BLOCK_SIZE = 1 << 20
SETTLE_NS = 1_000_000_000
DEFAULT_TTL_S = 60.0
DEFAULT_LIMIT = 4096


@dataclass(frozen=True, slots=True, kw_only=True)
class FileState:
    """What identifies a blob file's content without reading it (see the module docstring)."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileState:
        """The state of a file from its ``stat``."""
        return cls(device=st.st_dev, inode=st.st_ino, size=st.st_size, mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns)


class VerifiedBlobs:
    """Blobs whose every block passed its check, each with its file's state at the time (thread-safe).

    Bounded in time (an entry is trusted for ``ttl`` seconds after the check) and in count (the
    least recently verified entries go first beyond ``limit``). ``ttl`` 0 trusts nothing: every
    read is checked.
    """

    def __init__(self, ttl: float = DEFAULT_TTL_S, limit: int = DEFAULT_LIMIT) -> None:
        self.ttl = ttl
        self.limit = limit
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[FileState, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def trusted(self, digest: str, state: FileState) -> bool:
        """Whether ``digest`` was verified less than ``ttl`` seconds ago in exactly this file state."""
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None:
                return False
            if entry[0] != state or time.monotonic() >= entry[1]:
                del self._entries[digest]
                return False
            return True

    def remember(self, digest: str, before: FileState, after: FileState, started_ns: int) -> bool:
        """Record a full check of ``digest`` that began at wall time ``started_ns`` with the file in
        state ``before`` and ended with it in state ``after``; False when the state is not
        trustworthy (it changed during the read, or its ctime had not settled)."""
        if self.ttl <= 0 or before != after or not before.ctime_ns <= started_ns - SETTLE_NS:
            return False
        with self._lock:
            self._entries.pop(digest, None)
            self._entries[digest] = (before, time.monotonic() + self.ttl)
            while len(self._entries) > self.limit:
                self._entries.popitem(last=False)
        return True

    def forget(self, digest: str) -> None:
        """Drop ``digest`` (its file is being removed)."""
        with self._lock:
            self._entries.pop(digest, None)

    def clear(self) -> None:
        """Trust nothing any more."""
        with self._lock:
            self._entries.clear()


def first_bad_block(view: Any, crcs: np.ndarray, first: int) -> int | None:
    """The index of the first block of ``view`` (block ``first`` of its blob onwards) whose CRC32
    differs from ``crcs``; None when all match. ``view`` starts on a block boundary."""
    view = memoryview(view).cast("B")
    for lo in range(0, len(view), BLOCK_SIZE):
        i = first + lo // BLOCK_SIZE
        if i >= len(crcs) or zlib.crc32(view[lo:lo + BLOCK_SIZE]) != int(crcs[i]):
            return i
    return None
