"""protocols.shm: segment lifecycle, hand-over and claim, pooling, expiry and sweeps (real /dev/shm)."""

from __future__ import annotations

import fcntl
import gc
import os
import subprocess
import sys

import numpy as np
import pytest

from protocols import handover, shm
from tests.segments import own_segments

pytestmark = [pytest.mark.skipif(not shm.available(), reason="needs /dev/shm"),
              pytest.mark.usefixtures("no_leftover_segments")]





def test_names_carry_kernel_and_owner(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MK_KERNEL_PID", "4242")
    name = shm.new_name("blk")
    assert name.startswith(f"mk.4242.{os.getpid()}.blk") and shm.valid_name(name)
    monkeypatch.delenv("MK_KERNEL_PID")
    assert shm.new_name().startswith(f"mk.0.{os.getpid()}.")
    with pytest.raises(ValueError):
        shm.new_name("a.b")
    for bad in ["../etc/passwd", "mk.1.2", "mk.1.2.x/y", "mk.a.2.x", "other", 7, None, "mk.1.2." + "x" * 200]:
        assert not shm.valid_name(bad)


def test_segment_lifecycle() -> None:
    seg = shm.Segment.create(10_000, tag="t")
    assert seg.size == 10_000 and os.path.exists(os.path.join(shm.SHM_DIR, seg.name))
    seg.buffer[:5] = b"hello"
    other = shm.Segment.attach(seg.name)
    view = other.buffer
    assert bytes(view[:5]) == b"hello" and view.readonly
    with pytest.raises(TypeError):
        view[0] = 1
    with pytest.raises(BufferError):
        other.close()  # a view is still exported
    view.release()
    other.close()
    seg.unlink()
    assert not os.path.exists(os.path.join(shm.SHM_DIR, seg.name))
    assert bytes(seg.buffer[:5]) == b"hello"  # the mapping outlives the name
    seg.close()
    with pytest.raises(ValueError):
        seg.buffer
    with pytest.raises(FileNotFoundError):
        shm.Segment.attach(seg.name)
    with pytest.raises(ValueError):
        shm.Segment.attach("../../etc/passwd")
    with pytest.raises(ValueError):
        shm.Segment.create(0)


def test_writable_attach_shares_pages() -> None:
    with shm.Segment.create(4096) as seg:
        with shm.Segment.attach(seg.name, writable=True) as peer:
            peer.buffer[0] = 7
        assert seg.buffer[0] == 7
        seg.unlink()


def test_claim_unlinks_and_maps_read_only() -> None:
    data = np.arange(1 << 16, dtype=np.int64)
    name, offset = handover.export(data, {})
    assert offset == 0 and name in handover.pending()
    view = handover.claim(name)
    assert not os.path.exists(os.path.join(shm.SHM_DIR, name)) and view.readonly
    assert np.array_equal(np.frombuffer(view[: data.nbytes], dtype=np.int64), data)
    assert name not in handover.pending()
    with pytest.raises(handover.ClaimError) as info:
        handover.claim(name)  # a name is claimed once
    assert info.value.missing
    with pytest.raises(handover.ClaimError) as info:
        handover.claim("not/a/segment")
    assert not info.value.missing


def test_pool_reuses_a_segment_only_once_its_receiver_let_go() -> None:
    data = np.ones(1 << 20, dtype=np.uint8)
    first, _ = handover.export(data, {})
    view = handover.claim(first)
    second, _ = handover.export(data, {})
    assert len(handover._pool.entries) == 2  # the first is mapped (locked) by its receiver
    handover.claim(second).release()
    del view
    gc.collect()
    third, _ = handover.export(data, {})
    assert len(handover._pool.entries) == 2  # reused
    handover.claim(third).release()


def test_unclaimed_hand_overs_keep_a_pooled_segment_busy_then_expire() -> None:
    data = np.ones(1 << 20, dtype=np.uint8)
    name, _ = handover.export(data, {})
    assert handover.expire() == 0 and name in handover.pending()
    assert handover.expire(now=float("inf")) == 1
    assert not os.path.exists(os.path.join(shm.SHM_DIR, name)) and not handover.pending()
    with pytest.raises(handover.ClaimError) as info:
        handover.claim(name)
    assert info.value.missing


def test_reclaim_unlinks_hand_overs_of_a_dropped_message() -> None:
    name, _ = handover.export(b"x" * 100_000, {})
    assert handover.reclaim([name]) == 1
    assert handover.reclaim([name]) == 0 and not handover.pending()


def test_a_full_pool_hands_over_one_shot_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handover._pool, "capacity", 1 << 16)
    name, _ = handover.export(np.zeros(1 << 20, dtype=np.uint8), {})
    assert ".x" in name and not handover._pool.entries
    view = handover.claim(name)
    assert view.nbytes == 1 << 20 and not any(view[:100])


