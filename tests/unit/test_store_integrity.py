"""What a store read checks: block CRCs on real files, and when a verified blob is trusted without a check."""

from __future__ import annotations

import os
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from services.store import blobs as blobs_module
from services.store.blobs import BLOCK_SIZE, BlobCorrupted
from services.store.integrity import SETTLE_NS, FileState, VerifiedBlobs, first_bad_block
from services.store.repository import Repository


def state(ctime_ns: int, *, inode: int = 7, size: int = 10) -> FileState:
    return FileState(device=1, inode=inode, size=size, mtime_ns=ctime_ns, ctime_ns=ctime_ns)


def put(repo: Repository, key: str, data: bytes):
    return repo.commit(repo.blobs.stage([data]), key=key, kind="bytes", meta_json="{}")


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def wait_until_settled(path: Path) -> None:
    """Let the file's ctime become older than SETTLE_NS (the condition for trusting a check)."""
    remaining = os.stat(path).st_ctime_ns + SETTLE_NS - time.time_ns()
    if remaining > 0:
        threading.Event().wait(remaining / 1e9 + 0.02)


@pytest.fixture
def repo(tmp_path: Path):
    r = Repository(tmp_path / "root", reverify_after=60.0)
    yield r
    r.close()


def test_a_state_is_trusted_only_if_it_held_and_had_settled() -> None:
    verified = VerifiedBlobs(ttl=60.0)
    now = time.time_ns()
    settled, fresh = state(now - 2 * SETTLE_NS), state(now - SETTLE_NS // 2)
    assert not verified.remember("d", fresh, fresh, now)  # changed within the last second: not trusted
    assert not verified.remember("d", settled, state(now), now)  # changed during the read
    assert not verified.trusted("d", settled)
    assert verified.remember("d", settled, settled, now)
    assert verified.trusted("d", settled)
    assert not verified.trusted("d", state(now - 2 * SETTLE_NS, inode=8))  # another file: forgotten
    assert not verified.trusted("d", settled)
    verified.remember("d", settled, settled, now)
    verified.forget("d")
    assert not verified.trusted("d", settled)


def test_trust_is_bounded_in_time_and_count() -> None:
    settled = state(time.time_ns() - 2 * SETTLE_NS)
    verified = VerifiedBlobs(ttl=0.0)
    assert not verified.remember("d", settled, settled, time.time_ns())  # ttl 0: every read is checked
    verified = VerifiedBlobs(ttl=1e-9)
    verified.remember("d", settled, settled, time.time_ns())
    assert not verified.trusted("d", settled)  # expired
    verified = VerifiedBlobs(ttl=60.0, limit=2)
    for digest in "abc":
        verified.remember(digest, settled, settled, time.time_ns())
    assert len(verified) == 2 and not verified.trusted("a", settled) and verified.trusted("c", settled)


def test_first_bad_block_names_the_damaged_block() -> None:
    data = np.frombuffer(os.urandom(3 * BLOCK_SIZE + 5), dtype=np.uint8).copy()
    crcs = np.array([zlib.crc32(data[i:i + BLOCK_SIZE]) for i in range(0, len(data), BLOCK_SIZE)], dtype="<u4")
    assert first_bad_block(data, crcs, 0) is None
    assert first_bad_block(data[2 * BLOCK_SIZE:], crcs, 2) is None
    data[2 * BLOCK_SIZE + 9] ^= 1
    assert first_bad_block(data, crcs, 0) == 2
    assert first_bad_block(data[:2 * BLOCK_SIZE], crcs, 0) is None


@pytest.mark.parametrize("threads", [1, 2])
def test_large_and_small_reads_check_every_block_into_the_callers_buffer(repo: Repository, threads: int,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blobs_module, "READ_THREADS", threads)
    data = os.urandom(9 * BLOCK_SIZE + 123)  # mapped and copied in units
    rec = put(repo, "big", data)
    given: list[np.ndarray] = []

    def allocate(n: int) -> np.ndarray:
        given.append(np.empty(n, dtype=np.uint8))
        return given[-1]

    out = repo.blobs.read(rec.digest, rec.size, rec.blocks, allocate)
    assert out is given[0] and out.tobytes() == data
    view = repo.blobs.read_range(rec.digest, rec.size, rec.blocks, 3 * BLOCK_SIZE + 1, 4 * BLOCK_SIZE, allocate)
    assert bytes(view) == data[3 * BLOCK_SIZE + 1:7 * BLOCK_SIZE + 1] and len(given[1]) == 5 * BLOCK_SIZE
    flip_byte(repo.blobs.path_of(rec.digest), 7 * BLOCK_SIZE + 3)
    with pytest.raises(BlobCorrupted, match="block 7 "):
        repo.blobs.read(rec.digest, rec.size, rec.blocks)
    assert bytes(repo.blobs.read_range(rec.digest, rec.size, rec.blocks, 0, 100)) == data[:100]
    small = put(repo, "small", b"tiny payload")  # below the mapping threshold: pread
    flip_byte(repo.blobs.path_of(small.digest), 3)
    with pytest.raises(BlobCorrupted, match="block 0 "):
        repo.blobs.read(small.digest, small.size, small.blocks)
    empty = put(repo, "empty", b"")
    assert repo.blobs.read(empty.digest, empty.size, empty.blocks).nbytes == 0


def test_a_verified_blob_is_trusted_until_its_file_changes(repo: Repository) -> None:
    data = os.urandom(2 * BLOCK_SIZE + 7)
    rec = put(repo, "hot", data)
    path = repo.blobs.path_of(rec.digest)
    repo.blobs.read(rec.digest, rec.size, rec.blocks)
    assert len(repo.blobs.verified) == 0  # just written: its ctime has not settled
    wait_until_settled(path)
    assert repo.blobs.read(rec.digest, rec.size, rec.blocks).tobytes() == data
    assert len(repo.blobs.verified) == 1  # checked in full, in a settled state
    assert repo.blobs.read(rec.digest, rec.size, rec.blocks).tobytes() == data  # trusted
    # A ranged read never makes a blob trusted, but a trusted blob's ranges are not checked again.
    assert bytes(repo.blobs.read_range(rec.digest, rec.size, rec.blocks, BLOCK_SIZE, 10)) == data[BLOCK_SIZE:BLOCK_SIZE + 10]
    flip_byte(path, BLOCK_SIZE + 1)  # moves the ctime: the trust is gone
    with pytest.raises(BlobCorrupted, match="block 1 "):
        repo.blobs.read(rec.digest, rec.size, rec.blocks)
    with pytest.raises(BlobCorrupted, match="block 1 "):
        repo.blobs.read_range(rec.digest, rec.size, rec.blocks, BLOCK_SIZE, 10)
    assert len(repo.blobs.verified) == 0


def test_deleting_a_blob_forgets_its_verification(repo: Repository) -> None:
    rec = put(repo, "gone", os.urandom(1000))
    wait_until_settled(repo.blobs.path_of(rec.digest))
    repo.blobs.read(rec.digest, rec.size, rec.blocks)
    assert len(repo.blobs.verified) == 1
    repo.delete("gone", None)
    assert len(repo.blobs.verified) == 0
    with pytest.raises(BlobCorrupted, match="missing"):
        repo.blobs.read(rec.digest, rec.size, rec.blocks)


def test_a_store_with_reverify_after_zero_checks_every_read(tmp_path: Path) -> None:
    repo = Repository(tmp_path / "root", reverify_after=0)
    try:
        rec = put(repo, "k", os.urandom(5000))
        wait_until_settled(repo.blobs.path_of(rec.digest))
        repo.blobs.read(rec.digest, rec.size, rec.blocks)
        assert len(repo.blobs.verified) == 0
    finally:
        repo.close()
