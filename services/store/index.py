"""The store's metadata: an SQLite database in WAL mode with ``synchronous=FULL``.

Tables: ``blobs`` (digest, size, block CRCs), ``objects`` (key, version -> digest, kind, meta) and
``keys`` (the last version ever given to a key, so versions are never reused after a delete).
Every change is one transaction; with ``synchronous=FULL`` a committed transaction is on disk
when ``commit`` returns (WAL fsynced), which is what lets the store acknowledge a write.

An ``Index`` is not thread-safe: the store uses it from its one index thread only.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocols.errors import ErrorCode, MicrokernelError

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
    digest TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    blocks BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS keys (
    key TEXT PRIMARY KEY,
    last_version INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS objects (
    key TEXT NOT NULL,
    version INTEGER NOT NULL,
    digest TEXT NOT NULL REFERENCES blobs(digest),
    kind TEXT NOT NULL,
    meta TEXT NOT NULL,
    created_ns INTEGER NOT NULL,
    PRIMARY KEY (key, version)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS objects_by_digest ON objects(digest);
"""
# Keys use ASCII below 0x7f only, so every key starting with p sorts in [p, p + "\x7f").
_PREFIX_END = "\x7f"


@dataclass(frozen=True, slots=True, kw_only=True)
class Record:
    """One stored version of a key."""

    key: str
    version: int
    digest: str
    size: int
    kind: str  # "bytes" or "tensors"
    meta: dict[str, Any]
    created_ns: int
    blocks: bytes

    def describe(self) -> dict[str, Any]:
        """The reply fields every RPC about a version shares."""
        return {"key": self.key, "version": self.version, "digest": self.digest, "size": self.size,
                "kind": self.kind, "meta": self.meta}


def not_found(reason: str) -> MicrokernelError:
    """A ``not_found`` error with ``reason``."""
    return MicrokernelError(ErrorCode.NOT_FOUND, reason)


