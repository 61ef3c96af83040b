"""The inferencer's batcher, driven by a fake clock and a fake compute (no torch, no daemon)."""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from protocols.errors import ErrorCode, MicrokernelError
from services.inferencer.batcher import BatchPolicy, Batcher


def in_loop(test: Callable[[], Awaitable[None]]) -> Callable[[], None]:
    """Run an async test in a fresh event loop (the suite has no asyncio plugin)."""

    @functools.wraps(test)
    def run() -> None:
        asyncio.run(test())  # type: ignore[arg-type]

    return run


class FakeTimer:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """Time moves only when the test calls ``advance``; due callbacks then run in time order."""

    def __init__(self) -> None:
        self.t = 100.0
        self._timers: list[tuple[float, int, FakeTimer, Callable[[], None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self.t

    def call_at(self, when: float, callback: Callable[[], None]) -> FakeTimer:
        timer = FakeTimer()
        heapq.heappush(self._timers, (when, next(self._seq), timer, callback))
        return timer

    def advance(self, seconds: float) -> None:
        target = self.t + seconds
        while self._timers and self._timers[0][0] <= target:
            when, _, timer, callback = heapq.heappop(self._timers)
            self.t = max(self.t, when)
            if not timer.cancelled:
                callback()
        self.t = target


class FakeCompute:
    """Records each batch; a batch finishes when the test releases it (or at once if ``auto``)."""

    def __init__(self, *, auto: bool = True, fail: Exception | None = None) -> None:
        self.batches: list[list[Any]] = []
        self.auto = auto
        self.fail = fail
        self.gates: list[asyncio.Event] = []

    async def __call__(self, inputs: list[Any]) -> list[Any]:
        self.batches.append(list(inputs))
        if not self.auto:
            gate = asyncio.Event()
            self.gates.append(gate)
            await gate.wait()
        if self.fail is not None:
            raise self.fail
        return [x * 10 for x in inputs]

    def release(self) -> None:
        self.gates.pop(0).set()


async def settle() -> None:
    """Let every ready task and callback run (yields to the loop; no time passes)."""
    for _ in range(20):
        await asyncio.sleep(0)


def make(policy: BatchPolicy, compute: FakeCompute) -> tuple[Batcher[int, int], FakeClock]:
    clock = FakeClock()
    return Batcher(compute, policy, clock=clock), clock


@in_loop
async def test_a_full_batch_leaves_at_once_without_waiting_for_the_delay() -> None:
    compute = FakeCompute()
    batcher, clock = make(BatchPolicy(max_batch_size=4, max_queue_delay_ms=50), compute)
    tasks = [asyncio.create_task(batcher.submit(i)) for i in range(4)]
    await settle()
    assert compute.batches == [[0, 1, 2, 3]]
    assert await asyncio.gather(*tasks) == [0, 10, 20, 30]
    assert clock.now() == 100.0  # no time passed


@in_loop
async def test_a_partial_batch_waits_for_the_delay_counted_from_the_first_arrival() -> None:
    compute = FakeCompute()
    batcher, clock = make(BatchPolicy(max_batch_size=8, max_queue_delay_ms=10), compute)
    first = asyncio.create_task(batcher.submit(1))
    await settle()
    clock.advance(0.006)
    second = asyncio.create_task(batcher.submit(2))  # arrives 6 ms after the first
    await settle()
    clock.advance(0.0039)
    await settle()
    assert compute.batches == []  # 9.9 ms after the first arrival: still waiting
    clock.advance(0.0001)
    await settle()
    # 10 ms after the FIRST arrival (only 4 ms after the second one) the batch leaves.
    assert compute.batches == [[1, 2]]
    assert await asyncio.gather(first, second) == [10, 20]
    stats = batcher.stats()
    assert stats["batch_sizes"] == {"2": 1}
    assert stats["queue_ms"]["p99"] == pytest.approx(10.0)


@in_loop
async def test_requests_queued_behind_a_running_batch_go_out_together_when_it_ends() -> None:
    compute = FakeCompute(auto=False)
    batcher, clock = make(BatchPolicy(max_batch_size=3, max_queue_delay_ms=1), compute)
    tasks = [asyncio.create_task(batcher.submit(i)) for i in range(3)]
    await settle()
    assert compute.batches == [[0, 1, 2]]
    tasks += [asyncio.create_task(batcher.submit(i)) for i in range(3, 8)]
    await settle()
    clock.advance(0.5)  # long past the delay, but one batch computes at a time
    await settle()
    assert len(compute.batches) == 1 and batcher.depth == 5
    compute.release()
    await settle()
    assert compute.batches[1] == [3, 4, 5]  # due at once: the oldest waited past the delay
    compute.release()
    await settle()
    assert compute.batches[2] == [6, 7]
    compute.release()
    assert await asyncio.gather(*tasks) == [i * 10 for i in range(8)]
    assert batcher.stats()["batch_sizes"] == {"2": 1, "3": 2}


@in_loop
async def test_a_full_queue_refuses_at_once_with_overloaded() -> None:
    compute = FakeCompute(auto=False)
    batcher, clock = make(BatchPolicy(max_batch_size=2, max_queue_delay_ms=1, max_queue=3), compute)
    running = [asyncio.create_task(batcher.submit(i)) for i in range(2)]
    await settle()
    queued = [asyncio.create_task(batcher.submit(i)) for i in range(2, 5)]
    await settle()
    assert batcher.depth == 3
    with pytest.raises(MicrokernelError) as info:
        await batcher.submit(99)
    assert info.value.code == ErrorCode.OVERLOADED and "max_queue=3" in info.value.reason
    assert batcher.stats()["overloaded"] == 1
    clock.advance(0.01)
    for _ in range(3):
        compute.release()
        await settle()
    assert await asyncio.gather(*running, *queued) == [0, 10, 20, 30, 40]


@in_loop
async def test_an_expired_request_is_answered_at_its_deadline_and_never_computed() -> None:
    compute = FakeCompute(auto=False)
    batcher, clock = make(BatchPolicy(max_batch_size=1, max_queue_delay_ms=0), compute)
    busy = asyncio.create_task(batcher.submit(1))
    await settle()
    late = asyncio.create_task(batcher.submit(2, deadline=clock.now() + 0.020))
    patient = asyncio.create_task(batcher.submit(3, deadline=clock.now() + 10.0))
    await settle()
    clock.advance(0.021)
    await settle()
    assert late.done()  # answered at its deadline, while the first batch still computes
    with pytest.raises(MicrokernelError) as info:
        late.result()
    assert info.value.code == ErrorCode.DEADLINE_EXCEEDED
    compute.release()
    await settle()
    compute.release()
    assert await asyncio.gather(busy, patient) == [10, 30]
    assert compute.batches == [[1], [3]]  # 2 was never computed
    assert batcher.stats()["deadline_exceeded"] == 1
    assert batcher.depth == 0


@in_loop
async def test_a_deadline_already_past_is_refused_on_arrival() -> None:
    batcher, clock = make(BatchPolicy(), FakeCompute())
    with pytest.raises(MicrokernelError) as info:
        await batcher.submit(1, deadline=clock.now())
    assert info.value.code == ErrorCode.DEADLINE_EXCEEDED


@in_loop
async def test_a_compute_error_answers_every_request_of_the_batch_and_serving_goes_on() -> None:
    compute = FakeCompute(fail=ValueError("bad input"))
    batcher, _ = make(BatchPolicy(max_batch_size=3, max_queue_delay_ms=1), compute)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, ValueError) and str(r) == "bad input" for r in results)
    compute.fail = None
    assert await asyncio.gather(*(batcher.submit(i) for i in range(3))) == [0, 10, 20]
    assert batcher.stats()["errors"] == 3 and batcher.stats()["computed"] == 3


@in_loop
async def test_a_wrong_number_of_results_is_an_error_for_the_whole_batch() -> None:
    async def short(inputs: list[int]) -> list[int]:
        return inputs[:-1]

    batcher, _ = make(BatchPolicy(max_batch_size=2, max_queue_delay_ms=1), FakeCompute())
    batcher.compute = short
    results = await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)
    assert all(isinstance(r, MicrokernelError) and r.code == ErrorCode.INTERNAL for r in results)


