"""Content-addressed blob files: ``blobs/<first two hex digits>/<sha256>``, written atomically.

A blob is first written to ``tmp/`` (hashed as it is written), fsynced, then renamed to its digest's
path and the directory fsynced: a reader sees a whole blob or none. Identical content has one path,
so it is stored once. Besides the sha256 (the name, checked on every whole read) each blob has a
CRC32 per 1 MiB block, so a ranged read checks just the blocks it touches.

Everything here blocks (disk, hashing): callers run it in a thread, never on the event loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

BLOCK_SIZE = 1 << 20
_PIECE = 4 << 20  # read/hash granularity: large enough for throughput, small enough to stay in cache
_DIGEST = re.compile(r"[0-9a-f]{64}")


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

    def __init__(self, directory: Path, *, create: bool = True) -> None:
        self.blobs_dir = directory / "blobs"
        self.tmp_dir = directory / "tmp"
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
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            fsync_dir(path.parent)

    def read(self, digest: str, size: int) -> np.ndarray:
        """The whole blob as one uint8 array, its sha256 verified; raises :class:`BlobCorrupted`."""
        out = np.empty(size, dtype=np.uint8)
        view = memoryview(out)
        sha = hashlib.sha256()
        with self._open(digest, size) as f:
            done = 0
            while done < size:
                n = f.readinto(view[done:done + _PIECE])
                if not n:
                    raise BlobCorrupted(digest, f"file is truncated at {done} of {size} bytes")
                sha.update(view[done:done + n])
                done += n
        if sha.hexdigest() != digest:
            raise BlobCorrupted(digest, "content does not match its sha256 digest")
        return out

    def read_range(self, digest: str, size: int, blocks: bytes, offset: int, length: int) -> memoryview:
        """Bytes ``[offset, offset + length)`` of a blob, each block they touch CRC-checked."""
        if length == 0:
            return memoryview(b"")
        crcs = np.frombuffer(blocks, dtype="<u4")
        first, last = offset // BLOCK_SIZE, (offset + length - 1) // BLOCK_SIZE
        start, end = first * BLOCK_SIZE, min((last + 1) * BLOCK_SIZE, size)
        out = np.empty(end - start, dtype=np.uint8)
        view = memoryview(out)
        with self._open(digest, size) as f:
            f.seek(start)
            done = 0
            while done < len(out):
                n = f.readinto(view[done:])
                if not n:
                    raise BlobCorrupted(digest, f"file is truncated at {start + done} of {size} bytes")
                done += n
        for i in range(first, last + 1):
            lo = (i - first) * BLOCK_SIZE
            if i >= len(crcs) or zlib.crc32(view[lo:lo + BLOCK_SIZE]) != int(crcs[i]):
                raise BlobCorrupted(digest, f"block {i} (bytes {i * BLOCK_SIZE}..) fails its CRC32 check")
        return view[offset - start:offset - start + length]

    def export(self, digest: str, size: int, into: BlobStore) -> None:
        """Copy a blob into another blob store (a snapshot, a restored generation), verifying its sha256."""
        temp = into.temp("copy")
        try:
            with self._open(digest, size) as f:
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
            actual = os.fstat(f.fileno()).st_size
            if actual != size:
                raise BlobCorrupted(digest, f"file holds {actual} bytes, the index says {size}")
            yield f

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
