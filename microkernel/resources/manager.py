"""The kernel's resource manager: the one object that wires budgets, leases and CPUs into supervision.

The supervisor asks it three things per replica, at three moments:

* **before the start** (:meth:`ResourceManager.admit`, per command): does the service's hard memory
  budget fit the pool? All the slots of a start or scale-up are reserved at once or none is;
* **before the spawn** (:meth:`ResourceManager.place`): the static GPU lease (waited for, fairly),
  the CPUs, the cgroup, and the environment that makes them real in the child;
* **after the exit** (:meth:`ResourceManager.exited`): release every lease bound to the process,
  read the cgroup's OOM counter (an exit the kernel did not cause becomes ``oom``), forget the
  samples.

In between, :class:`~microkernel.resources.monitor.Monitor` samples every live replica's process
tree in the kernel's thread pool and acts on budgets and host pressure. Dynamic leases
(``lease_acquire_request``) go through :meth:`acquire` / :meth:`release`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from protocols.errors import ErrorCode, MicrokernelError
from microkernel.config import KernelConfig
from protocols import messages as m
from microkernel.resources.admission import AdmissionError, MemoryPool, parse_pool
from microkernel.resources.audit import wait_device_memory_freed
from microkernel.resources.budgets import ServiceResources
from microkernel.resources.cgroups import CgroupError, CgroupManager, CgroupSupport, detect
from microkernel.resources.cpus import host_cpus, thread_env
from microkernel.resources.gpu import Inventory, discover, env_for
from microkernel.resources.broker import LeaseBroker
from microkernel.resources.leases import Lease, LeaseRequest, LeaseTable
from microkernel.resources.memory import BudgetTracker
from microkernel.resources.sampling import TreeUsage
from microkernel.resources.pressure import HostMemory, HostPressure, read_host_memory
from microkernel.resources import segments
from microkernel.units import format_size

__all__ = ["ExitFacts", "Placement", "ReplicaKey", "ResourceManager", "holder_of"]

log = logging.getLogger("microkernel.resources")

ReplicaKey = tuple[str, int, int]
"""``(service, replica index, incarnation)``: one process of one replica slot."""


def holder_of(service: str, replica: int) -> str:
    """The lease holder name of a replica slot: ``"service/replica"``."""
    return f"{service}/{replica}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Placement:
    """What one replica process is started with, decided just before its spawn.

    ``env`` is applied over everything else (the lease: a service cannot override it);
    ``defaults`` under the service's own ``env`` (thread counts: a service may set its own).
    """

    holder: str
    lease: Lease | None = None
    cpus: tuple[int, ...] | None = None
    cgroup: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    defaults: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class ExitFacts:
    """What the resource manager knows about a replica process that just exited."""

    oom: bool = False
    released: tuple[Lease, ...] = ()
    pids: tuple[int, ...] = ()
    """The process tree as last sampled (the pids whose device memory must be freed)."""


class ResourceManager:
    """Memory pool, budgets, host pressure, cgroups, GPU inventory and leases, CPU placement.

    Created with the kernel, :meth:`start`-ed inside its loop (detection runs in the thread pool),
    used from the loop only.
    """

    def __init__(
        self,
        config: KernelConfig,
        *,
        bus: Any,
        executor: Executor | None = None,
        host: HostMemory | None = None,
    ) -> None:
        settings = config.kernel
        self.config = config
        self.bus = bus
        self.executor = executor
        self.gpu_settings = config.gpu
        self.interval = settings.memory_sample_interval
        self.host = host or read_host_memory()
        self.pool = MemoryPool(parse_pool(settings.memory_pool, self.host.total))
        self.pressure = HostPressure(settings.memory_pressure, self.host.total)
        self.tracker = BudgetTracker()
        self.cpus = host_cpus()
        self.cgroups = CgroupSupport(available=False, reason="not detected yet")
        self.cgroup_manager: CgroupManager | None = None
        self.inventory = Inventory(devices=(), source="none")
        self.broker = LeaseBroker(LeaseTable(()))
        self.usage: dict[ReplicaKey, TreeUsage] = {}
        self.gpu_used: dict[str, dict[str, int]] = {}
        """Holder → device UUID → bytes, from the last NVML audit round (empty without NVML)."""
        self.alive: dict[ReplicaKey, int] = {}
        self.placed_cpus: dict[ReplicaKey, tuple[int, ...]] = {}
        self.pinned: dict[ReplicaKey, set[int]] = {}
        self.external: dict[str, tuple[int, float]] = {}
        """Lease id → (pid, start time) of a client process the lease is bound to."""
        self.busy_cgroups: list[Path] = []
        self.rounds = 0
        """Sampling rounds completed (status shows it: a client can wait for fresh samples)."""
        self.generation = 0
        """Bumped by admissions, placements and exits; with the lease table's, keys cached status views."""

    # --- start-up ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Detect cgroup v2 support and the GPU inventory (blocking work, in the thread pool)."""
        loop = asyncio.get_running_loop()
        self.cgroups, self.cgroup_manager = await loop.run_in_executor(self.executor, self._setup_cgroups)
        await loop.run_in_executor(self.executor, segments.reap_all)  # left by a kernel that was killed
        gpu = self.gpu_settings
        self.inventory = await loop.run_in_executor(
            self.executor,
            lambda: discover(gpu.devices, use_nvml=gpu.nvml, probe=gpu.probe_torch, probe_python=gpu.probe_python,
                             probe_timeout=gpu.probe_timeout),
        )
        self.broker = LeaseBroker(LeaseTable(self.inventory.devices))
        log.info("memory: pool %s, pressure guard at %.0f%% of %s, sampling every %s; cgroups: %s; GPUs: %d (%s)",
                 format_size(self.pool.capacity), self.pressure.threshold_fraction * 100, format_size(self.host.total),
                 f"{self.interval * 1000:.0f} ms" if self.interval > 0 else "never (disabled)",
                 "available" if self.cgroups.available else self.cgroups.reason,
                 len(self.inventory.devices), self.inventory.source)

    @staticmethod
    def _setup_cgroups() -> tuple[CgroupSupport, CgroupManager | None]:
        support = detect()
        if not support.available or support.root is None:
            return support, None
        manager = CgroupManager(support.root)
        try:
            manager.enable()
            manager.prune()
        except (CgroupError, OSError) as exc:
            return CgroupSupport(available=False, reason=f"cannot enable memory cgroups: {exc}", root=support.root,
                                 controllers=support.controllers), None
        return support, manager

    def close(self) -> None:
        """Fail every queued lease request and unlink this kernel's shared memory (kernel shutdown)."""
        self.broker.cancel_all("the kernel is shutting down")
        segments.reap_all(own=True)

    # --- admission -----------------------------------------------------------------------------

    def admit(self, service: str, resources: ServiceResources, indices: Iterable[int]) -> None:
        """Reserve the hard budget of every listed replica slot, all or nothing.

        Raises ``MicrokernelError(BAD_STATE)`` with the pool's numbers when it does not fit. Slots
        that already hold their reservation (a restart) cost nothing more.
        """
        nbytes = resources.hard_memory
        if nbytes <= 0:
            return
        try:
            self.pool.reserve_many([((service, i), nbytes) for i in indices])
        except AdmissionError as exc:
            details = {"requested": exc.requested, "free": exc.free, "capacity": exc.capacity}
            raise MicrokernelError(ErrorCode.BAD_STATE, f"{service}: {exc}", details) from None
        self.generation += 1

    def release_slots(self, service: str, indices: Iterable[int]) -> None:
        """Give back the reservations of stopped or scaled-away replica slots."""
        for i in indices:
            self.pool.release((service, i))
        self.generation += 1

    # --- one replica process -------------------------------------------------------------------

    def needs_waiting(self, resources: ServiceResources) -> bool:
        """Whether :meth:`place` may wait (a GPU lease to queue for, or cgroup files to write)."""
        return resources.gpu is not None or self.cgroup_manager is not None

    async def place(self, service: str, index: int, incarnation: int, resources: ServiceResources,
                    *, timeout: float) -> Placement:
        """Decide what the next process of a replica slot starts with; waits for its static lease.

        Raises a :class:`~microkernel.resources.leases.LeaseError` when no lease is granted within
        ``timeout`` (or never can be), ``OSError`` when its cgroup cannot be set up.
        """
        holder = holder_of(service, index)
        lease = None
        if resources.gpu is not None:
            lease = await self.broker.acquire(resources.gpu.request(holder, priority=resources.priority), timeout)
        try:
            cgroup = None
            if self.cgroup_manager is not None:
                loop = asyncio.get_running_loop()
                cgroup = await loop.run_in_executor(
                    self.executor, self._make_cgroup, service, f"{index}.{incarnation}", resources.hard_memory
                )
        except BaseException:
            if lease is not None:
                self.broker.release(lease.id)
            raise
        return self._placement(holder, index, resources, lease, cgroup)

    def place_now(self, service: str, index: int, resources: ServiceResources) -> Placement:
        """:meth:`place` for a service that needs no waiting (see :meth:`needs_waiting`)."""
        return self._placement(holder_of(service, index), index, resources, None, None)

    def _placement(self, holder: str, index: int, resources: ServiceResources, lease: Lease | None,
                   cgroup: Path | None) -> Placement:
        cpus = resources.cpus.affinity(index, self.cpus) if resources.cpus is not None else None
        return Placement(
            holder=holder,
            lease=lease,
            cpus=cpus,
            cgroup=cgroup,
            # Every service gets the lease variables: without a lease, CUDA_VISIBLE_DEVICES="" hides all devices.
            env=env_for(lease, self.inventory.total_by_uuid()),
            defaults=thread_env(len(cpus)) if cpus is not None else {},
        )

    def _make_cgroup(self, service: str, key: str, hard: int) -> Path:
        assert self.cgroup_manager is not None
        path = self.cgroup_manager.create(service, key)
        self.cgroup_manager.set_memory(path, None, hard or None)
        self.cgroup_manager.set_oom_group(path)
        return path

    def abandon(self, placement: Placement) -> None:
        """The process was never spawned: give its lease and cgroup back."""
        self.generation += 1
        if placement.lease is not None:
            self.broker.release(placement.lease.id)
        if placement.cgroup is not None and self.cgroup_manager is not None:
            if not self.cgroup_manager.remove(placement.cgroup):
                self.busy_cgroups.append(placement.cgroup)

    def spawned(self, key: ReplicaKey, pid: int, placement: Placement) -> None:
        """The process is running: bind its lease to it and start sampling it."""
        self.generation += 1
        if placement.lease is not None:
            self.broker.bind_pid(placement.lease.id, pid)
        self.alive[key] = pid
        if placement.cpus is not None:
            self.placed_cpus[key] = placement.cpus
            self.pinned[key] = {pid}  # set between fork and exec

    def exited(self, key: ReplicaKey, pid: int, placement: Placement) -> ExitFacts:
        """The process is gone (whatever the reason): release what it held; report an OOM kill."""
        self.generation += 1
        usage = self.usage.pop(key, None)
        self.alive.pop(key, None)
        self.placed_cpus.pop(key, None)
        self.pinned.pop(key, None)
        self.tracker.forget(key)
        self.pressure.victim_gone(key)
        released = tuple(self.broker.release_pid(pid))
        if placement.lease is not None and self.broker.release(placement.lease.id) is not None:
            released += (placement.lease,)  # spawned but never bound (the spawn failed)
        oom = False
        if placement.cgroup is not None and self.cgroup_manager is not None:
            oom = self.cgroup_manager.oom_kills(placement.cgroup) > 0
            if not self.cgroup_manager.remove(placement.cgroup):
                self.busy_cgroups.append(placement.cgroup)
        pids = usage.pids if usage is not None else ()
        return ExitFacts(oom=oom, released=released, pids=tuple(dict.fromkeys((pid, *pids))))

    async def wait_gpu_freed(self, service: str, index: int, facts: ExitFacts) -> bool:
        """Restart-after-free: wait (bounded) until NVML no longer lists the dead tree on its devices.

        Returns whether the replacement may start: at once without NVML or without a released lease;
        after ``gpu.free_timeout`` it publishes ``lease.free_timed_out`` and follows
        ``gpu.on_free_timeout`` (``start`` anyway, or ``fail``).
        """
        nvml = self.inventory.nvml
        if nvml is None or not facts.released:
            return True
        uuids = sorted({uuid for lease in facts.released for uuid in lease.devices})
        result = await wait_device_memory_freed(nvml, uuids, facts.pids, self.gpu_settings.free_timeout,
                                                executor=self.executor)
        if result.freed:
            return True
        action = self.gpu_settings.on_free_timeout
        log.warning("%s[%d]: device memory still held after %.1fs (%s); on_free_timeout=%s",
                    service, index, result.waited_s, dict(result.held), action)
        self.bus.emit(m.LeaseFreeTimedOut, service=service, replica=index, devices=dict(result.held),
                      waited_s=result.waited_s, action=action, error=result.error)
        return action == "start"

    # --- dynamic leases ------------------------------------------------------------------------

    async def acquire(self, request: LeaseRequest, timeout: float | None) -> Lease:
        """Grant a run-time lease (queued fairly); a client's ``request.pid`` is watched for its exit."""
        start_time = None
        if request.pid is not None and request.pid not in self.alive.values():
            loop = asyncio.get_running_loop()
            start_time = await loop.run_in_executor(self.executor, _start_time, request.pid)
            if start_time is None:
                raise MicrokernelError(ErrorCode.INVALID_FIELD, f"no process with pid {request.pid} to bind the lease to")
        lease = await self.broker.acquire(request, timeout)
        if start_time is not None and request.pid is not None:
            self.external[lease.id] = (request.pid, start_time)
        return lease

    def try_acquire(self, request: LeaseRequest) -> Lease | None:
        """:meth:`acquire` without waiting, for requests the kernel can answer inline: ``None`` when
        the request must queue, or when it binds a client process (its pid is checked in the pool)."""
        if request.pid is not None and request.pid not in self.alive.values():
            return None
        return self.broker.try_acquire(request)

    def release(self, lease_id: str) -> Lease | None:
        """Release one lease by id; ``None`` if it was not held."""
        self.external.pop(lease_id, None)
        return self.broker.release(lease_id)

    def lease_env(self, lease: Lease | None) -> dict[str, str]:
        """The environment that makes ``lease`` real in a process started with it."""
        return env_for(lease, self.inventory.total_by_uuid())

    # --- views ---------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """The ``resources`` map of the kernel status."""
        return {
            "memory": {
                "sampling": self.interval > 0,
                "sample_interval_s": self.interval,
                "rounds": self.rounds,
                "pool": self.pool.snapshot(),
                "host_total": self.host.total,
                "host_available": self.host.available,
                "pressure_threshold": self.pressure.threshold_fraction,
            },
            "cgroups": self.cgroups.to_status(),
            "gpu": {
                "source": self.inventory.source,
                "devices": len(self.inventory.devices),
                "leases": len(self.broker.table.leases()),
                "waiters": len(self.broker.waiters()),
                "skipped": dict(self.inventory.skipped),
            },
            "cpus": list(self.cpus),
        }

    async def reap_segments(self, pid: int) -> int:
        """Unlink the shared memory that exited process ``pid`` (and any other dead owner) left."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.executor, segments.reap_replica, pid)
        except RuntimeError:  # the pool is already shut down (the very end of a teardown)
            return segments.reap_replica(pid)

    def status_key(self) -> tuple[int, int, int]:
        """Changes whenever admissions, placements, leases or waiting requests change."""
        return (self.generation, self.broker.table.generation, self.broker.waiting())

    def replica_view(self, key: ReplicaKey | None, holder: str) -> dict[str, Any]:
        """Per-replica resource fields of the status: last sample, leases, CPUs, GPU memory."""
        usage = self.usage.get(key) if key is not None else None
        leases = [lease.to_wire() for lease in self.broker.table.leases() if lease.holder == holder]
        used = self.gpu_used.get(holder)
        return {
            "usage": None if usage is None else usage.to_data(),
            "leases": leases,
            "cpus": None if key is None or key not in self.placed_cpus else list(self.placed_cpus[key]),
            "gpu_memory": None if self.inventory.nvml is None else dict(used or {}),
        }

    def leases_view(self) -> dict[str, Any]:
        """The body of a ``leases_reply``."""
        snapshot = self.broker.table.snapshot().to_wire()
        return {
            "source": self.inventory.source,
            "devices": snapshot["devices"],
            "leases": snapshot["leases"],
            "holders": snapshot["holders"],
            "waiters": [w.to_wire() for w in self.broker.waiters()],
            "skipped": dict(self.inventory.skipped),
        }


def _start_time(pid: int) -> float | None:
    """A process's start time (its identity against pid reuse), ``None`` if it does not exist."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None
