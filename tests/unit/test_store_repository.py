"""The store's disk layer on real files: blobs, index, repository (crash sweep, lock), snapshots, keys."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from protocols.errors import ErrorCode, MicrokernelError
from services.store.blobs import BLOCK_SIZE, BlobCorrupted, BlobStore
from services.store.keys import check_key, check_meta
from services.store.repository import Repository, StoreLocked


def put(repo: Repository, key: str, data: bytes, meta: str = "{}"):
    return repo.commit(repo.blobs.stage([data]), key=key, kind="bytes", meta_json=meta)


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.fixture
def repo(tmp_path: Path):
    r = Repository(tmp_path / "root")
    yield r
    r.close()


def test_versions_count_up_and_identical_content_is_stored_once(repo: Repository) -> None:
    a1 = put(repo, "m/a", b"same")
    a2 = put(repo, "m/a", b"other", '{"n": 2}')
    b1 = put(repo, "m/b", b"same")
    assert (a1.version, a2.version, b1.version) == (1, 2, 1)
    assert a1.digest == b1.digest == hashlib.sha256(b"same").hexdigest()
    assert sorted(repo.blobs.stored()) == sorted({a1.digest, a2.digest})
    assert repo.index.lookup("m/a").version == 2 and repo.index.lookup("m/a").meta == {"n": 2}
    assert repo.index.lookup("m/a", 1).digest == a1.digest
    assert repo.index.list("m/") == [{"key": "m/a", "latest": 2, "versions": [1, 2], "size": 5},
                                     {"key": "m/b", "latest": 1, "versions": [1], "size": 4}]
    assert repo.index.list("m/b") == [{"key": "m/b", "latest": 1, "versions": [1], "size": 4}]
    assert repo.index.list("x") == []


def test_delete_collects_unreferenced_blobs_and_never_reuses_versions(repo: Repository) -> None:
    a1 = put(repo, "a", b"shared")
    put(repo, "b", b"shared")
    a2 = put(repo, "a", b"only-a")
    assert repo.delete("a", None) == 2
    assert repo.blobs.path_of(a1.digest).exists()  # still referenced by b
    assert not repo.blobs.path_of(a2.digest).exists()
    assert put(repo, "a", b"again").version == 3
    with pytest.raises(MicrokernelError) as err:
        repo.delete("a", 1)
    assert err.value.code is ErrorCode.NOT_FOUND and "has no version 1 (versions: 3)" in err.value.reason
    with pytest.raises(MicrokernelError, match="'nope' does not exist"):
        repo.index.lookup("nope")
    assert repo.delete("b", 1) == 1
    assert not repo.blobs.path_of(a1.digest).exists()


def test_reads_check_every_block_they_return(repo: Repository) -> None:
    data = os.urandom(2 * BLOCK_SIZE + 100)
    rec = put(repo, "big", data)
    assert repo.blobs.read(rec.digest, rec.size, rec.blocks).tobytes() == data
    assert bytes(repo.blobs.read_range(rec.digest, rec.size, rec.blocks, BLOCK_SIZE - 5, 10)) == data[BLOCK_SIZE - 5:BLOCK_SIZE + 5]
    assert bytes(repo.blobs.read_range(rec.digest, rec.size, rec.blocks, 2 * BLOCK_SIZE, 100)) == data[-100:]
    flip_byte(repo.blobs.path_of(rec.digest), BLOCK_SIZE + 7)
    with pytest.raises(BlobCorrupted, match="block 1 "):
        repo.blobs.read(rec.digest, rec.size, rec.blocks)
    with pytest.raises(BlobCorrupted, match="block 1 "):
        repo.blobs.read_range(rec.digest, rec.size, rec.blocks, BLOCK_SIZE - 5, 10)
    # Blocks the damage does not touch still read.
    assert bytes(repo.blobs.read_range(rec.digest, rec.size, rec.blocks, 0, 10)) == data[:10]
    os.truncate(repo.blobs.path_of(rec.digest), 5)
    with pytest.raises(BlobCorrupted, match="index says"):
        repo.blobs.read(rec.digest, rec.size, rec.blocks)


def test_reopening_sweeps_crash_leftovers(tmp_path: Path) -> None:
    repo = Repository(tmp_path / "root")
    kept = put(repo, "k", b"kept")
    blobs = repo.blobs
    repo.close()
    # A crash mid-write leaves a temp file; a crash between blob rename and index commit an orphan blob.
    (blobs.tmp_dir / "put-deadbeef").write_bytes(b"partial")
    orphan = blobs.stage([b"never indexed"])
    blobs.install(orphan)
    (tmp_path / "root" / "gen-000099").mkdir()  # a restore that never switched
    repo = Repository(tmp_path / "root")
    try:
        assert (repo.sweep.temp_files, repo.sweep.orphan_blobs, repo.sweep.stale_generations) == (1, 1, 1)
        assert list(repo.blobs.stored()) == [kept.digest]
        assert repo.index.lookup("k").digest == kept.digest
    finally:
        repo.close()


def test_a_root_is_used_by_one_process_at_a_time(repo: Repository) -> None:
    with pytest.raises(StoreLocked, match="in use"):
        Repository(repo.root)


def test_snapshot_and_restore_round_trip(repo: Repository, tmp_path: Path) -> None:
    put(repo, "a", b"one")
    put(repo, "a", b"two")
    put(repo, "b", b"three")
    manifest = repo.snapshot(tmp_path / "snap")
    assert (manifest["keys"], manifest["objects"], manifest["blobs"]) == (2, 3, 3)
    repo.delete("a", None)
    put(repo, "c", b"later")
    old_generation = repo.generation
    repo.restore(tmp_path / "snap")
    assert [e["key"] for e in repo.index.list()] == ["a", "b"]
    a1 = repo.index.lookup("a", 1)
    assert repo.blobs.read(a1.digest, a1.size, a1.blocks).tobytes() == b"one"
    assert not (repo.root / old_generation).exists()
    assert put(repo, "a", b"four").version == 3
    # Into a brand-new root as well.
    fresh = Repository(tmp_path / "fresh")
    try:
        fresh.restore(tmp_path / "snap")
        assert [e["key"] for e in fresh.index.list()] == ["a", "b"]
    finally:
        fresh.close()


def test_restore_of_a_corrupted_snapshot_leaves_the_store_unchanged(repo: Repository, tmp_path: Path) -> None:
    rec = put(repo, "a", b"payload")
    repo.snapshot(tmp_path / "snap")
    put(repo, "b", b"after")
    flip_byte(BlobStore(tmp_path / "snap", create=False).path_of(rec.digest), 0)
    generation = repo.generation
    with pytest.raises(BlobCorrupted):
        repo.restore(tmp_path / "snap")
    assert repo.generation == generation and [e["key"] for e in repo.index.list()] == ["a", "b"]
    assert sorted(p.name for p in repo.root.iterdir() if p.name.startswith("gen-")) == [generation]
    with pytest.raises(MicrokernelError, match="not a complete store snapshot"):
        repo.restore(tmp_path / "nowhere")


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "..", "a//b", "a/", "sp ace", "é", "a" * 513, "a\\b", 7])
def test_bad_keys_are_invalid_fields(key: object) -> None:
    with pytest.raises(MicrokernelError) as err:
        check_key(key)
    assert err.value.code is ErrorCode.INVALID_FIELD


def test_good_keys_and_meta() -> None:
    for key in ("models/charformer/3", "checkpoints/job-1/step-200", "a.b_c-D", "x" * 512):
        assert check_key(key) == key
    assert check_meta(None, "k") == "{}"
    with pytest.raises(MicrokernelError, match="JSON-like"):
        check_meta({"x": {1, 2}}, "k")