def test_empty_arrays_are_handed_over_without_a_copy() -> None:
    arr = shm.empty((256, 256), "float32")
    arr[:] = 2.0
    links: dict[str, str] = {}
    name, offset = handover.export(arr, links)
    name2, offset2 = handover.export(arr[128:], links)  # same segment, same message: one link
    assert name2 == name and offset == 0 and offset2 == 128 * 256 * 4
    view = handover.claim(name)
    received = np.frombuffer(view, dtype=np.float32).reshape(256, 256)
    arr[0, 0] = 5.0  # the same pages (senders must treat a sent array as read-only)
    assert received[0, 0] == 5.0 and received[1].sum() == 512
    owner = [n for n in own_segments() if ".a" in n]
    assert len(owner) == 1
    del arr
    gc.collect()
    assert not [n for n in own_segments() if ".a" in n]  # the owner's name went with the array
    assert received[2, 2] == 2.0  # the receiver's mapping lives on
    assert shm.empty(0, "int8").size == 0


def test_a_receivers_lock_lasts_as_long_as_its_mapping() -> None:
    data = np.ones(1 << 20, dtype=np.uint8)
    name, _ = handover.export(data, {})
    m, fd = handover._pool.entries[-1]
    view = handover.claim(name)
    with pytest.raises(BlockingIOError):
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    arr = np.frombuffer(view, dtype=np.uint8)
    view.release()
    with pytest.raises(BlockingIOError):
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the array still holds the mapping
    del arr
    gc.collect()
    assert handover._is_free(m, fd)


def test_sweep_unlinks_a_dead_owners_segments(tmp_path) -> None:
    code = (
        "import os, sys; os.environ['MK_KERNEL_PID'] = '777'; from protocols import shm; "
        "s = shm.Segment.create(4096, tag='k'); print(s.name, flush=True); os._exit(0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))), timeout=60)
    name = out.stdout.strip()
    owner = int(name.split(".")[2])
    assert os.path.exists(os.path.join(shm.SHM_DIR, name))
    assert shm.sweep(kernel_pid=777, owner_pid=owner + 1) == 0
    assert shm.sweep(kernel_pid=778) == 0
    assert shm.sweep(kernel_pid=777, owner_pid=owner) == 1
    assert not os.path.exists(os.path.join(shm.SHM_DIR, name))


def test_sweep_orphans_spares_the_living() -> None:
    seg = shm.Segment.create(4096)
    shm.sweep_orphans()
    assert os.path.exists(os.path.join(shm.SHM_DIR, seg.name))
    seg.unlink()
    seg.close()


def test_threshold_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MK_SHM_THRESHOLD", raising=False)
    assert shm.threshold_from_env() == shm.DEFAULT_THRESHOLD
    monkeypatch.setenv("MK_SHM_THRESHOLD", "1048576")
    assert shm.threshold_from_env() == 1 << 20
    monkeypatch.setenv("MK_SHM_THRESHOLD", "off")
    assert shm.threshold_from_env() is None