class Index:
    """The metadata database of one store generation."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE ... COMMIT) below.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        # Every statement is idempotent: a crash while creating the schema is repaired on the next open.
        self._db.executescript(_SCHEMA)
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        """Close the connection (checkpoints the WAL)."""
        self._db.close()

    # -- writes ----------------------------------------------------------------------------------

    def add(self, *, key: str, digest: str, size: int, blocks: bytes, kind: str, meta_json: str) -> Record:
        """Record a new version of ``key`` pointing at blob ``digest``; durable on return."""
        now = time.time_ns()
        with self._transaction() as db:
            db.execute("INSERT OR IGNORE INTO blobs (digest, size, blocks) VALUES (?, ?, ?)", (digest, size, blocks))
            row = db.execute("SELECT last_version FROM keys WHERE key = ?", (key,)).fetchone()
            version = 1 if row is None else row[0] + 1
            db.execute("INSERT OR REPLACE INTO keys (key, last_version) VALUES (?, ?)", (key, version))
            db.execute("INSERT INTO objects (key, version, digest, kind, meta, created_ns) VALUES (?, ?, ?, ?, ?, ?)",
                       (key, version, digest, kind, meta_json, now))
        return Record(key=key, version=version, digest=digest, size=size, kind=kind, meta=json.loads(meta_json),
                      created_ns=now, blocks=blocks)

    def delete(self, key: str, version: int | None) -> tuple[int, list[str]]:
        """Delete one version (or all of ``key``); returns ``(count, digests no longer referenced)``.

        The unreferenced blobs leave the index in the same transaction; the caller unlinks their
        files after it (a crash in between leaves orphan files, which the start-up sweep removes).
        """
        with self._transaction() as db:
            if version is None:
                rows = db.execute("SELECT DISTINCT digest FROM objects WHERE key = ?", (key,)).fetchall()
                count = db.execute("DELETE FROM objects WHERE key = ?", (key,)).rowcount
                if not count:
                    raise not_found(f"store key {key!r} does not exist")
            else:
                rows = db.execute("SELECT digest FROM objects WHERE key = ? AND version = ?", (key, version)).fetchall()
                count = db.execute("DELETE FROM objects WHERE key = ? AND version = ?", (key, version)).rowcount
                if not count:
                    raise not_found(self._missing_version(key, version))
            unreferenced = []
            for (digest,) in rows:
                if db.execute("SELECT 1 FROM objects WHERE digest = ? LIMIT 1", (digest,)).fetchone() is None:
                    db.execute("DELETE FROM blobs WHERE digest = ?", (digest,))
                    unreferenced.append(digest)
        return count, unreferenced

    # -- reads -----------------------------------------------------------------------------------

    def lookup(self, key: str, version: int | None = None) -> Record:
        """The record of ``key`` at ``version`` (latest when None); raises ``not_found``."""
        sql = ("SELECT o.version, o.digest, b.size, o.kind, o.meta, o.created_ns, b.blocks "
               "FROM objects o JOIN blobs b ON b.digest = o.digest WHERE o.key = ?")
        if version is None:
            row = self._db.execute(sql + " ORDER BY o.version DESC LIMIT 1", (key,)).fetchone()
        else:
            row = self._db.execute(sql + " AND o.version = ?", (key, version)).fetchone()
        if row is None:
            raise not_found(f"store key {key!r} does not exist" if version is None else self._missing_version(key, version))
        v, digest, size, kind, meta, created_ns, blocks = row
        return Record(key=key, version=v, digest=digest, size=size, kind=kind, meta=json.loads(meta),
                      created_ns=created_ns, blocks=blocks)

    def versions(self, key: str) -> list[int]:
        """The live versions of ``key``, ascending."""
        return [v for (v,) in self._db.execute("SELECT version FROM objects WHERE key = ? ORDER BY version", (key,))]

    def _missing_version(self, key: str, version: int) -> str:
        versions = self.versions(key)
        if not versions:
            return f"store key {key!r} does not exist"
        return f"store key {key!r} has no version {version} (versions: {', '.join(map(str, versions))})"

    def list(self, prefix: str = "") -> list[dict[str, Any]]:
        """One entry per key starting with ``prefix``: ``{key, latest, versions, size}`` (size of the latest)."""
        rows = self._db.execute(
            "SELECT o.key, o.version, b.size FROM objects o JOIN blobs b ON b.digest = o.digest "
            "WHERE o.key >= ? AND o.key < ? ORDER BY o.key, o.version", (prefix, prefix + _PREFIX_END))
        out: list[dict[str, Any]] = []
        for key, version, size in rows:
            if out and out[-1]["key"] == key:
                entry = out[-1]
                entry["versions"].append(version)
                entry["latest"], entry["size"] = version, size
            else:
                out.append({"key": key, "latest": version, "versions": [version], "size": size})
        return out

    def referenced(self) -> set[str]:
        """Every digest the index knows (the blobs to keep)."""
        return {d for (d,) in self._db.execute("SELECT digest FROM blobs")}

    def blobs(self) -> list[tuple[str, int]]:
        """``(digest, size)`` of every blob."""
        return list(self._db.execute("SELECT digest, size FROM blobs ORDER BY digest"))

    def owner_of(self, digest: str) -> tuple[str, int] | None:
        """One ``(key, version)`` that references ``digest`` (to name it in errors)."""
        row = self._db.execute("SELECT key, version FROM objects WHERE digest = ? LIMIT 1", (digest,)).fetchone()
        return None if row is None else (row[0], row[1])

    def counts(self) -> dict[str, int]:
        """``{keys, objects, blobs, bytes}``."""
        keys, objects = self._db.execute("SELECT COUNT(DISTINCT key), COUNT(*) FROM objects").fetchone()
        blobs, size = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM blobs").fetchone()
        return {"keys": keys, "objects": objects, "blobs": blobs, "bytes": size}

    def backup(self, target: Path) -> None:
        """A consistent copy of the database at ``target`` (SQLite's online backup API)."""
        dest = sqlite3.connect(target)
        try:
            self._db.backup(dest)
        finally:
            dest.close()
