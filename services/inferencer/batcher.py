"""Dynamic batching of single requests into model batches (pure asyncio, no torch).

A ``Batcher`` queues requests and hands them to one ``compute(inputs) -> outputs`` coroutine at a
time. A batch leaves the queue when ``max_batch_size`` live requests are waiting, or
``max_queue_delay_ms`` after the arrival of the OLDEST waiting request, whichever comes first; a
request that waited through a running batch is therefore sent with the next one at once. The queue
is bounded (``max_queue``): one more request is refused at once with ``overloaded``. A request whose
deadline passes while it waits is answered ``deadline_exceeded`` at its deadline and never computed.

Time comes from a ``Clock`` (``now`` + ``call_at``), so tests drive the batcher with a fake one.
Everything runs on the event loop; ``compute`` itself decides where the work runs (the inferencer
hands it to one worker thread).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from protocols.errors import ErrorCode, MicrokernelError
from services.inferencer.metrics import BatchMetrics

__all__ = ["BatchPolicy", "Batcher", "Clock", "LoopClock"]

In = TypeVar("In")
Out = TypeVar("Out")


class TimerHandle(Protocol):
    """What ``Clock.call_at`` returns (``asyncio.TimerHandle`` fits)."""

    def cancel(self) -> None: ...


class Clock(Protocol):
    """A monotonic time source in seconds that can run a callback at a given time."""

    def now(self) -> float: ...
    def call_at(self, when: float, callback: Callable[[], None]) -> TimerHandle: ...


class LoopClock:
    """``time.monotonic`` with timers on the running event loop.

    Not ``loop.time()``: uvloop's is libuv's millisecond clock, cached once per loop iteration,
    too coarse for queue-time and latency figures of a few milliseconds.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()

    def now(self) -> float:
        return time.monotonic()

    def call_at(self, when: float, callback: Callable[[], None]) -> TimerHandle:
        return self._loop.call_later(max(0.0, when - time.monotonic()), callback)


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchPolicy:
    """How requests are grouped: batch size cap, wait cap (from the oldest arrival), queue bound."""

    max_batch_size: int = 16
    max_queue_delay_ms: float = 5.0
    max_queue: int = 256

    def __post_init__(self) -> None:
        if not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got {self.max_batch_size!r}")
        if not isinstance(self.max_queue_delay_ms, (int, float)) or self.max_queue_delay_ms < 0:
            raise ValueError(f"max_queue_delay_ms must be a number >= 0, got {self.max_queue_delay_ms!r}")
        if not isinstance(self.max_queue, int) or self.max_queue < 1:
            raise ValueError(f"max_queue must be an integer >= 1, got {self.max_queue!r}")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BatchPolicy:
        """The policy of an inferencer's config table (missing keys take the defaults)."""
        defaults = cls()
        try:
            return cls(
                max_batch_size=int(config.get("max_batch_size", defaults.max_batch_size)),
                max_queue_delay_ms=float(config.get("max_queue_delay_ms", defaults.max_queue_delay_ms)),
                max_queue=int(config.get("max_queue", defaults.max_queue)),
            )
        except (TypeError, ValueError) as exc:
            raise MicrokernelError(ErrorCode.INVALID_FIELD, f"bad batching config: {exc}") from None


@dataclass(slots=True)
class _Pending(Generic[In, Out]):
    item: In
    future: asyncio.Future[Out]
    arrival: float
    deadline: float | None
    timer: TimerHandle | None = field(default=None)
    queued: bool = field(default=True)  # still counted in the queue's live depth


