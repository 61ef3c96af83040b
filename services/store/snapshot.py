"""Snapshots of a store: a directory holding a consistent copy of the index and its blobs.

Layout of a snapshot directory::

    index.sqlite3          the index, copied with SQLite's online backup API
    blobs/ab/<sha256>      every blob the index references, each verified while copied
    MANIFEST.json          written last: its presence marks a complete snapshot

A snapshot is taken on the store's index thread, so no write lands between the index copy and
the blob copies (writes wait meanwhile; reads go on). Restoring builds a new store generation
from a snapshot, verifying every blob again, and only then switches to it
(see ``repository.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from protocols.errors import ErrorCode, MicrokernelError
from services.store.blobs import BlobStore, fsync_dir
from services.store.index import Index

FORMAT = "microkernel-store-snapshot/1"
MANIFEST = "MANIFEST.json"
INDEX_FILE = "index.sqlite3"


def write_snapshot(index: Index, blobs: BlobStore, directory: Path) -> dict[str, Any]:
    """Copy the store (``index`` + ``blobs``) into ``directory`` (new or empty); returns the manifest.

    Raises ``blobs.BlobCorrupted`` when a blob fails its check (the snapshot is left incomplete:
    no manifest).
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    index.backup(directory / INDEX_FILE)
    target = BlobStore(directory)
    for digest, size in index.blobs():
        blobs.export(digest, size, target)
    shutil.rmtree(target.tmp_dir, ignore_errors=True)
    manifest = {"format": FORMAT, "created_ns": time.time_ns(), **index.counts()}
    _write_json(directory / MANIFEST, manifest)
    fsync_dir(directory)
    return manifest


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of the snapshot in ``directory``; ``not_found``/``invalid_field`` if it is not one."""
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise MicrokernelError(ErrorCode.NOT_FOUND, f"{directory} is not a complete store snapshot (no {MANIFEST})") from None
    except (OSError, ValueError) as exc:
        raise MicrokernelError(ErrorCode.INVALID_FIELD, f"{path} is unreadable: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise MicrokernelError(ErrorCode.INVALID_FIELD, f"{path} is not a {FORMAT} manifest")
    return manifest


def load_snapshot(directory: Path, target: Path) -> dict[str, Any]:
    """Build a store generation in ``target`` (must not exist) from the snapshot in ``directory``.

    Every blob is verified while copied; returns the manifest. On failure ``target`` is removed.
    """
    manifest = read_manifest(directory)
    target.mkdir(mode=0o700)
    try:
        shutil.copyfile(directory / INDEX_FILE, target / INDEX_FILE)
        with open(target / INDEX_FILE, "rb") as f:
            os.fsync(f.fileno())
        index = Index(target / INDEX_FILE)
        try:
            source, dest = BlobStore(directory, create=False), BlobStore(target)
            for digest, size in index.blobs():
                source.export(digest, size, dest)
        finally:
            index.close()
        fsync_dir(target)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return manifest


def _write_json(path: Path, data: dict[str, Any]) -> None:
    # temp + fsync + rename: the file is whole or absent.
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
