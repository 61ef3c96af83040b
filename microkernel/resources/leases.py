"""CUDA device leases: what a lease is, and the pure placement table that grants them.

A lease is a set of device UUIDs, a byte budget per device and a mode:

- ``exclusive``: the devices carry no other lease at all. ``memory = 0`` means the whole device.
- ``shared``: the devices carry no exclusive lease, and the shared budgets on a device never add
  up to more than its total.

:class:`LeaseTable` places requests all-or-nothing and never over-allocates (property-tested).
Placement packs: a shared request goes to the devices with the *least* free memory that still fit,
an exclusive one to the smallest idle devices, so big holes stay free for big requests.

:class:`~microkernel.resources.broker.LeaseBroker` adds fair waiting on top of the table.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from microkernel.resources.gpu import Device, GpuConfigError
from microkernel.units import UnitError, format_size, parse_size
from protocols.errors import ErrorCode, MicrokernelError

__all__ = [
    "DeviceUsage",
    "GpuSpec",
    "Lease",
    "LeaseCancelled",
    "LeaseError",
    "LeaseImpossible",
    "LeaseMode",
    "LeaseRequest",
    "LeaseTable",
    "LeaseTimeout",
    "TableSnapshot",
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
        self.generation = 0
        """Bumped by every grant, binding and release (lets readers cache views of the table)."""

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
        self.generation += 1
        return lease

    def bind_pid(self, lease_id: str, pid: int) -> Lease:
        """Bind a static lease (granted before spawn) to the process it was granted for; KeyError if unknown."""
        lease = replace(self._leases[lease_id], pid=pid)
        self._leases[lease_id] = lease
        self.generation += 1
        return lease

    def release(self, lease_id: str) -> Lease | None:
        """Release one lease; ``None`` if it is unknown or already released (releases race exits)."""
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return None
        self.generation += 1
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
