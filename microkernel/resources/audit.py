"""Checking real GPU usage against leases (NVML), and waiting for a dead worker's memory to be freed.

A lease is made real by the child's environment, which a misbehaving process can ignore. With NVML
the kernel can see which process holds how much memory on which device; :func:`audit` compares that
with the :class:`~microkernel.resources.leases.LeaseTable` and returns :class:`Violation` values
(published as ``lease.violated``), each with the action the caller executes: ``warn`` (the event
only) or ``kill`` (that replica, exit reason ``budget``).

The usage read (:func:`read_snapshot`) and the pid resolution (:class:`ProcessTreeResolver`) are
blocking; the kernel runs one audit round in its thread pool. :func:`audit` itself is pure.

NVML reports host pids: a daemon in a container without the host pid namespace sees pids it cannot
map, and those processes are ignored like any process the kernel does not manage.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

import psutil

from microkernel.resources.gpu import GpuProcess
from microkernel.resources.leases import Lease, LeaseTable

__all__ = [
    "FreeResult",
    "NvmlProcesses",
    "ProcessTreeResolver",
    "Violation",
    "audit",
    "read_snapshot",
    "wait_device_memory_freed",
]

Enforcement = Literal["warn", "kill"]
Snapshot = Mapping[str, Sequence[GpuProcess]]
"""Device UUID → the processes NVML lists on it."""


class NvmlProcesses(Protocol):
    """The one NVML call the audit uses (``nvmlDeviceGetComputeRunningProcesses`` by device UUID)."""

    def compute_processes(self, uuid: str) -> list[GpuProcess]:
        """The processes with a compute context on device ``uuid``; raises when NVML fails."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Violation:
    """A holder using a device it does not lease, or more memory on it than its budget.

    ``kind`` is ``"foreign_device"`` (no lease of ``holder`` covers ``device``; ``budget`` is 0) or
    ``"over_budget"`` (``used > budget + slack``). ``used`` sums the holder's processes on the device.
    """

    kind: Literal["foreign_device", "over_budget"]
    holder: str
    pids: tuple[int, ...]
    device: str
    used: int
    budget: int
    slack: int
    lease_ids: tuple[str, ...]
    action: Enforcement

    def to_event(self) -> dict[str, Any]:
        """The data of a ``lease.violated`` event."""
        return {
            "kind": self.kind,
            "holder": self.holder,
            "pids": list(self.pids),
            "device": self.device,
            "used": self.used,
            "budget": self.budget,
            "slack": self.slack,
            "over": max(self.used - self.budget, 0),
            "leases": list(self.lease_ids),
            "action": self.action,
        }


def read_snapshot(
    nvml: NvmlProcesses, uuids: Iterable[str]
) -> tuple[dict[str, tuple[GpuProcess, ...]], dict[str, str]]:
    """Read the compute processes of each device (blocking). Returns ``(snapshot, errors)``.

    A device whose query fails is left out of the snapshot (the audit does not judge it) and its
    error is reported instead, so one flaky device does not blind the audit of the others.
    """
    snapshot: dict[str, tuple[GpuProcess, ...]] = {}
    errors: dict[str, str] = {}
    for uuid in uuids:
        try:
            snapshot[uuid] = tuple(nvml.compute_processes(uuid))
        except Exception as exc:  # pynvml.NVMLError: GPU lost, permission, driver reload
            errors[uuid] = f"{type(exc).__name__}: {exc}"
    return snapshot, errors