@in_loop
async def test_a_cancelled_caller_leaves_the_queue_and_is_not_computed() -> None:
    compute = FakeCompute(auto=False)
    batcher, clock = make(BatchPolicy(max_batch_size=4, max_queue_delay_ms=5), compute)
    busy = asyncio.create_task(batcher.submit(0))
    await settle()
    clock.advance(0.01)
    await settle()
    gone = asyncio.create_task(batcher.submit(1))
    kept = asyncio.create_task(batcher.submit(2))
    await settle()
    gone.cancel()
    await settle()
    assert batcher.depth == 1
    compute.release()
    await settle()
    clock.advance(0.005)  # the remaining request's delay
    await settle()
    compute.release()
    assert await asyncio.gather(busy, kept) == [0, 20]
    assert compute.batches == [[0], [2]]


@in_loop
async def test_close_answers_queued_requests_shutting_down_and_refuses_new_ones() -> None:
    compute = FakeCompute(auto=False)
    batcher, _ = make(BatchPolicy(max_batch_size=1, max_queue_delay_ms=0), compute)
    running = asyncio.create_task(batcher.submit(1))
    await settle()
    queued = asyncio.create_task(batcher.submit(2))
    await settle()
    closing = asyncio.create_task(batcher.close())
    await settle()
    compute.release()
    await closing
    assert await running == 10
    with pytest.raises(MicrokernelError) as info:
        await queued
    assert info.value.code == ErrorCode.SHUTTING_DOWN
    with pytest.raises(MicrokernelError) as info:
        await batcher.submit(3)
    assert info.value.code == ErrorCode.SHUTTING_DOWN


@in_loop
async def test_real_loop_clock_batches_concurrent_requests() -> None:
    seen: list[int] = []

    async def compute(inputs: list[int]) -> list[int]:
        seen.append(len(inputs))
        return [x + 1 for x in inputs]

    batcher: Batcher[int, int] = Batcher(compute, BatchPolicy(max_batch_size=8, max_queue_delay_ms=1000))
    assert await asyncio.gather(*(batcher.submit(i) for i in range(16))) == list(range(1, 17))
    assert seen == [8, 8]  # size-triggered: nobody waited for the 1 s delay


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        BatchPolicy(max_batch_size=0)
    with pytest.raises(ValueError, match="max_queue_delay_ms"):
        BatchPolicy(max_queue_delay_ms=-1)
    with pytest.raises(MicrokernelError) as info:
        BatchPolicy.from_config({"max_queue": "lots"})
    assert info.value.code == ErrorCode.INVALID_FIELD
    assert BatchPolicy.from_config({}) == BatchPolicy(max_batch_size=16, max_queue_delay_ms=5.0, max_queue=256)


def test_the_batcher_does_not_need_torch() -> None:
    code = "import sys, services.inferencer.batcher; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
