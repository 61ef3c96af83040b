"""The store's pool of read segments: reused only when no array, hand-over or receiver uses them."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest

from protocols import handover, shm
from services.store.segments import SegmentPool

pytestmark = pytest.mark.skipif(not shm.available(), reason="needs POSIX shared memory")
MIB = 1 << 20


@pytest.fixture
def pool() -> Iterator[SegmentPool]:
    p = SegmentPool(capacity=64 * MIB)
    yield p
    p.clear()


def path_of(arr: np.ndarray) -> str:
    mapping = shm.mapping_of(arr)
    assert mapping is not None and mapping.path is not None
    return mapping.path


def test_a_buffer_lives_in_a_segment_reused_once_released(pool: SegmentPool) -> None:
    a = pool.buffer(3 * MIB)
    assert a.dtype == np.uint8 and a.nbytes == 3 * MIB and a.flags.writeable
    first = path_of(a)
    view = a[MIB:].view(np.float32)  # any view keeps the segment busy
    del a
    b = pool.buffer(3 * MIB)
    assert path_of(b) != first
    del view
    c = pool.buffer(2 * MIB)  # not much smaller: fits the released segment
    assert path_of(c) == first
    assert len(pool) == 2 and pool.pooled_bytes == 6 * MIB
    del b, c
    d = pool.buffer(MIB // 2)  # far smaller: a segment of its own (a receiver maps a whole segment)
    assert path_of(d) != first and len(pool) == 3


def test_a_segment_handed_over_is_busy_until_its_receiver_lets_go(pool: SegmentPool) -> None:
    a = pool.buffer(2 * MIB)
    a[:] = 7
    first = path_of(a)
    name, offset = handover.export(a, {})
    del a
    assert path_of(pool.buffer(2 * MIB)) != first  # the hand-over name is not claimed yet
    received = handover.claim(name)  # the receiver: its mapping holds a shared lock
    assert received[offset] == 7
    assert path_of(pool.buffer(2 * MIB)) != first
    del received
    assert path_of(pool.buffer(2 * MIB)) == first


def test_capacity_idle_release_and_clear(pool: SegmentPool) -> None:
    big = pool.buffer(100 * MIB)  # beyond the capacity: a segment of its own, not pooled
    assert len(pool) == 0 and shm.mapping_of(big) is not None
    big_path = path_of(big)
    del big
    assert not os.path.exists(big_path)  # unlinked with its last array
    a = pool.buffer(4 * MIB)
    kept = path_of(a)
    pool.idle_s = 0.0
    assert pool.trim() == 0  # in use
    del a
    assert pool.trim() == 1 and len(pool) == 0 and not os.path.exists(kept)
    b = pool.buffer(4 * MIB)
    b_path = path_of(b)
    pool.clear()
    assert not os.path.exists(b_path) and len(pool) == 0
    b[:] = 1  # the mapping stays valid while arrays of it live
    assert pool.buffer(0).nbytes == 0
