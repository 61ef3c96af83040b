"""The lease broker: grants leases from a :class:`~microkernel.resources.leases.LeaseTable`, and
queues the requests that do not fit yet, fairly.

Priority: a **higher** ``priority`` is more important (the same sense as the memory-pressure
policy, which kills the lowest priority first). Waiters are served highest priority first, FIFO
within a priority, and **nobody overtakes**: while the waiter at the head of the queue does not
fit, everyone behind it waits too, even those that would fit. This strict order can leave devices
idle for a moment, but it is what keeps a large request from being starved forever by a stream of
small ones. Waiters are re-checked after every release.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from microkernel.resources.leases import Lease, LeaseCancelled, LeaseRequest, LeaseTable, LeaseTimeout
from microkernel.units import format_duration

__all__ = ["LeaseBroker", "WaiterInfo"]


@dataclass(frozen=True, slots=True, kw_only=True)
class WaiterInfo:
    """A queued request, for ``mkctl leases``; ``position`` 0 is served next."""

    position: int
    request: LeaseRequest
    since_ns: int
    timeout: float | None

    def to_wire(self) -> dict[str, Any]:
        """The msgpack-native form."""
        return {"position": self.position, **self.request.to_wire(), "since_ns": self.since_ns, "timeout": self.timeout}


@dataclass(slots=True, kw_only=True)
class _Waiter:
    request: LeaseRequest
    future: asyncio.Future[Lease]
    seq: int
    since_ns: int
    timeout: float | None
    key: tuple[int, int] = field(init=False)

    def __post_init__(self) -> None:
        self.key = (-self.request.priority, self.seq)  # highest priority first, then FIFO


class LeaseBroker:
    """Grants leases from a :class:`LeaseTable`, queueing the requests that do not fit yet.

    Use it from the event loop only. Release through the broker (not the table) so that every
    release re-checks the queue.
    """

    def __init__(self, table: LeaseTable, *, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self._table = table
        self._clock_ns = clock_ns
        self._queue: list[_Waiter] = []  # sorted by _Waiter.key
        self._seq = itertools.count()

    @property
    def table(self) -> LeaseTable:
        """The table this broker grants from (read it; mutate through the broker)."""
        return self._table

    async def acquire(self, request: LeaseRequest, timeout: float | None) -> Lease:
        """Wait for ``request`` to be granted (``timeout`` in seconds, ``None`` = no limit; 0 = try now).

        Raises :class:`LeaseImpossible` at once when it can never fit, :class:`LeaseTimeout` when the
        timeout passes, :class:`LeaseCancelled` when its process or holder is released meanwhile.
        Cancelling the caller removes the waiter (and releases a lease granted at that very moment).
        """
        self._table.check_possible(request)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Lease] = loop.create_future()
        since = self._clock_ns()
        waiter = _Waiter(request=request, future=future, seq=next(self._seq), since_ns=since, timeout=timeout)
        bisect.insort(self._queue, waiter, key=lambda w: w.key)
        self._dispatch()
        try:
            async with asyncio.timeout(timeout):
                return await waiter.future
        except TimeoutError:
            if _granted(waiter.future):
                return waiter.future.result()  # granted in the same loop turn the timeout fired
            raise self._timeout_error(waiter) from None
        except asyncio.CancelledError:
            if _granted(waiter.future):
                self.release(waiter.future.result().id)
            raise
        finally:
            self._remove(waiter)

    def try_acquire(self, request: LeaseRequest) -> Lease | None:
        """Grant ``request`` at once when nobody is queued and it fits; ``None`` otherwise (then
        :meth:`acquire` queues it). Raises :class:`LeaseImpossible` like :meth:`acquire`."""
        self._table.check_possible(request)
        if any(not w.future.done() for w in self._queue):
            return None  # nobody overtakes a waiter
        return self._table.try_grant(request)

    def release(self, lease_id: str) -> Lease | None:
        """Release one lease and serve the queue; ``None`` if it was not held."""
        lease = self._table.release(lease_id)
        self._dispatch()
        return lease

    def release_holder(self, holder: str) -> list[Lease]:
        """Release every lease of ``holder`` and drop its queued requests (:class:`LeaseCancelled`)."""
        self._drop(lambda r: r.holder == holder, f"holder {holder} was released")
        released = self._table.release_holder(holder)
        self._dispatch()
        return released

    def release_pid(self, pid: int) -> list[Lease]:
        """The process ``pid`` exited: release its leases and drop its queued requests."""
        self._drop(lambda r: r.pid == pid, f"process {pid} exited")
        released = self._table.release_pid(pid)
        self._dispatch()
        return released

    def bind_pid(self, lease_id: str, pid: int) -> Lease:
        """Bind a static lease to the process just spawned with it."""
        return self._table.bind_pid(lease_id, pid)

    def cancel_all(self, reason: str) -> None:
        """Fail every waiter with :class:`LeaseCancelled` (kernel shutdown)."""
        self._drop(lambda _: True, reason)

    def waiting(self) -> int:
        """How many requests wait (``len(waiters())`` without building them)."""
        if not self._queue:
            return 0
        return sum(1 for w in self._queue if not w.future.done())

    def waiters(self) -> tuple[WaiterInfo, ...]:
        """The queue in service order."""
        live = [w for w in self._queue if not w.future.done()]
        return tuple(WaiterInfo(position=i, request=w.request, since_ns=w.since_ns, timeout=w.timeout)
                     for i, w in enumerate(live))  # fmt: skip

    def _dispatch(self) -> None:
        # Serve from the head while it fits; the first one that does not fit blocks everyone behind it.
        while self._queue:
            head = self._queue[0]
            if head.future.done():  # its caller was cancelled and has not cleaned up yet
                self._queue.pop(0)
                continue
            lease = self._table.try_grant(head.request)
            if lease is None:
                return
            self._queue.pop(0)
            head.future.set_result(lease)

    def _remove(self, waiter: _Waiter) -> None:
        index = bisect.bisect_left(self._queue, waiter.key, key=lambda w: w.key)
        if index < len(self._queue) and self._queue[index] is waiter:
            del self._queue[index]
            self._dispatch()  # it may have been the one blocking the rest

    def _drop(self, match: Callable[[LeaseRequest], bool], reason: str) -> None:
        keep = []
        for w in self._queue:
            if match(w.request):
                if not w.future.done():
                    w.future.set_exception(LeaseCancelled(f"lease request of {w.request.holder} dropped: {reason}"))
            else:
                keep.append(w)
        self._queue = keep

    def _timeout_error(self, waiter: _Waiter) -> LeaseTimeout:
        req = waiter.request
        ahead = sum(1 for w in self._queue if w.key < waiter.key and not w.future.done())
        wait = format_duration(waiter.timeout or 0.0)
        reason = (
            f"no GPU lease for {req.holder} within {wait}: wanted {req.describe()}, "
            f"{ahead} request(s) ahead in the queue; devices: {self._table.free_summary() or 'none'}"
        )
        details = {"holder": req.holder, "count": req.count, "memory": req.memory, "mode": req.mode.value,
                   "timeout": waiter.timeout, "ahead": ahead}  # fmt: skip
        return LeaseTimeout(reason, details)


def _granted(future: asyncio.Future[Lease]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None
