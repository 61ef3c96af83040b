"""Device leases: placement, release, the fair waiting queue, and the service ``gpu`` spec.

Broker tests run on uvloop like the daemon. The stateful test drives the broker on a stdlib event loop
whose clock is a plain number the test advances, so lease timeouts fire deterministically without any
wall-clock wait (uvloop reads its clock in C, so it cannot be driven that way).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Coroutine
from typing import Any

import msgpack
import pytest
import uvloop
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from microkernel.resources.gpu import Device, GpuConfigError
from microkernel.resources.broker import LeaseBroker
from microkernel.resources.leases import (
    GpuSpec,
    Lease,
    LeaseCancelled,
    LeaseImpossible,
    LeaseMode,
    LeaseRequest,
    LeaseTable,
    LeaseTimeout,
    parse_gpu_spec,
)
from protocols.errors import ErrorCode

GIB = 1024**3
EXCLUSIVE, SHARED = LeaseMode.EXCLUSIVE, LeaseMode.SHARED


def devices(*totals: int) -> list[Device]:
    return [
        Device(index=i, uuid=f"GPU-{i}", name="declared", memory_total=t, source="declared")
        for i, t in enumerate(totals)
    ]


def req(holder: str = "svc/0", *, count: int = 1, memory: int = 0, mode: LeaseMode = EXCLUSIVE,
        priority: int = 0, pid: int | None = None) -> LeaseRequest:  # fmt: skip
    return LeaseRequest(holder=holder, pid=pid, count=count, memory=memory, mode=mode, priority=priority)


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


async def until(condition: Callable[[], bool], *, turns: int = 1000) -> None:
    """Let the loop run until ``condition`` holds (a ceiling in loop turns, not a sleep)."""
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


# --- requests ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"holder": ""}, "holder"),
        ({"count": 0}, "count"),
        ({"memory": -1}, "memory"),
        ({"mode": SHARED, "memory": 0}, "shared lease needs a memory budget"),
        ({"mode": "both"}, "both"),
    ],
)
def test_invalid_requests_are_rejected(kwargs: dict[str, Any], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        LeaseRequest(**{"holder": "svc/0", **kwargs})


def test_request_mode_accepts_the_plain_string() -> None:
    assert LeaseRequest(holder="svc/0", mode="shared", memory=1).mode is SHARED  # type: ignore[arg-type]


# --- the table ----------------------------------------------------------------------------------------


def test_exclusive_takes_idle_devices_and_blocks_everything_else() -> None:
    table = LeaseTable(devices(16 * GIB, 16 * GIB))
    first = table.try_grant(req("a/0"))
    assert first is not None and first.devices == ("GPU-0",)
    assert first.budget(16 * GIB) == 16 * GIB
    assert table.try_grant(req("b/0", memory=GIB, mode=SHARED)) is not None  # goes to GPU-1
    assert table.try_grant(req("c/0")) is None  # GPU-1 has a shared lease, GPU-0 an exclusive one
    assert table.try_grant(req("c/0", memory=GIB, mode=SHARED)).devices == ("GPU-1",)  # type: ignore[union-attr]


def test_shared_packs_onto_the_fullest_device_that_still_fits() -> None:
    table = LeaseTable(devices(16 * GIB, 16 * GIB, 16 * GIB))
    assert table.try_grant(req("a/0", memory=10 * GIB, mode=SHARED)).devices == ("GPU-0",)  # type: ignore[union-attr]
    assert table.try_grant(req("b/0", memory=4 * GIB, mode=SHARED)).devices == ("GPU-0",)  # type: ignore[union-attr]
    # 2 GiB left on GPU-0: a 4 GiB request does not fit there and goes to the next device.
    assert table.try_grant(req("c/0", memory=4 * GIB, mode=SHARED)).devices == ("GPU-1",)  # type: ignore[union-attr]
    assert table.try_grant(req("d/0", memory=2 * GIB, mode=SHARED)).devices == ("GPU-0",)  # type: ignore[union-attr]
    usage = table.snapshot().devices
    assert [u.free for u in usage] == [0, 12 * GIB, 16 * GIB]


def test_exclusive_prefers_the_smallest_idle_devices() -> None:
    table = LeaseTable(devices(80 * GIB, 16 * GIB, 40 * GIB))
    assert table.try_grant(req("a/0")).devices == ("GPU-1",)  # type: ignore[union-attr]
    assert table.try_grant(req("b/0", memory=20 * GIB)).devices == ("GPU-2",)  # type: ignore[union-attr]


def test_multi_device_requests_are_all_or_nothing() -> None:
    table = LeaseTable(devices(16 * GIB, 16 * GIB))
    held = table.try_grant(req("a/0", memory=12 * GIB, mode=SHARED))
    assert held is not None
    before = table.snapshot()
    assert table.try_grant(req("b/0", count=2, memory=8 * GIB, mode=SHARED)) is None
    assert table.snapshot() == before
    pair = table.try_grant(req("b/0", count=2, memory=4 * GIB, mode=SHARED))
    assert pair is not None and pair.devices == ("GPU-0", "GPU-1")


@pytest.mark.parametrize(
    ("request_", "words"),
    [
        (req(count=3), "asks for 3 GPU"),
        (req(memory=17 * GIB, mode=SHARED), "largest: 16 GiB"),
        (req(count=2, memory=9 * GIB), "only 1 device"),
    ],
)
def test_impossible_requests_raise(request_: LeaseRequest, words: str) -> None:
    table = LeaseTable(devices(16 * GIB, 8 * GIB))
    with pytest.raises(LeaseImpossible, match=words) as caught:
        table.try_grant(request_)
    assert caught.value.code is ErrorCode.INVALID_FIELD


def test_release_by_id_holder_and_pid() -> None:
    table = LeaseTable(devices(16 * GIB, 16 * GIB))
    a = table.try_grant(req("a/0", memory=GIB, mode=SHARED, pid=10))
    b = table.try_grant(req("a/0", memory=GIB, mode=SHARED, pid=11))
    c = table.try_grant(req("b/0", memory=GIB, mode=SHARED, pid=10))
    assert a and b and c
    assert table.release(b.id) == b
    assert table.release(b.id) is None  # a release racing the exit is harmless
    assert table.release_pid(10) == [a, c]
    assert table.leases() == ()
    d = table.try_grant(req("a/0"))
    e = table.try_grant(req("a/0"))
    assert d and e
    assert table.release_holder("a/0") == [d, e]
    assert all(u.used == 0 and u.leases == () for u in table.snapshot().devices)


def test_a_static_lease_is_bound_to_its_process_after_spawn() -> None:
    table = LeaseTable(devices(16 * GIB))
    static = table.try_grant(req("svc/0", memory=8 * GIB, mode=SHARED))
    assert static is not None and static.pid is None
    bound = table.bind_pid(static.id, 4242)
    assert bound.pid == 4242 and table.get(static.id) == bound
    assert table.release_pid(4242) == [bound]


def test_snapshot_reports_usage_leases_and_holders() -> None:
    table = LeaseTable(devices(16 * GIB, 16 * GIB), clock_ns=lambda: 123)
    a = table.try_grant(req("a/0", memory=4 * GIB, mode=SHARED))
    b = table.try_grant(req("b/0"))
    c = table.try_grant(req("a/0", memory=2 * GIB, mode=SHARED))
    assert a and b and c
    snap = table.snapshot()
    assert [(u.device.uuid, u.used, u.free, u.exclusive) for u in snap.devices] == [
        ("GPU-0", 6 * GIB, 10 * GIB, False),
        ("GPU-1", 16 * GIB, 0, True),
    ]
    assert snap.devices[0].leases == (a.id, c.id)
    assert snap.holders == {"a/0": [a.id, c.id], "b/0": [b.id]}
    assert a.granted_at_ns == 123
    wire = snap.to_wire()
    msgpack.packb(wire)
    assert wire["devices"][0]["free"] == 10 * GIB
    assert wire["leases"][1]["mode"] == "exclusive"
    assert "10 GiB free" in table.free_summary() and "GPU-1: exclusive" in table.free_summary()


def test_duplicate_devices_are_refused() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        LeaseTable(devices(GIB) + devices(GIB))


# --- the broker ---------------------------------------------------------------------------------------


def test_acquire_grants_at_once_when_it_fits() -> None:
    async def main() -> None:
        broker = LeaseBroker(LeaseTable(devices(16 * GIB)))
        lease = await broker.acquire(req(), timeout=0)
        assert lease.devices == ("GPU-0",)
        assert broker.waiters() == ()

    run(main)


def test_a_waiter_is_granted_when_a_lease_is_released() -> None:
    async def main() -> None:
        broker = LeaseBroker(LeaseTable(devices(16 * GIB)))
        first = await broker.acquire(req("a/0"), timeout=None)
        waiting = asyncio.create_task(broker.acquire(req("b/0"), timeout=None))
        await until(lambda: len(broker.waiters()) == 1)
        assert broker.waiters()[0].request.holder == "b/0"
        msgpack.packb([w.to_wire() for w in broker.waiters()])
        assert broker.release(first.id) == first
        second = await waiting
        assert second.holder == "b/0"
        assert broker.waiters() == ()

    run(main)


def test_fifo_within_a_priority_and_higher_priority_first() -> None:
    async def main() -> None:
        broker = LeaseBroker(LeaseTable(devices(16 * GIB)))
        held = await broker.acquire(req("x/0"), timeout=None)
        order: list[str] = []

        async def take(holder: str, priority: int) -> None:
            lease = await broker.acquire(req(holder, priority=priority), timeout=None)
            order.append(holder)
            broker.release(lease.id)

        tasks: list[asyncio.Task[None]] = []
        for holder, priority in [("low-1", 0), ("low-2", 0), ("high", 5), ("low-3", 0), ("mid", 1)]:
            tasks.append(asyncio.create_task(take(holder, priority)))
            queued = len(tasks)
            await until(lambda: len(broker.waiters()) == queued)
        assert [w.request.holder for w in broker.waiters()] == ["high", "mid", "low-1", "low-2", "low-3"]
        assert [w.position for w in broker.waiters()] == [0, 1, 2, 3, 4]
        broker.release(held.id)
        await asyncio.gather(*tasks)
        assert order == ["high", "mid", "low-1", "low-2", "low-3"]

    run(main)


def test_no_overtaking_a_big_waiter_blocks_smaller_ones_behind_it() -> None:
    async def main() -> None:
        broker = LeaseBroker(LeaseTable(devices(16 * GIB, 16 * GIB)))
        small = await broker.acquire(req("a/0", memory=GIB, mode=SHARED), timeout=None)
        big = asyncio.create_task(broker.acquire(req("big/0", count=2), timeout=None))
        await until(lambda: len(broker.waiters()) == 1)
        # Fits right now on GPU-1, but would overtake the two-device request: it waits.
        behind = asyncio.create_task(broker.acquire(req("b/0", memory=GIB, mode=SHARED), timeout=None))
        await until(lambda: len(broker.waiters()) == 2)
        assert not behind.done()
        broker.release(small.id)
        got_big = await big
        assert got_big.devices == ("GPU-0", "GPU-1")
        assert not behind.done()
        broker.release(got_big.id)
        assert (await behind).holder == "b/0"

    run(main)


def test_a_more_important_newcomer_is_not_blocked_by_a_less_important_waiter() -> None:
    async def main() -> None:
        broker = LeaseBroker(LeaseTable(devices(16 * GIB, 16 * GIB)))
        await broker.acquire(req("a/0", memory=GIB, mode=SHARED), timeout=None)
        big = asyncio.create_task(broker.acquire(req("big/0", count=2, priority=0), timeout=None))
        await until(lambda: len(broker.waiters()) == 1)
        urgent = await broker.acquire(req("urgent/0", memory=GIB, mode=SHARED, priority=1), timeout=0)
        assert urgent.holder == "urgent/0"
        assert not big.done()
        big.cancel()
        with pytest.raises(asyncio.CancelledError):
            await big

    run(main)


def test_timeout_raises_a_clear_error_and_unblocks_the_queue() -> None:
    async def main() -> None:
        broker = LeaseBroker(LeaseTable(devices(16 * GIB, 16 * GIB)))
        await broker.acquire(req("a/0", memory=GIB, mode=SHARED), timeout=None)
        behind_started = asyncio.Event()

        async def behind() -> Lease:
            behind_started.set()
            return await broker.acquire(req("b/0", memory=GIB, mode=SHARED), timeout=None)

        # The tiny timeout is the behaviour under test.
        big = asyncio.create_task(broker.acquire(req("big/0", count=2), timeout=0.01))
        await until(lambda: len(broker.waiters()) == 1)
        other = asyncio.create_task(behind())
        await behind_started.wait()
        with pytest.raises(LeaseTimeout) as caught:
            await big
        error = caught.value
        assert error.code is ErrorCode.TIMEOUT
        assert "no GPU lease for big/0 within 10 ms" in error.reason
        assert "wanted 2 x whole device exclusive" in error.reason
        assert "0 request(s) ahead" in error.reason
        assert error.details["holder"] == "big/0"
        assert (await other).holder == "b/0"  # the timed-out head no longer blocks it
        assert broker.waiters() == ()

    run(main)


def test_timeout_zero_means_try_now() -> None:
    async def main() -> None:
        broker = LeaseBroker(LeaseTable(devices(16 * GIB)))
        await broker.acquire(req("a/0"), timeout=0)
        with pytest.raises(LeaseTimeout):
            await broker.acquire(req("b/0"), timeout=0)
        assert broker.waiters() == ()

    run(main)


def test_impossible_requests_fail_at_once_without_queueing() -> None:
    async def main() -> None:
        broker = LeaseBroker(LeaseTable(devices(16 * GIB)))
        with pytest.raises(LeaseImpossible):
            await broker.acquire(req(count=2), timeout=None)
        assert broker.waiters() == ()

    run(main)


def test_cancelling_a_waiter_removes_it_and_unblocks_the_rest() -> None:
    async def main() -> None:
        broker = LeaseBroker(LeaseTable(devices(16 * GIB, 16 * GIB)))
        await broker.acquire(req("a/0", memory=GIB, mode=SHARED), timeout=None)
        big = asyncio.create_task(broker.acquire(req("big/0", count=2), timeout=None))
        await until(lambda: len(broker.waiters()) == 1)
        small = asyncio.create_task(broker.acquire(req("b/0", memory=GIB, mode=SHARED), timeout=None))
        await until(lambda: len(broker.waiters()) == 2)
        big.cancel()
        assert (await small).holder == "b/0"
        assert big.cancelled()
        assert broker.waiters() == ()

    run(main)


def test_a_lease_granted_as_its_waiter_is_cancelled_is_given_back() -> None:
    async def main() -> None:
        broker = LeaseBroker(LeaseTable(devices(16 * GIB)))
        first = await broker.acquire(req("a/0"), timeout=None)
        waiting = asyncio.create_task(broker.acquire(req("b/0"), timeout=None))
        await until(lambda: len(broker.waiters()) == 1)
        broker.release(first.id)  # grants b/0 ...
        waiting.cancel()  # ... but its caller is cancelled before it could see the lease
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert broker.table.leases() == ()

    run(main)


def test_process_exit_releases_its_leases_and_drops_its_waiters() -> None:
    async def main() -> None:
        broker = LeaseBroker(LeaseTable(devices(16 * GIB)))
        mine = await broker.acquire(req("a/0", memory=8 * GIB, mode=SHARED, pid=100), timeout=None)
        other = await broker.acquire(req("b/0", memory=8 * GIB, mode=SHARED, pid=200), timeout=None)
        more = asyncio.create_task(broker.acquire(req("a/0", memory=8 * GIB, mode=SHARED, pid=100), timeout=None))
        third = asyncio.create_task(broker.acquire(req("c/0", memory=8 * GIB, mode=SHARED, pid=300), timeout=None))
        await until(lambda: len(broker.waiters()) == 2)
        assert broker.release_pid(100) == [mine]
        with pytest.raises(LeaseCancelled, match="process 100 exited") as caught:
            await more
        assert caught.value.code is ErrorCode.BAD_STATE
        assert (await third).holder == "c/0"
        assert {lease.holder for lease in broker.table.leases()} == {"b/0", "c/0"}
        assert broker.release_holder("b/0") == [other]

    run(main)


def test_cancel_all_fails_every_waiter() -> None:
    async def main() -> None:
        broker = LeaseBroker(LeaseTable(devices(16 * GIB)))
        await broker.acquire(req("a/0"), timeout=None)
        waiting = [asyncio.create_task(broker.acquire(req(f"w/{i}"), timeout=None)) for i in range(3)]
        await until(lambda: len(broker.waiters()) == 3)
        broker.cancel_all("kernel shutting down")
        for task in waiting:
            with pytest.raises(LeaseCancelled, match="kernel shutting down"):
                await task
        assert broker.waiters() == ()

    run(main)


# --- the service gpu spec ------------------------------------------------------------------------------


def test_gpu_spec_table_and_shorthand() -> None:
    assert parse_gpu_spec({"count": 1, "memory": "8GiB", "mode": "shared"}) == GpuSpec(
        count=1, memory=8 * GIB, mode=SHARED
    )
    assert parse_gpu_spec({}) == GpuSpec(count=1, memory=0, mode=EXCLUSIVE)
    assert parse_gpu_spec(2) == GpuSpec(count=2)
    assert parse_gpu_spec({"memory": "20GiB"}) == GpuSpec(memory=20 * GIB, mode=EXCLUSIVE)
    request = GpuSpec(count=2, memory=GIB, mode=SHARED).request("svc/1", priority=3)
    assert request == LeaseRequest(holder="svc/1", count=2, memory=GIB, mode=SHARED, priority=3)


@pytest.mark.parametrize(
    ("value", "path", "words"),
    [
        ("1", ("gpu",), "expected a table"),
        (True, ("gpu",), "expected a table"),
        ({"count": 1, "mem": "1GiB"}, ("gpu", "mem"), "unknown key"),
        ({"count": 0}, ("gpu", "count"), "integer >= 1"),
        ({"count": True}, ("gpu", "count"), "integer >= 1"),
        (0, ("gpu", "count"), "integer >= 1"),
        ({"mode": "shard", "memory": "1GiB"}, ("gpu", "mode"), "exclusive or shared"),
        ({"memory": "8gib"}, ("gpu", "memory"), "case-sensitive"),
        ({"mode": "shared"}, ("gpu", "memory"), "needs a memory budget"),
    ],
)
def test_gpu_spec_errors_name_the_sub_key(value: object, path: tuple[str, ...], words: str) -> None:
    with pytest.raises(GpuConfigError) as caught:
        parse_gpu_spec(value)
    assert caught.value.path == path
    assert words in str(caught.value)
    assert str(caught.value).startswith(".".join(path) + ": ")


# --- stateful: random acquire / release / crash / restart / timeout sequences -------------------------


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock only moves when the test says so."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def time(self) -> float:
        return self.now


MACHINE_DEVICES = devices(100, 100, 200)
HOLDERS = ("a/0", "a/1", "b/0", "c/0")


def possible(request: LeaseRequest) -> bool:
    return sum(1 for d in MACHINE_DEVICES if d.memory_total >= request.memory) >= request.count


async def settle() -> None:
    # Each grant needs a couple of loop turns to reach its task; a fixed ceiling keeps this finite.
    for _ in range(10):
        await asyncio.sleep(0)


class LeaseMachine(RuleBasedStateMachine):
    """Drive a broker with random operations; check the allocation invariants after each step."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = VirtualClockLoop()
        self.broker = LeaseBroker(LeaseTable(MACHINE_DEVICES, clock_ns=lambda: 0), clock_ns=lambda: 0)
        self.pids = itertools.count(1000)
        self.pid_of = {holder: next(self.pids) for holder in HOLDERS}
        self.pending: dict[asyncio.Task[Lease], tuple[LeaseRequest, float | None]] = {}
        self.held: dict[str, Lease] = {}
        self.cancelled_pids: set[int] = set()
        self.released_holders: set[str] = set()
        self.waited: set[asyncio.Task[Lease]] = set()

    @property
    def table(self) -> LeaseTable:
        return self.broker.table

    def step(self) -> None:
        """Let the loop run, then account for every finished waiter."""
        self.loop.run_until_complete(settle())
        for task in [t for t in self.pending if t.done()]:
            request, deadline = self.pending.pop(task)
            if task.cancelled():
                event("cancelled")
                continue
            error = task.exception()
            event(f"outcome {type(error).__name__ if error else 'granted'}, waited: {task in self.waited}")
            if error is None:
                lease = task.result()
                assert lease.holder == request.holder
                if self.table.get(lease.id) is not None:
                    self.held[lease.id] = lease
            elif isinstance(error, LeaseTimeout):
                assert deadline is not None and self.loop.now >= deadline
            elif isinstance(error, LeaseCancelled):
                assert request.pid in self.cancelled_pids or request.holder in self.released_holders
            elif isinstance(error, LeaseImpossible):
                assert not possible(request)
            else:
                raise error
        self.held = {i: lease for i, lease in self.held.items() if self.table.get(i) is not None}

    def start_acquire(self, request: LeaseRequest, timeout: float | None) -> None:
        task = self.loop.create_task(self.broker.acquire(request, timeout))
        self.pending[task] = (request, None if timeout is None else self.loop.now + timeout)
        self.step()
        if task in self.pending:
            self.waited.add(task)

    @rule(
        holder=st.sampled_from(HOLDERS),
        count=st.sampled_from([1, 1, 1, 2, 2, 3, 4]),
        shared=st.booleans(),
        memory=st.integers(1, 100) | st.integers(101, 210),
        whole=st.booleans(),
        priority=st.integers(0, 2),
        timeout=st.sampled_from([None, 0.0, 0.5, 1.0, 1.0, 3.0]),
    )
    def acquire(self, holder: str, count: int, shared: bool, memory: int, whole: bool, priority: int,
                timeout: float | None) -> None:  # fmt: skip
        mode = SHARED if shared else EXCLUSIVE
        memory = 0 if (whole and not shared) else memory
        self.start_acquire(req(holder, count=count, memory=memory, mode=mode, priority=priority,
                               pid=self.pid_of[holder]), timeout)  # fmt: skip

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        lease_id = data.draw(st.sampled_from(sorted(self.held)))
        assert self.broker.release(lease_id) == self.held.pop(lease_id)
        self.step()

    @rule(holder=st.sampled_from(HOLDERS))
    def crash(self, holder: str) -> None:
        """The holder's process exits, whatever the reason; a new one takes its place."""
        pid = self.pid_of[holder]
        self.cancelled_pids.add(pid)
        released = self.broker.release_pid(pid)
        assert all(lease.pid == pid for lease in released)
        self.pid_of[holder] = next(self.pids)
        self.step()

    @rule(holder=st.sampled_from(HOLDERS), memory=st.integers(1, 100))
    def restart(self, holder: str, memory: int) -> None:
        """Stop the replica (releasing its holder) and start it again with a static shared lease."""
        self.released_holders.add(holder)
        self.broker.release_holder(holder)
        self.step()
        self.released_holders.discard(holder)
        self.pid_of[holder] = next(self.pids)
        self.start_acquire(req(holder, memory=memory, mode=SHARED, pid=self.pid_of[holder]), 1.0)

    @precondition(lambda self: self.pending)
    @rule(dt=st.sampled_from([0.25, 0.5, 1.0, 2.0]))
    def advance(self, dt: float) -> None:
        self.loop.now += dt
        self.step()

    @precondition(lambda self: self.pending)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        task = data.draw(st.sampled_from(list(self.pending)))
        task.cancel()
        self.step()

    @invariant()
    def no_device_is_over_allocated(self) -> None:
        for device in MACHINE_DEVICES:
            on = [lease for lease in self.table.leases() if device.uuid in lease.devices]
            if any(lease.mode is EXCLUSIVE for lease in on):
                assert len(on) == 1, f"an exclusive lease shares {device.uuid}: {on}"
            else:
                assert sum(lease.memory for lease in on) <= device.memory_total

    @invariant()
    def every_lease_went_to_a_caller(self) -> None:
        # Nothing granted to a waiter that timed out or was cancelled stays allocated.
        assert set(self.held) == {lease.id for lease in self.table.leases()}

    @invariant()
    def waiters_are_exactly_the_pending_callers_and_none_is_overdue(self) -> None:
        assert len(self.broker.waiters()) == len(self.pending)
        for request, deadline in self.pending.values():
            assert possible(request)
            assert deadline is None or deadline > self.loop.now

    @invariant()
    def the_head_of_the_queue_does_not_fit(self) -> None:
        waiters = self.broker.waiters()
        if waiters:
            assert self.table.place(waiters[0].request) is None

    def teardown(self) -> None:
        try:
            # Liveness: once leases are given back, every waiter is granted in turn.
            while self.pending:
                for lease_id in list(self.held):
                    self.broker.release(lease_id)
                before = len(self.pending)
                self.step()
                assert len(self.pending) < before, "a waiter was never granted on an idle inventory"
        finally:
            for task in self.pending:
                task.cancel()
            self.loop.run_until_complete(settle())
            self.loop.close()


TestLeaseMachine = LeaseMachine.TestCase
TestLeaseMachine.settings = settings(
    max_examples=300, stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def test_granted_in_the_turn_the_timeout_fires_counts_as_granted() -> None:
    loop = VirtualClockLoop()
    try:
        broker = LeaseBroker(LeaseTable(devices(16 * GIB)))
        first = loop.run_until_complete(broker.acquire(req("a/0"), timeout=None))
        waiting = loop.create_task(broker.acquire(req("b/0"), timeout=1.0))
        loop.run_until_complete(settle())

        async def release() -> None:
            broker.release(first.id)

        # The release runs in the same loop turn as the (now due) timeout: the grant must win.
        loop.now = 1.0
        loop.run_until_complete(release())
        lease = loop.run_until_complete(waiting)
        assert lease.holder == "b/0"
        assert broker.table.get(lease.id) == lease
    finally:
        loop.close()