class Batcher(Generic[In, Out]):
    """Queues single requests and runs them through ``compute`` in batches, one batch at a time."""

    def __init__(
        self,
        compute: Callable[[list[In]], Awaitable[list[Out]]],
        policy: BatchPolicy | None = None,
        *,
        clock: Clock | None = None,
    ) -> None:
        self.compute = compute
        self.policy = policy or BatchPolicy()
        self.clock: Clock = clock or LoopClock()
        self.metrics = BatchMetrics()
        self._queue: collections.deque[_Pending[In, Out]] = collections.deque()
        self._live = 0  # queued requests still waiting for an answer (expired ones leave early)
        self._timer: TimerHandle | None = None
        self._running: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def depth(self) -> int:
        """Requests waiting in the queue (not counting the batch being computed)."""
        return self._live

    @property
    def busy(self) -> bool:
        """Whether a batch is being computed."""
        return self._running is not None

    async def submit(self, item: In, *, deadline: float | None = None) -> Out:
        """Queue ``item`` and return its result; ``deadline`` is a time on ``clock`` (or None).

        Raises ``MicrokernelError`` OVERLOADED (queue full), DEADLINE_EXCEEDED (the deadline
        passed before the item's batch ran), SHUTTING_DOWN (closed), or whatever ``compute``
        raised for the item's batch.
        """
        if self._closed:
            raise MicrokernelError(ErrorCode.SHUTTING_DOWN, "the inferencer is stopping and takes no new requests")
        now = self.clock.now()
        if self._live >= self.policy.max_queue:
            self.metrics.overloaded += 1
            raise MicrokernelError(
                ErrorCode.OVERLOADED,
                f"inference queue full ({self._live} of max_queue={self.policy.max_queue} waiting); retry later",
            )
        if deadline is not None and deadline <= now:
            self.metrics.deadline_exceeded += 1
            raise MicrokernelError(ErrorCode.DEADLINE_EXCEEDED, "the request's deadline passed before it was queued")
        future: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        pending = _Pending(item, future, now, deadline)
        if deadline is not None:
            pending.timer = self.clock.call_at(deadline, lambda: self._expire(pending))
        self._queue.append(pending)
        self._live += 1
        self.metrics.requests += 1
        self.metrics.observe_depth(self._live)
        self._schedule()
        try:
            return await future
        finally:
            if pending.timer is not None:
                pending.timer.cancel()
            if not future.done():
                future.cancel()
            if future.cancelled():
                # The caller gave up: its slot is skipped when its batch is formed.
                self._forget(pending)

    async def close(self) -> None:
        """Refuse new requests, answer the queued ones SHUTTING_DOWN, wait for the running batch."""
        self._closed = True
        self._cancel_timer()
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(
                    MicrokernelError(ErrorCode.SHUTTING_DOWN, "the inferencer stopped before this request ran"))
            pending.queued = False
        self._live = 0
        if self._running is not None:
            await asyncio.gather(self._running, return_exceptions=True)

    async def wait_idle(self) -> None:
        """Return once no batch is being computed (a model may then be released safely)."""
        while self._running is not None:
            await asyncio.gather(asyncio.shield(self._running), return_exceptions=True)

    def stats(self) -> dict[str, Any]:
        """Counters, the batch size histogram, queue time and latency p50/p99 (ms), queue depth."""
        return self.metrics.snapshot(depth=self._live, busy=self.busy, policy={
            "max_batch_size": self.policy.max_batch_size,
            "max_queue_delay_ms": self.policy.max_queue_delay_ms,
            "max_queue": self.policy.max_queue,
        })

    # --- internals: everything below runs on the loop, driven by arrivals, timers and batch ends ----

    def _forget(self, pending: _Pending[In, Out]) -> None:
        # The entry stays in the deque (removal from the middle is O(n)); it no longer counts.
        if pending.queued:
            pending.queued = False
            self._live -= 1

    def _expire(self, pending: _Pending[In, Out]) -> None:
        pending.timer = None
        if pending.future.done():
            return
        self.metrics.deadline_exceeded += 1
        pending.future.set_exception(
            MicrokernelError(ErrorCode.DEADLINE_EXCEEDED, "the request's deadline passed before its batch ran"))
        self._forget(pending)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _oldest_arrival(self) -> float | None:
        queue = self._queue
        while queue and queue[0].future.done():
            queue.popleft()  # answered (expired) or abandoned while waiting
        return queue[0].arrival if queue else None

    def _schedule(self) -> None:
        """Start a batch now if one is due, else make sure a timer fires when it will be."""
        if self._running is not None or self._closed:
            return  # the end of the running batch calls us again
        oldest = self._oldest_arrival()
        if oldest is None:
            self._cancel_timer()
            return
        due = oldest + self.policy.max_queue_delay_ms / 1000.0
        if self._live >= self.policy.max_batch_size or self.clock.now() >= due:
            self._cancel_timer()
            self._start_batch()
            return
        if self._timer is None:
            self._timer = self.clock.call_at(due, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._schedule()

    def _start_batch(self) -> None:
        batch: list[_Pending[In, Out]] = []
        queue = self._queue
        now = self.clock.now()
        while queue and len(batch) < self.policy.max_batch_size:
            pending = queue.popleft()
            if pending.future.done():
                continue
            self._forget(pending)
            if pending.timer is not None:
                pending.timer.cancel()
                pending.timer = None
            if pending.deadline is not None and pending.deadline <= now:
                self.metrics.deadline_exceeded += 1
                pending.future.set_exception(
                    MicrokernelError(ErrorCode.DEADLINE_EXCEEDED, "the request's deadline passed before its batch ran"))
                continue
            batch.append(pending)
        if not batch:
            self._schedule()
            return
        self.metrics.observe_batch(len(batch), [now - p.arrival for p in batch])
        self._running = asyncio.get_running_loop().create_task(self._run(batch), name="inference-batch")

    async def _run(self, batch: list[_Pending[In, Out]]) -> None:
        try:
            try:
                outputs = await self.compute([p.item for p in batch])
                if len(outputs) != len(batch):
                    raise MicrokernelError(
                        ErrorCode.INTERNAL, f"the model returned {len(outputs)} results for a batch of {len(batch)} inputs")
            except Exception as exc:
                # One failure answers every request of the batch; the batcher keeps serving.
                self.metrics.errors += len(batch)
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                return
            now = self.clock.now()
            for p, out in zip(batch, outputs):
                if not p.future.done():
                    p.future.set_result(out)
                    self.metrics.observe_latency(now - p.arrival)
            self.metrics.computed += len(batch)
        finally:
            self._running = None
            self._schedule()
