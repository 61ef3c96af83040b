"""CUDA device leases: a pure placement table and an asyncio broker that queues requests fairly.

A lease is a set of device UUIDs, a byte budget per device and a mode:

- ``exclusive``: the devices carry no other lease at all. ``memory = 0`` means the whole device.
- ``shared``: the devices carry no exclusive lease, and the shared budgets on a device never add
  up to more than its total.

:class:`LeaseTable` places requests all-or-nothing and never over-allocates (property-tested).
Placement packs: a shared request goes to the devices with the *least* free memory that still fit,
an exclusive one to the smallest idle devices, so big holes stay free for big requests.

:class:`LeaseBroker` adds waiting. Priority: a **higher** ``priority`` is more important (the same
sense as the memory-pressure policy, which kills the lowest priority first). Waiters are served
highest priority first, FIFO within a priority, and **nobody overtakes**: while the waiter at the
head of the queue does not fit, everyone behind it waits too, even those that would fit. This
strict order can leave devices idle for a moment, but it is what keeps a large request from being
starved forever by a stream of small ones. Waiters are re-checked after every release.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from microkernel.resources.gpu import Device, GpuConfigError
from microkernel.units import UnitError, format_duration, format_size, parse_size
from protocols.errors import ErrorCode, MicrokernelError

__all__ = [
    "DeviceUsage",
    "GpuSpec",
    "Lease",
    "LeaseBroker",
    "LeaseCancelled",
    "LeaseError",
    "LeaseImpossible",
    "LeaseMode",
    "LeaseRequest",
    "LeaseTable",
    "LeaseTimeout",
    "TableSnapshot",
    "WaiterInfo",
    "parse_gpu_spec",
]


class LeaseMode(StrEnum):
    """Whether a lease shares its devices."""

    EXCLUSIVE = "exclusive"
    SHARED = "shared"


class LeaseError(MicrokernelError):
    """A lease request that was not granted; the wire code and reason say why."""


class LeaseImpossible(LeaseError):
    """The request can never be granted on this inventory (too many devices, too much memory)."""

    def __init__(self, reason: str) -> None:
        super().__init__(ErrorCode.INVALID_FIELD, reason)


class LeaseTimeout(LeaseError):
    """The request waited its whole timeout without being granted."""

    def __init__(self, reason: str, details: dict[str, Any]) -> None:
        super().__init__(ErrorCode.TIMEOUT, reason, details)


class LeaseCancelled(LeaseError):
    """The waiting request was dropped: its process exited, its holder was released, or shutdown."""

    def __init__(self, reason: str) -> None:
        super().__init__(ErrorCode.BAD_STATE, reason)


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseRequest:
    """What a holder asks for: ``count`` devices with ``memory`` bytes each.

    ``holder`` names the owner (``"service/replica"``); ``pid`` binds the lease to a process (it is
    released when that process exits), ``None`` for a static lease granted before spawn.
    ``memory = 0`` asks for whole devices and is only valid with ``exclusive``.
    """

    holder: str
    pid: int | None = None
    count: int = 1
    memory: int = 0
    mode: LeaseMode = LeaseMode.EXCLUSIVE
    priority: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", LeaseMode(self.mode))
        if not self.holder:
            raise ValueError("holder must be non-empty")
        if self.count < 1:
            raise ValueError(f"count must be >= 1, got {self.count!r}")
        if self.memory < 0:
            raise ValueError(f"memory must be >= 0 bytes, got {self.memory!r}")
        if self.mode is LeaseMode.SHARED and self.memory == 0:
            raise ValueError("a shared lease needs a memory budget > 0")

    def describe(self) -> str:
        """``"2 x 8 GiB shared"``, for messages."""
        size = format_size(self.memory) if self.memory else "whole device"
        return f"{self.count} x {size} {self.mode.value}"

    def to_wire(self) -> dict[str, Any]:
        """The msgpack-native form (the fields of a ``lease_acquire`` request)."""
        return {"holder": self.holder, "pid": self.pid, "count": self.count, "memory": self.memory,
                "mode": self.mode.value, "priority": self.priority}  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class Lease:
    """A granted lease. ``memory`` is the per-device budget (0 = whole device, exclusive only)."""

    id: str
    holder: str
    pid: int | None
    devices: tuple[str, ...]
    memory: int
    mode: LeaseMode
    priority: int = 0
    granted_at_ns: int = 0
    """Wall clock (``time.time_ns``) when granted."""

    def budget(self, total: int) -> int:
        """The byte budget on a device of ``total`` bytes."""
        return self.memory if self.memory else total

    def to_wire(self) -> dict[str, Any]:
        """The msgpack-native form for replies and events."""
        return {"id": self.id, "holder": self.holder, "pid": self.pid, "devices": list(self.devices),
                "memory": self.memory, "mode": self.mode.value, "priority": self.priority,
                "granted_at_ns": self.granted_at_ns}  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceUsage:
    """One device in a :class:`TableSnapshot`: ``used`` counts a whole exclusive device."""

    device: Device
    used: int
    free: int
    leases: tuple[str, ...]
    exclusive: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class TableSnapshot:
    """The table at one moment: per-device usage and every lease (for status and ``mkctl leases``)."""

    devices: tuple[DeviceUsage, ...]
    leases: tuple[Lease, ...]

    @property
    def holders(self) -> dict[str, list[str]]:
        """Holder → its lease ids, in grant order."""
        out: dict[str, list[str]] = {}
        for lease in self.leases:
            out.setdefault(lease.holder, []).append(lease.id)
        return out

    def to_wire(self) -> dict[str, Any]:
        """The msgpack-native form."""
        return {
            "devices": [
                {**u.device.to_wire(), "used": u.used, "free": u.free, "leases": list(u.leases),
                 "exclusive": u.exclusive}  # fmt: skip
                for u in self.devices
            ],
            "leases": [lease.to_wire() for lease in self.leases],
            "holders": self.holders,
        }


class LeaseTable:
    """Which lease holds what on which device. Pure bookkeeping: no waiting, no I/O.

    Mutate it through a :class:`LeaseBroker` when requests may be waiting, so that every release
    re-checks them.
    """

    def __init__(self, devices: Sequence[Device], *, clock_ns: Callable[[], int] = time.time_ns) -> None:
        uuids = [d.uuid for d in devices]
        if len(set(uuids)) != len(uuids):
            raise ValueError(f"duplicate device UUIDs in {uuids}")
        self._devices = {d.uuid: d for d in devices}
        self._clock_ns = clock_ns
        self._leases: dict[str, Lease] = {}
        self._used: dict[str, int] = dict.fromkeys(uuids, 0)
        self._on: dict[str, set[str]] = {u: set() for u in uuids}  # device → lease ids
        self._exclusive: set[str] = set()  # devices held by an exclusive lease
        self._ids = itertools.count(1)

    @property
    def devices(self) -> tuple[Device, ...]:
        """The inventory, in the order given."""
        return tuple(self._devices.values())

    def leases(self) -> tuple[Lease, ...]:
        """Every lease, in grant order."""
        return tuple(self._leases.values())

    def get(self, lease_id: str) -> Lease | None:
        """The lease with this id, if granted and not released."""
        return self._leases.get(lease_id)

    def check_possible(self, req: LeaseRequest) -> None:
        """Raise :class:`LeaseImpossible` if ``req`` could not be granted even on an idle inventory."""
        if req.count > len(self._devices):
            raise LeaseImpossible(
                f"{req.holder} asks for {req.count} GPU(s) but the inventory has {len(self._devices)}"
            )
        big_enough = sum(1 for d in self._devices.values() if d.memory_total >= req.memory)
        if big_enough < req.count:
            largest = max((d.memory_total for d in self._devices.values()), default=0)
            raise LeaseImpossible(
                f"{req.holder} asks for {req.describe()} but only {big_enough} device(s) have that much memory "
                f"(largest: {format_size(largest)})"
            )

    def place(self, req: LeaseRequest) -> tuple[str, ...] | None:
        """The devices :meth:`try_grant` would choose now, or ``None`` when it does not fit."""
        if req.mode is LeaseMode.EXCLUSIVE:
            idle = [d for d in self._devices.values() if not self._on[d.uuid] and d.memory_total >= req.memory]
            # Smallest idle devices first: keep the big ones for requests that need them.
            chosen = sorted(idle, key=lambda d: (d.memory_total, d.index))[: req.count]
        else:
            fits = [
                d
                for d in self._devices.values()
                if d.uuid not in self._exclusive and d.memory_total - self._used[d.uuid] >= req.memory
            ]
            # Pack: the devices with the least free memory that still fit.
            chosen = sorted(fits, key=lambda d: (d.memory_total - self._used[d.uuid], d.index))[: req.count]
        if len(chosen) < req.count:
            return None
        return tuple(d.uuid for d in sorted(chosen, key=lambda d: d.index))

    def try_grant(self, req: LeaseRequest) -> Lease | None:
        """Grant ``req`` now, all-or-nothing, or return ``None`` when it does not fit yet.

        Raises :class:`LeaseImpossible` when it can never fit.
        """
        self.check_possible(req)
        devices = self.place(req)
        if devices is None:
            return None
        lease = Lease(
            id=f"lease-{next(self._ids)}",
            holder=req.holder,
            pid=req.pid,
            devices=devices,
            memory=req.memory,
            mode=req.mode,
            priority=req.priority,
            granted_at_ns=self._clock_ns(),
        )
        for uuid in devices:
            self._on[uuid].add(lease.id)
            if lease.mode is LeaseMode.EXCLUSIVE:
                self._exclusive.add(uuid)
                self._used[uuid] = self._devices[uuid].memory_total
            else:
                self._used[uuid] += lease.memory
        self._leases[lease.id] = lease
        return lease

    def bind_pid(self, lease_id: str, pid: int) -> Lease:
        """Bind a static lease (granted before spawn) to the process it was granted for; KeyError if unknown."""
        lease = replace(self._leases[lease_id], pid=pid)
        self._leases[lease_id] = lease
        return lease

    def release(self, lease_id: str) -> Lease | None:
        """Release one lease; ``None`` if it is unknown or already released (releases race exits)."""
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return None
        for uuid in lease.devices:
            self._on[uuid].discard(lease.id)
            if lease.mode is LeaseMode.EXCLUSIVE:
                self._exclusive.discard(uuid)
                self._used[uuid] = 0
            else:
                self._used[uuid] -= lease.memory
        return lease

    def release_holder(self, holder: str) -> list[Lease]:
        """Release every lease of ``holder`` (the replica stopped or is being replaced)."""
        return self._release_all(lease.id for lease in self._leases.values() if lease.holder == holder)

    def release_pid(self, pid: int) -> list[Lease]:
        """Release every lease bound to ``pid``: call it when that process exits, whatever the reason."""
        return self._release_all(lease.id for lease in self._leases.values() if lease.pid == pid)

    def _release_all(self, ids: Iterable[str]) -> list[Lease]:
        return [lease for lease_id in list(ids) if (lease := self.release(lease_id)) is not None]

    def snapshot(self) -> TableSnapshot:
        """The current usage and leases."""
        usage = tuple(
            DeviceUsage(
                device=d,
                used=self._used[d.uuid],
                free=d.memory_total - self._used[d.uuid],
                leases=tuple(i for i in self._leases if i in self._on[d.uuid]),  # grant order
                exclusive=d.uuid in self._exclusive,
            )
            for d in self._devices.values()
        )
        return TableSnapshot(devices=usage, leases=self.leases())

    def free_summary(self) -> str:
        """``"GPU-a: 3 GiB free, GPU-b: exclusive"``, for error messages."""
        return ", ".join(
            f"{u}: {'exclusive' if u in self._exclusive else format_size(d.memory_total - self._used[u]) + ' free'}"
            for u, d in self._devices.items()
        )


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


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuSpec:
    """A service's static lease: ``gpu = { count = 1, memory = "8GiB", mode = "shared" }``."""

    count: int = 1
    memory: int = 0
    mode: LeaseMode = LeaseMode.EXCLUSIVE

    def request(self, holder: str, *, pid: int | None = None, priority: int = 0) -> LeaseRequest:
        """The lease request for one replica (``holder`` = ``"service/replica"``)."""
        return LeaseRequest(
            holder=holder, pid=pid, count=self.count, memory=self.memory, mode=self.mode, priority=priority
        )


