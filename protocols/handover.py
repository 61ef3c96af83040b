"""Handing shared-memory payloads from one process to another: the sender's and the receiver's side.

A hand-over works with names, hard links and ``flock``, so that the kernel, not a protocol,
tracks who still uses what (``docs/protocol.md`` §3.2 states the rules for any implementation):

* The sender gives the receiver a *hand-over name*: a hard link to the segment's file (or, for a
  segment made just for this message, its only name). It never reuses that name.
* The receiver opens it, takes a shared ``flock`` and unlinks the name. Exactly one of the
  receiver (``claim``) and the sender (``expire``: unclaimed for ``CLAIM_TTL_S``) succeeds in
  unlinking, which settles every race between them. The receiver's mapping keeps a descriptor
  of the file (``mmap`` holds one), so its lock lasts exactly as long as its mapping, and ends
  when its process dies.
* A pooled segment is reused by its sender only when no hand-over name is left (link count 1)
  and nobody holds a lock on it (an exclusive ``flock`` succeeds): copying into an already
  mapped segment runs near memcpy speed, where a fresh segment pays for page allocation.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import stat
import threading
import time
from typing import Any

from protocols import shm
from protocols.shm import DEFAULT_POOL_BYTES, SegmentMapping, env_bytes, map_file, mapping_of, new_name, path_of, unlink_path

# Hand-over names not claimed within this many seconds are unlinked by their sender.
CLAIM_TTL_S = 60.0
# Pooled segments idle this long are released (their pages go back to the system).
POOL_IDLE_S = 30.0
_PAGE = shm.PAGE
_lock = threading.Lock()

# --- the sender's side -------------------------------------------------------------------------


class _Pool:
    """Segments this process copies outgoing payloads into, reused once every receiver let go."""

    def __init__(self) -> None:
        self.entries: list[tuple[SegmentMapping, int]] = []  # (mapping, fd kept for flock), oldest first
        self.last_used: dict[int, float] = {}
        self.capacity = env_bytes("MK_SHM_POOL_BYTES", DEFAULT_POOL_BYTES)

    def acquire(self, nbytes: int) -> SegmentMapping | None:
        """A free pooled mapping of at least ``nbytes`` (not much more), or None (no room)."""
        now = time.monotonic()
        self.trim(now)
        for m, fd in self.entries:
            if nbytes <= len(m) <= 2 * nbytes + (1 << 20) and _is_free(m, fd):
                self.last_used[id(m)] = now
                return m
        size = -(-nbytes // _PAGE) * _PAGE
        if size > self.capacity:
            return None
        while self.entries and sum(len(m) for m, _ in self.entries) + size > self.capacity:
            if not self._evict_one():
                return None
        seg = shm.Segment.create(size, tag="p", populate=True)
        m = seg._mapping
        assert m is not None and m.path is not None
        fd = os.open(m.path, os.O_RDONLY | os.O_CLOEXEC)
        self.entries.append((m, fd))
        self.last_used[id(m)] = now
        return m

    def _evict_one(self) -> bool:
        """Give up the least recently used entry: free ones are unlinked, busy ones are left to
        their receivers (their mappings keep the pages; the name goes)."""
        if not self.entries:
            return False
        self._drop(min(self.entries, key=lambda e: self.last_used.get(id(e[0]), 0.0)))
        return True

    def _drop(self, entry: tuple[SegmentMapping, int]) -> None:
        m, fd = entry
        self.entries.remove(entry)
        self.last_used.pop(id(m), None)
        if m.path is not None:
            unlink_path(m.path)
            m.path = None
        os.close(fd)
        try:
            m.close()
        except BufferError:  # a copy is being made into it on another thread's stack: let GC unmap
            pass

    def trim(self, now: float) -> None:
        for entry in list(self.entries):
            if now - self.last_used.get(id(entry[0]), now) > POOL_IDLE_S and _is_free(*entry):
                self._drop(entry)

    def clear(self) -> None:
        for entry in list(self.entries):
            self._drop(entry)


def _is_free(m: SegmentMapping, fd: int) -> bool:
    """No hand-over name left (only the pool's own link) and no receiver's lock."""
    if m.path is None or os.fstat(fd).st_nlink != 1:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    fcntl.flock(fd, fcntl.LOCK_UN)
    return True


_pool = _Pool()
_pending: dict[str, float] = {}  # hand-over name -> when its sender reclaims it (monotonic)


def export(obj: Any, links: dict[str, str]) -> tuple[str, int]:
    """Hand ``obj`` (a C-contiguous array or a bytes-like) over by shared memory: (name, offset).

    An object living in a segment this process owns (``empty``) is handed over as it is, with
    one hard link per segment per message (``links``: segment path -> hand-over name, kept by
    the caller for one message); anything else is copied into a pooled segment. Raises
    ``OSError`` when /dev/shm cannot take it (the caller then sends a frame).
    """
    m = mapping_of(obj)
    if m is not None and m.path is not None:
        offset = shm.address_of(obj) - m.address
        name = links.get(m.path)
        if name is None:
            name = new_name("h")
            os.link(m.path, path_of(name))
            _hand_over(name)
            links[m.path] = name
        return name, offset
    src = memoryview(obj)
    if not src.c_contiguous:
        raise ValueError("only contiguous buffers can be handed over")
    src = src.cast("B") if src.format != "B" or src.ndim != 1 else src
    nbytes = src.nbytes
    with _lock:
        pooled = _pool.acquire(nbytes)
        if pooled is not None:
            assert pooled.path is not None
            pooled[:nbytes] = src
            name = new_name("h")
            os.link(pooled.path, path_of(name))
            _hand_over(name)
            return name, 0
    name = _write_once(src)
    with _lock:
        _hand_over(name)
    return name, 0


def _write_once(src: memoryview) -> str:
    """A segment made for one hand-over: written with ``pwrite`` (ENOSPC is an error, not SIGBUS),
    its only name is the hand-over name."""
    name = new_name("x")
    path = path_of(name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        done, total = 0, src.nbytes
        while done < total:
            done += os.pwrite(fd, src[done:], done)
    except BaseException:
        unlink_path(path)
        raise
    finally:
        os.close(fd)
    return name


def _hand_over(name: str) -> None:
    # Called with _lock held.
    now = time.monotonic()
    _pending[name] = now + CLAIM_TTL_S
    if len(_pending) > 64 or any(t <= now for t in list(_pending.values())[:8]):
        _expire_locked(now)


def reclaim(names: list[str]) -> int:
    """Unlink hand-over names whose message never left (a dropped send); returns how many."""
    count = 0
    with _lock:
        for name in names:
            _pending.pop(name, None)
            count += unlink_path(path_of(name))
    return count


def expire(now: float | None = None) -> int:
    """Unlink hand-over names unclaimed for ``CLAIM_TTL_S`` and release idle pool segments."""
    with _lock:
        return _expire_locked(time.monotonic() if now is None else now)


def _expire_locked(now: float) -> int:
    count = 0
    for name, deadline in list(_pending.items()):
        if deadline <= now:
            del _pending[name]
            count += unlink_path(path_of(name))
        elif not os.path.exists(os.path.join(shm.SHM_DIR, name)):
            del _pending[name]  # claimed
    _pool.trim(now)
    return count


def pending() -> list[str]:
    """Hand-over names this process gave out that are not known to be claimed yet."""
    with _lock:
        return [n for n in _pending if os.path.exists(os.path.join(shm.SHM_DIR, n))]


@atexit.register
def release_all() -> None:
    """Unlink this process's unclaimed hand-overs and pooled segments (also run at exit)."""
    with _lock:
        if _owner != os.getpid():
            return
        for name in list(_pending):
            unlink_path(os.path.join(shm.SHM_DIR, name))
        _pending.clear()
        _pool.clear()


def _forget_after_fork() -> None:
    """A forked child starts with no hand-overs and no pool: those are its parent's to release."""
    global _lock, _owner, _pool
    _lock = threading.Lock()
    _owner = os.getpid()
    _pending.clear()
    _pool = _Pool()


_owner = os.getpid()
os.register_at_fork(after_in_child=_forget_after_fork)


# --- the receiver's side -----------------------------------------------------------------------


class ClaimError(Exception):
    """A hand-over could not be claimed; ``missing`` when its name no longer exists."""

    def __init__(self, reason: str, *, missing: bool = False) -> None:
        super().__init__(reason)
        self.missing = missing


def claim(name: str) -> memoryview:
    """Take a hand-over: map the segment read-only and unlink its name; returns the whole mapping.

    The mapping (and with it the lock that tells a pooling sender the pages are in use) lives as
    long as the returned view or anything made from it.
    """
    if not shm.valid_name(name):
        raise ClaimError(f"{name!r} is not a shared-memory segment name")
    path = os.path.join(shm.SHM_DIR, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise ClaimError(f"shared-memory segment {name} does not exist (its sender exited or it expired unclaimed)",
                         missing=True) from None
    except OSError as exc:
        raise ClaimError(f"cannot open shared-memory segment {name}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            raise ClaimError(f"{name} is not a shared-memory segment of this user")
        fcntl.flock(fd, fcntl.LOCK_SH)
        if not unlink_path(path):
            raise ClaimError(f"shared-memory segment {name} expired before it was claimed", missing=True)
        size = os.fstat(fd).st_size
        if size == 0:
            raise ClaimError(f"shared-memory segment {name} is empty")
        m = map_file(fd, size, False)
    except OSError as exc:
        raise ClaimError(f"cannot claim shared-memory segment {name}: {exc}") from None
    finally:
        os.close(fd)  # the mapping holds a duplicate, and with it the shared lock
    return memoryview(m)