def audit(
    table: LeaseTable,
    snapshot: Snapshot,
    *,
    resolve: Callable[[int], str | None] = lambda _pid: None,
    enforce: Enforcement = "warn",
    slack: int = 0,
) -> list[Violation]:
    """Compare NVML's per-process usage with the leases; one :class:`Violation` per (holder, device).

    A pid belongs to the holder of a lease bound to it, else to ``resolve(pid)`` (the kernel maps
    descendants of a replica to that replica's holder); pids that map to no holder are not the
    kernel's and are ignored. A holder's budget on a device is the sum over its leases there, so
    several runtime leases add up. Usage that NVML cannot report (``None``) is never judged over
    budget. ``slack`` tolerates the CUDA context, which the memory fraction does not cap.
    """
    by_pid = {lease.pid: lease.holder for lease in table.leases() if lease.pid is not None}
    totals = {d.uuid: d.memory_total for d in table.devices}
    used: dict[tuple[str, str], int] = {}
    unknown: set[tuple[str, str]] = set()
    pids: dict[tuple[str, str], list[int]] = {}
    for uuid, processes in snapshot.items():
        for proc in processes:
            holder = by_pid.get(proc.pid) or resolve(proc.pid)
            if holder is None:
                continue
            key = (holder, uuid)
            pids.setdefault(key, []).append(proc.pid)
            used[key] = used.get(key, 0) + (proc.used_memory or 0)
            if proc.used_memory is None:
                unknown.add(key)
    leases_by_holder: dict[str, list[Lease]] = {}
    for lease in table.leases():
        leases_by_holder.setdefault(lease.holder, []).append(lease)

    violations = []
    for (holder, uuid), holder_pids in pids.items():
        covering = [lease for lease in leases_by_holder.get(holder, ()) if uuid in lease.devices]
        foreign = Violation(kind="foreign_device", holder=holder, pids=tuple(sorted(holder_pids)), device=uuid,
                            used=used[(holder, uuid)], budget=0, slack=slack, lease_ids=(), action=enforce)  # fmt: skip
        if not covering or uuid not in totals:
            violations.append(foreign)
            continue
        budget = sum(lease.budget(totals[uuid]) for lease in covering)
        if (holder, uuid) not in unknown and foreign.used > budget + slack:
            ids = tuple(lease.id for lease in covering)
            violations.append(replace(foreign, kind="over_budget", budget=budget, lease_ids=ids))
    return violations


class ProcessTreeResolver:
    """Map a pid to the holder of the replica it descends from (blocking: psutil).

    ``roots`` maps each replica's pid to its holder (``"service/replica"``). A pid is resolved to
    the holder of the nearest ancestor (itself included) found in ``roots``.
    """

    def __init__(self, roots: Mapping[int, str]) -> None:
        self._roots = dict(roots)

    def __call__(self, pid: int) -> str | None:
        if pid in self._roots:
            return self._roots[pid]
        try:
            ancestors = psutil.Process(pid).parents()
        except psutil.Error:  # gone already, or not visible to us
            return None
        for parent in ancestors:
            if parent.pid in self._roots:
                return self._roots[parent.pid]
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class FreeResult:
    """What :func:`wait_device_memory_freed` saw: whether the memory was freed, after how long.

    ``held`` maps the devices where the pids were still listed to the bytes they still held (for
    the event when it timed out); ``error`` is the last NVML failure, if the last read failed.
    """

    freed: bool
    waited_s: float
    held: Mapping[str, int]
    error: str = ""


def _held_by(nvml: NvmlProcesses, uuids: Collection[str], pids: Collection[int]) -> dict[str, int]:
    held: dict[str, int] = {}
    for uuid in uuids:
        mine = [p for p in nvml.compute_processes(uuid) if p.pid in pids]
        if mine:
            held[uuid] = sum(p.used_memory or 0 for p in mine)
    return held


async def wait_device_memory_freed(
    nvml: NvmlProcesses,
    uuids: Collection[str],
    pid: int | Collection[int],
    timeout: float,
    *,
    poll: float = 0.25,
    executor: Executor | None = None,
) -> FreeResult:
    """Wait until no process in ``pid`` is listed on any of ``uuids``, at most ``timeout`` seconds.

    A dead worker's device memory is freed by the driver some time after the process is reaped,
    and NVML has no event for it, so this is the one place that polls: every ``poll`` seconds,
    bounded by ``timeout``, each read in ``executor`` (the kernel's thread pool). It never raises
    for NVML failures (they count as "not freed yet"); the caller decides with the result whether
    to start the replacement anyway or fail (``[gpu] on_free_timeout``).
    """
    pids = {pid} if isinstance(pid, int) else set(pid)
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline = start + timeout
    while True:
        try:
            held = await loop.run_in_executor(executor, _held_by, nvml, uuids, pids)
            error = ""
        except Exception as exc:  # pynvml.NVMLError: keep trying until the deadline
            held, error = {u: 0 for u in uuids}, f"{type(exc).__name__}: {exc}"
        now = loop.time()
        if not held:
            return FreeResult(freed=True, waited_s=now - start, held={})
        if now >= deadline:
            return FreeResult(freed=False, waited_s=now - start, held=held, error=error)
        await asyncio.sleep(min(poll, deadline - now))
