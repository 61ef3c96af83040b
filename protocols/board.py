"""The heartbeat board: liveness for same-host replicas without a message per beat.

A heartbeat message costs the kernel a wakeup, a receive and a decode; with hundreds of idle
replicas that is the kernel's whole idle CPU. On one host there is a cheaper channel: a small
file in the kernel's runtime directory, shared with ``mmap``. Each replica owns one slot and
stores the time of its latest beat there (``CLOCK_MONOTONIC`` nanoseconds, one clock for every
process on the host); the kernel reads all slots once per check. Liveness semantics are exactly
those of the ``heartbeat`` message (see ``docs/protocol.md`` §7.1).

Layout (little-endian)::

    offset 0   8 bytes  magic b"MKHB\\x00\\x00\\x01\\x00"
    offset 8   u32      slot count
    offset 64  slots of 16 bytes: u64 owner (the kernel's tag for the replica), u64 last beat (ns; 0 = none)

Eight-byte aligned stores and loads are single machine operations, so a reader never sees a
torn timestamp.
"""

from __future__ import annotations

import mmap
import os
import struct
import time

MAGIC = b"MKHB\x00\x00\x01\x00"
HEADER_SIZE = 64
SLOT_SIZE = 16
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

BOARD_ENV = "MK_HEARTBEAT_BOARD"
SLOT_ENV = "MK_HEARTBEAT_SLOT"


class BoardError(Exception):
    """The board file is missing, of the wrong format, or the slot is out of range."""


class HeartbeatBoard:
    """A mapped heartbeat board (the kernel creates it; replicas attach to their slot)."""

    def __init__(self, path: str | os.PathLike[str], mm: mmap.mmap, slots: int) -> None:
        self.path = os.fspath(path)
        self._mm = mm
        self.slots = slots

    @classmethod
    def create(cls, path: str | os.PathLike[str], slots: int) -> "HeartbeatBoard":
        """Create (or truncate) the board file with ``slots`` empty slots, mode 0600."""
        size = HEADER_SIZE + slots * SLOT_SIZE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        mm[0:8] = MAGIC
        _U32.pack_into(mm, 8, slots)
        return cls(path, mm, slots)

    @classmethod
    def attach(cls, path: str | os.PathLike[str]) -> "HeartbeatBoard":
        """Map an existing board (replica side)."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise BoardError(f"cannot open heartbeat board {path}: {exc.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_SIZE:
                raise BoardError(f"{path} is not a heartbeat board (too small)")
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        if mm[0:8] != MAGIC:
            mm.close()
            raise BoardError(f"{path} is not a heartbeat board of this version")
        slots = _U32.unpack_from(mm, 8)[0]
        if HEADER_SIZE + slots * SLOT_SIZE > size:
            mm.close()
            raise BoardError(f"{path} is truncated")
        return cls(path, mm, slots)

    def _offset(self, slot: int) -> int:
        if not 0 <= slot < self.slots:
            raise BoardError(f"slot {slot} is outside the board (0..{self.slots - 1})")
        return HEADER_SIZE + slot * SLOT_SIZE

    def claim(self, slot: int, owner: int) -> None:
        """Kernel: hand ``slot`` to a new replica (no beat yet)."""
        off = self._offset(slot)
        _U64.pack_into(self._mm, off + 8, 0)
        _U64.pack_into(self._mm, off, owner)

    def release(self, slot: int) -> None:
        """Kernel: the replica is gone; the slot is free again."""
        off = self._offset(slot)
        _U64.pack_into(self._mm, off, 0)
        _U64.pack_into(self._mm, off + 8, 0)

    def beat(self, slot: int, now_ns: int | None = None) -> None:
        """Replica: record a beat now."""
        _U64.pack_into(self._mm, self._offset(slot) + 8, time.monotonic_ns() if now_ns is None else now_ns)

    def last_beat(self, slot: int) -> int:
        """The latest beat of ``slot`` in monotonic nanoseconds, 0 if none."""
        return _U64.unpack_from(self._mm, self._offset(slot) + 8)[0]

    def owner(self, slot: int) -> int:
        return _U64.unpack_from(self._mm, self._offset(slot))[0]

    def close(self) -> None:
        try:
            self._mm.close()
        except BufferError:
            pass
