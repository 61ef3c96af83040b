"""Content-addressed blob files: ``blobs/<first two hex digits>/<sha256>``, written atomically.

A blob is first written to ``tmp/`` (hashed as it is written), fsynced, then renamed to its digest's
path and the directory fsynced: a reader sees a whole blob or none. Identical content has one path,
so it is stored once. Besides the sha256 (its name, checked when a blob is copied into a snapshot
or a restored store) each blob has a CRC32 per 1 MiB block: reads check the blocks they return
(see ``integrity.py``, which also says when a recently verified blob is not checked again).

Reads copy a blob into a buffer the caller allocates (a shared-memory segment, for a large blob
going to a peer on this host): mapped and copied with ``memcpy`` above ``MAP_MIN`` bytes (a
``pread`` costs ~1.5x more per byte); checked on up to ``READ_THREADS`` threads, each checking
the blocks it just copied while they are in its cache. The store never truncates or rewrites a
blob file; one truncated by someone else *while* it is mapped for a read ends the store process
(SIGBUS).

Everything here blocks (disk, hashing): callers run it in a thread, never on the event loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import mmap
import os
import re
import secrets
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.store.integrity import BLOCK_SIZE, DEFAULT_TTL_S, FileState, VerifiedBlobs, first_bad_block

_PIECE = 4 << 20  # read/hash granularity: large enough for throughput, small enough to stay in cache
_UNIT = 4 * BLOCK_SIZE  # what one read thread copies and checks at a time
MAP_MIN = 1 << 20
READ_THREADS = min(2, os.cpu_count() or 1)
_DIGEST = re.compile(r"[0-9a-f]{64}")
_helpers: ThreadPoolExecutor | None = None
_helpers_lock = threading.Lock()

Allocate = Callable[[int], np.ndarray]  # nbytes -> a writable, C-contiguous uint8 array of that size


class BlobCorrupted(Exception):
    """A blob failed its integrity check (or is missing); nothing of it may be returned."""

    def __init__(self, digest: str, reason: str) -> None:
        self.digest = digest
        self.reason = reason
        super().__init__(f"blob {digest[:16]}…: {reason}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Staged:
    """A fully written, fsynced temp file and what it holds; :meth:`BlobStore.install` publishes it."""

    path: Path
    digest: str
    size: int
    blocks: bytes  # little-endian uint32 CRC32 of each BLOCK_SIZE block


class Digester:
    """The sha256 of a byte stream and the CRC32 of each of its blocks, fed in pieces of any size."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self._crcs: list[int] = []
        self._crc = 0
        self._in_block = 0
        self.size = 0

    def update(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        self._sha.update(view)
        self.size += len(view)
        while len(view):
            take = min(BLOCK_SIZE - self._in_block, len(view))
            self._crc = zlib.crc32(view[:take], self._crc)
            self._in_block += take
            view = view[take:]
            if self._in_block == BLOCK_SIZE:
                self._crcs.append(self._crc)
                self._crc, self._in_block = 0, 0

    def finish(self) -> tuple[str, bytes]:
        """``(sha256 hex digest, packed block CRCs)``."""
        crcs = self._crcs + ([self._crc] if self._in_block else [])
        return self._sha.hexdigest(), np.asarray(crcs, dtype="<u4").tobytes()


class TempBlob:
    """A temp file in ``tmp/`` written front to back and hashed on the way."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._digester = Digester()

    @property
    def size(self) -> int:
        """Bytes written so far."""
        return self._digester.size

    def write(self, data: Any) -> None:
        """Append ``data`` (any buffer)."""
        view = memoryview(data).cast("B")
        self._digester.update(view)
        while len(view):
            view = view[os.write(self._fd, view):]

    def finish(self) -> Staged:
        """fsync and close; the content is durable under the temp name."""
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        digest, blocks = self._digester.finish()
        return Staged(path=self.path, digest=digest, size=self._digester.size, blocks=blocks)

    def discard(self) -> None:
        """Close and delete the temp file (an aborted write)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    """The blob files under one directory (``blobs/`` and ``tmp/``)."""

    def __init__(self, directory: Path, *, create: bool = True, reverify_after: float = DEFAULT_TTL_S) -> None:
        self.blobs_dir = directory / "blobs"
        self.tmp_dir = directory / "tmp"
        self.verified = VerifiedBlobs(reverify_after)
        if create:  # a snapshot being restored from is only read
            for d in (self.blobs_dir, self.tmp_dir):
                d.mkdir(mode=0o700, parents=True, exist_ok=True)

    def path_of(self, digest: str) -> Path:
        """Where the blob named ``digest`` lives."""
        return self.blobs_dir / digest[:2] / digest

    def temp(self, tag: str = "put") -> TempBlob:
        """A new temp file for a blob being written."""
        return TempBlob(self.tmp_dir / f"{tag}-{secrets.token_hex(8)}")

    def stage(self, buffers: Iterable[Any]) -> Staged:
        """Write ``buffers`` (in order) to a durable temp file."""
        temp = self.temp()
        try:
            for buf in buffers:
                temp.write(buf)
            return temp.finish()
        except BaseException:
            temp.discard()
            raise

    def install(self, staged: Staged) -> None:
        """Publish a staged blob under its digest (atomically); drop it if the content is already stored."""
        target = self.path_of(staged.digest)
        if target.exists() and target.stat().st_size == staged.size:
            os.unlink(staged.path)  # identical content is stored once
            return
        if not target.parent.exists():
            target.parent.mkdir(mode=0o700, exist_ok=True)
            fsync_dir(self.blobs_dir)
        os.rename(staged.path, target)
        fsync_dir(target.parent)

    def remove(self, digest: str) -> None:
        """Delete a blob file (the index no longer references it)."""
        path = self.path_of(digest)
        self.verified.forget(digest)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            fsync_dir(path.parent)

    def read(self, digest: str, size: int, blocks: bytes, allocate: Allocate | None = None) -> np.ndarray:
        """The whole blob as one uint8 array from ``allocate(size)`` (default ``np.empty``), every block
        checked unless the blob is trusted (see ``integrity.py``); raises :class:`BlobCorrupted`."""
        out = (allocate or _empty)(size)
        self._read_blocks(digest, size, blocks, 0, out, whole=True)
        return out

    def read_range(self, digest: str, size: int, blocks: bytes, offset: int, length: int,
                   allocate: Allocate | None = None) -> memoryview:
        """Bytes ``[offset, offset + length)`` of a blob, each block they touch checked unless the
        blob is trusted; the view is of a buffer from ``allocate`` holding those whole blocks."""
        if length == 0:
            return memoryview(b"")
        first, last = offset // BLOCK_SIZE, (offset + length - 1) // BLOCK_SIZE
        start, end = first * BLOCK_SIZE, min((last + 1) * BLOCK_SIZE, size)
        out = (allocate or _empty)(end - start)
        self._read_blocks(digest, size, blocks, first, out, whole=False)
        return memoryview(out)[offset - start:offset - start + length]

    def _read_blocks(self, digest: str, size: int, blocks: bytes, first: int, out: np.ndarray, *, whole: bool) -> None:
        """Fill ``out`` with the blob from block ``first`` on, checking the blocks unless trusted.

        A trusted read whose file changed while it ran is checked after all (in ``out``, so
        the check covers exactly what is returned); a whole checked read is remembered.
        """
        crcs = np.frombuffer(blocks, dtype="<u4")
        if len(crcs) != -(-size // BLOCK_SIZE):
            raise BlobCorrupted(digest, f"the index holds {len(crcs)} block checksums for {size} bytes")
        started = time.time_ns()
        with self._open(digest, size) as (f, before):
            trusted = self.verified.trusted(digest, before)
            bad = _copy(f.fileno(), first * BLOCK_SIZE, out, None if trusted else crcs, first)
            after = FileState.of(os.fstat(f.fileno()))
        if bad is None and trusted and after != before:
            bad = first_bad_block(out, crcs, first)
        if bad is not None:
            raise BlobCorrupted(digest, f"block {bad} (bytes {bad * BLOCK_SIZE}..) fails its CRC32 check")
        if whole and not trusted:
            self.verified.remember(digest, before, after, started)

    def export(self, digest: str, size: int, into: BlobStore) -> None:
        """Copy a blob into another blob store (a snapshot, a restored generation), verifying its sha256."""
        temp = into.temp("copy")
        try:
            with self._open(digest, size) as (f, _):
                while chunk := f.read(_PIECE):
                    temp.write(chunk)
            staged = temp.finish()
        except BaseException:
            temp.discard()
            raise
        if staged.digest != digest or staged.size != size:
            os.unlink(staged.path)
            raise BlobCorrupted(digest, "content does not match its sha256 digest")
        into.install(staged)

    @contextlib.contextmanager
    def _open(self, digest: str, size: int) -> Iterator[Any]:
        try:
            f = open(self.path_of(digest), "rb", buffering=0)
        except FileNotFoundError:
            raise BlobCorrupted(digest, "blob file is missing") from None
        with f:
            state = FileState.of(os.fstat(f.fileno()))
            if state.size != size:
                raise BlobCorrupted(digest, f"file holds {state.size} bytes, the index says {size}")
            yield f, state

    def stored(self) -> Iterator[str]:
        """The digests of every blob file present (for the start-up sweep and snapshots)."""
        for sub in self.blobs_dir.iterdir():
            if sub.is_dir():
                for entry in os.scandir(sub):
                    if _DIGEST.fullmatch(entry.name):
                        yield entry.name

    def sweep(self, referenced: set[str]) -> tuple[int, int]:
        """Remove crash leftovers: every temp file and every blob the index does not reference.

        Returns ``(temp files removed, orphan blobs removed)``.
        """
        temps = 0
        for entry in os.scandir(self.tmp_dir):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                temps += 1
        orphans = [d for d in self.stored() if d not in referenced]
        for digest in orphans:
            self.remove(digest)
        if temps:
            fsync_dir(self.tmp_dir)
        return temps, len(orphans)


def _empty(nbytes: int) -> np.ndarray:
    return np.empty(nbytes, dtype=np.uint8)


def _copy(fd: int, start: int, out: np.ndarray, crcs: np.ndarray | None, first: int) -> int | None:
    """Copy ``len(out)`` bytes of file ``fd`` from ``start`` (a block boundary) into ``out``, checking
    each block against ``crcs`` when given; returns the first bad block (or None).

    Unchecked, a mapped file is copied in one piece: ``memcpy`` of many MiB streams past the
    caches (non-temporal stores), ~1.6x faster than in cache-sized pieces, and one thread runs
    at memory speed already (a second one only waits when the machine is busy). Checked,
    threads take ``_UNIT``s in file order (the kernel's read-ahead sees one sequential reader) and
    check each unit right after copying it, while it is in their cache. A truncated file reads as
    a bad block.
    """
    total = len(out)
    source: mmap.mmap | None = None
    if total >= MAP_MIN:
        with contextlib.suppress(OSError):  # a file system that cannot map files: pread then
            source = mmap.mmap(fd, total, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, offset=start)
    unit = total if crcs is None and source is not None else _UNIT
    units = -(-total // unit)
    try:
        src = None if source is None else np.frombuffer(source, dtype=np.uint8)
        taken = itertools.count()
        bad: list[int] = []

        def work() -> None:
            while not bad and (u := next(taken)) < units:
                lo, hi = u * unit, min((u + 1) * unit, total)
                if src is not None:
                    np.copyto(out[lo:hi], src[lo:hi])
                elif not _pread_into(fd, memoryview(out)[lo:hi], start + lo):
                    bad.append(first + lo // BLOCK_SIZE)
                    return
                if crcs is not None:
                    b = first_bad_block(out[lo:hi], crcs, first + lo // BLOCK_SIZE)
                    if b is not None:
                        bad.append(b)

        helpers = [_helper_pool().submit(work) for _ in range(min(READ_THREADS, units) - 1)]
        try:
            work()
        finally:
            for h in helpers:
                h.result()
        return min(bad) if bad else None
    finally:
        src = None  # the array over the mapping must be gone before it is closed
        if source is not None:
            source.close()


def _pread_into(fd: int, view: memoryview, offset: int) -> bool:
    """Fill ``view`` from ``offset``; False if the file ends first."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if not n:
            return False
        done += n
    return True


def _helper_pool() -> ThreadPoolExecutor:
    global _helpers
    with _helpers_lock:
        if _helpers is None:
            _helpers = ThreadPoolExecutor(max_workers=max(1, READ_THREADS - 1), thread_name_prefix="store-read")
        return _helpers