_GPU_SPEC_KEYS = ("count", "memory", "mode")


def parse_gpu_spec(value: object) -> GpuSpec:
    """Validate a service's ``gpu`` value: a table with ``count``, ``memory``, ``mode``, or an integer.

    ``gpu = 2`` is short for ``gpu = { count = 2 }`` (two whole devices, exclusive). ``mode``
    defaults to ``exclusive``; ``memory`` (a size) defaults to 0 = whole device and is required for
    ``shared``. Raises :class:`~microkernel.resources.gpu.GpuConfigError` with a path relative to
    the service table (``("gpu", "memory")``).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        value = {"count": value}
    if not isinstance(value, Mapping):
        example = '{ count = 1, memory = "8GiB", mode = "shared" }'
        raise GpuConfigError(("gpu",), f"expected a table such as {example} or a device count, got {value!r}")
    for key in value:
        if key not in _GPU_SPEC_KEYS:
            raise GpuConfigError(("gpu", key), f"unknown key; expected one of {', '.join(_GPU_SPEC_KEYS)}")
    count = value.get("count", 1)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise GpuConfigError(("gpu", "count"), f"expected an integer >= 1, got {count!r}")
    mode = value.get("mode", LeaseMode.EXCLUSIVE.value)
    if mode not in tuple(LeaseMode):
        raise GpuConfigError(("gpu", "mode"), f"expected exclusive or shared, got {mode!r}")
    try:
        memory = parse_size(value.get("memory", 0), key="gpu.memory")
    except UnitError as exc:
        raise GpuConfigError(("gpu", "memory"), exc.reason) from None
    if mode == LeaseMode.SHARED and memory == 0:
        raise GpuConfigError(("gpu", "memory"), 'a shared lease needs a memory budget > 0, e.g. memory = "8GiB"')
    return GpuSpec(count=count, memory=memory, mode=LeaseMode(mode))
