"""The store's durable state under its root directory: lock, generations, commit, delete, restore.

Layout::

    <root>/LOCK                  flock'ed by the one store process using the root
    <root>/CURRENT               the name of the live generation, replaced atomically
    <root>/gen-000001/           index.sqlite3 (+ WAL), blobs/, tmp/

A restore builds a whole new generation next to the live one and switches ``CURRENT`` with one
rename, so a crash leaves either the old or the new store, never a mix. On open, every other
generation (a crashed restore, a replaced store) is removed, then the live one is swept of temp
files and of blobs its index does not reference.

A ``Repository`` is not thread-safe: the store calls it from its one index thread. Blob reads
(which do not touch the index) run on other threads against ``blobs``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocols.errors import ErrorCode, MicrokernelError
from services.store.blobs import BlobStore, Staged, fsync_dir
from services.store.index import Index, Record
from services.store.integrity import DEFAULT_TTL_S
from services.store.snapshot import INDEX_FILE, load_snapshot, write_snapshot

_GENERATION = re.compile(r"gen-(\d{6,})")
CURRENT = "CURRENT"


class StoreLocked(Exception):
    """Another process holds the store root."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Sweep:
    """What opening the store cleaned up."""

    temp_files: int
    orphan_blobs: int
    stale_generations: int


class Repository:
    """The live generation's index and blobs, behind the root's lock."""

    def __init__(self, root: Path, *, reverify_after: float = DEFAULT_TTL_S) -> None:
        """``reverify_after``: seconds a fully verified blob is trusted while its file is unchanged
        (0: check every read; see ``integrity.py``)."""
        self.root = root
        self.reverify_after = reverify_after
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock_fd = os.open(root / "LOCK", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise StoreLocked(f"store root {root} is in use by another process") from None
        generation = self._read_current() or self._switch_to(self._new_generation_name())
        stale = self._remove_other_generations(generation)
        self._open(generation)
        temps, orphans = self.blobs.sweep(self.index.referenced())
        self.sweep = Sweep(temp_files=temps, orphan_blobs=orphans, stale_generations=stale)

    # -- generations -----------------------------------------------------------------------------

    def _read_current(self) -> str | None:
        try:
            name = (self.root / CURRENT).read_text().strip()
        except FileNotFoundError:
            return None
        if not _GENERATION.fullmatch(name) or not (self.root / name).is_dir():
            raise MicrokernelError(ErrorCode.CORRUPTED, f"store root {self.root}: {CURRENT} names {name!r}, which is not a generation directory")
        return name

    def _generations(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if _GENERATION.fullmatch(p.name))

    def _new_generation_name(self) -> str:
        numbers = [int(_GENERATION.fullmatch(g).group(1)) for g in self._generations()]  # type: ignore[union-attr]
        return f"gen-{max(numbers, default=0) + 1:06d}"

    def _switch_to(self, generation: str) -> str:
        """Make ``generation`` the live one (creating it if needed) with one atomic rename."""
        (self.root / generation).mkdir(mode=0o700, exist_ok=True)
        tmp = self.root / (CURRENT + ".tmp")
        with open(tmp, "w") as f:
            f.write(generation + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, self.root / CURRENT)
        fsync_dir(self.root)
        return generation

    def _remove_other_generations(self, keep: str) -> int:
        others = [g for g in self._generations() if g != keep]
        for g in others:
            shutil.rmtree(self.root / g, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.root / (CURRENT + ".tmp"))
        return len(others)

    def _open(self, generation: str) -> None:
        self.generation = generation
        self.blobs = BlobStore(self.root / generation, reverify_after=self.reverify_after)
        self.index = Index(self.root / generation / INDEX_FILE)

    # -- changes ---------------------------------------------------------------------------------

    def commit(self, staged: Staged, *, key: str, kind: str, meta_json: str) -> Record:
        """Publish a staged blob and record it as the next version of ``key``; durable on return."""
        self.blobs.install(staged)
        try:
            return self.index.add(key=key, digest=staged.digest, size=staged.size, blocks=staged.blocks,
                                  kind=kind, meta_json=meta_json)
        except BaseException:
            if self.index.owner_of(staged.digest) is None:
                self.blobs.remove(staged.digest)
            raise

    def delete(self, key: str, version: int | None) -> int:
        """Delete a version (or every version) of ``key``; blobs nobody references any more go too."""
        count, unreferenced = self.index.delete(key, version)
        for digest in unreferenced:
            self.blobs.remove(digest)
        return count

    def snapshot(self, directory: Path) -> dict[str, Any]:
        """Write a consistent snapshot of the live generation to ``directory``."""
        return write_snapshot(self.index, self.blobs, directory)

    def restore(self, directory: Path) -> dict[str, Any]:
        """Replace the whole store by the snapshot in ``directory``; returns its manifest."""
        old = self.generation
        new = self._new_generation_name()
        manifest = load_snapshot(directory, self.root / new)
        self.index.close()
        try:
            self._switch_to(new)
        except BaseException:
            self._open(old)
            shutil.rmtree(self.root / new, ignore_errors=True)
            raise
        self._open(new)
        shutil.rmtree(self.root / old, ignore_errors=True)
        return manifest

    def close(self) -> None:
        """Close the index and release the root."""
        self.index.close()
        os.close(self._lock_fd)
