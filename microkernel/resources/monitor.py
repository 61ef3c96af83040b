"""The kernel's resource loops: tree sampling (budgets, host pressure, CPU pinning) and the NVML audit.

One sampling round, every ``kernel.memory_sample_interval``:

1. in the thread pool (never on the loop): sample the process tree of every live replica
   (:class:`~microkernel.resources.sampling.TreeSampler`), read host RAM, pin newly seen descendants
   of CPU-budgeted replicas (and those that changed their own affinity) to their CPUs, check the client processes that hold leases, retry
   busy cgroup removals;
2. on the loop: feed each tree's RSS to the budget tracker — a soft crossing publishes
   ``budget.exceeded`` (``limit = "soft"``) once, a fall back ``budget.cleared``, a hard crossing
   ``budget.exceeded`` (``limit = "hard"``) and kills that one replica (reason ``budget``) — then ask
   the host pressure guard whether to kill a victim (``memory.pressure``).

The audit round (every ``gpu.audit_interval``, only when the inventory comes from NVML and
``gpu.enforce`` is not ``off``) compares NVML's per-process device memory with the leases.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import psutil

from protocols import messages as m
from microkernel.resources.audit import ProcessTreeResolver, Violation, audit, read_snapshot
from microkernel.resources.budgets import ServiceResources
from microkernel.resources.cpus import apply_affinity, drifted
from microkernel.resources.gpu import Device, Nvml
from microkernel.resources.leases import Lease
from microkernel.resources.manager import ReplicaKey, ResourceManager, holder_of
from microkernel.resources.sampling import TreeSampler, TreeUsage
from microkernel.resources.pressure import Candidate, HostMemory, read_host_memory
from microkernel.units import format_size

__all__ = ["Monitor", "Replicas", "Target"]

log = logging.getLogger("microkernel.resources")

# How often leases bound to client processes are checked when memory sampling is disabled.
EXTERNAL_CHECK_S = 1.0


OBSERVE_EVERY = 8
"""Replicas with nothing to enforce are measured every this many rounds (2 s at 250 ms)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """A live replica process, as the sampler sees it."""

    key: ReplicaKey
    pid: int
    resources: ServiceResources
    started_at_ns: int


class Replicas(Protocol):
    """What the monitor needs from the supervisor."""

    def sample_targets(self) -> list[Target]:
        """Every replica with a live process."""
        ...

    def kill_for_resources(self, key: ReplicaKey, detail: str) -> bool:
        """Kill that replica's tree with exit reason ``budget``; False if it is not (or no longer) killable."""
        ...


@dataclass(slots=True, kw_only=True)
class _Round:
    usage: dict[int, TreeUsage]
    host: HostMemory
    pinned: dict[ReplicaKey, list[int]]
    dead_leases: list[str]
    removed_cgroups: list[Path]


@dataclass(frozen=True, slots=True)
class _FrozenTable:
    """The lease table as it was on the loop, for an audit round in the thread pool."""

    devices: tuple[Device, ...]
    _leases: tuple[Lease, ...]

    def leases(self) -> tuple[Lease, ...]:
        return self._leases


class Monitor:
    """Runs the sampling and audit rounds of one kernel; each ``run_*`` method is a TaskGroup task."""

    def __init__(self, manager: ResourceManager, replicas: Replicas) -> None:
        self.manager = manager
        self.replicas = replicas
        self.sampler = TreeSampler()

    # --- sampling ------------------------------------------------------------------------------

    async def run_sampling(self) -> None:
        """Sample forever (cancelled at shutdown)."""
        interval = self.manager.interval
        tick = interval if interval > 0 else EXTERNAL_CHECK_S
        while True:
            # A timer is right here: sampling is periodic by definition.
            await asyncio.sleep(tick)
            try:
                await self.sample_once()
            except Exception:  # a bad round must not end sampling (and with it every budget)
                log.exception("resource sampling round failed")

    async def sample_once(self) -> None:
        """One sampling round: measure in the thread pool, then act on the loop.

        Replicas with something to enforce (a memory budget, a CPU budget) are measured every round;
        the others only every ``OBSERVE_EVERY`` rounds — for ``top``, status and the pressure guard,
        which keeps using their last figures in between. With hundreds of idle services this is
        what keeps the kernel's own CPU use low.
        """
        mgr = self.manager
        targets = self.replicas.sample_targets() if mgr.interval > 0 else []
        skipped: list[Target] = []
        if targets and mgr.rounds % OBSERVE_EVERY:
            enforced = [t for t in targets if t.resources.memory is not None or t.resources.cpus is not None]
            if len(enforced) < len(targets):
                skipped = [t for t in targets if t.resources.memory is None and t.resources.cpus is None]
                targets = enforced
        pins = {t.key: (mgr.placed_cpus[t.key], frozenset(mgr.pinned.get(t.key, ())))
                for t in targets if t.key in mgr.placed_cpus}  # fmt: skip
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(
            mgr.executor, self._measure, targets, pins, dict(mgr.external), list(mgr.busy_cgroups)
        )
        self._act(targets, result, skipped)
        mgr.rounds += 1

    def _measure(
        self,
        targets: Sequence[Target],
        pins: Mapping[ReplicaKey, tuple[tuple[int, ...], frozenset[int]]],
        external: Mapping[str, tuple[int, float]],
        busy: Sequence[Path],
    ) -> _Round:
        """The blocking half of a round (thread pool)."""
        usage = self.sampler.sample_trees(t.pid for t in targets) if targets else {}
        host = read_host_memory()
        pinned: dict[ReplicaKey, list[int]] = {}
        by_key = {t.key: t for t in targets}
        for key, (cpus, done) in pins.items():
            tree = usage.get(by_key[key].pid)
            if tree is not None:
                # New descendants (they inherit the affinity, but may have been started before it was
                # set, by a process that escaped it) and any process that changed its own since.
                fresh = [p for p in tree.pids if p not in done]
                fresh += drifted((p for p in tree.pids if p in done), cpus)
                if fresh:
                    pinned[key] = apply_affinity(fresh, cpus)
        dead = [lease_id for lease_id, (pid, start) in external.items() if not _same_process(pid, start)]
        removed = []
        cgroups = self.manager.cgroup_manager
        if cgroups is not None:
            removed = [path for path in busy if cgroups.remove(path)]
        return _Round(usage=usage, host=host, pinned=pinned, dead_leases=dead, removed_cgroups=removed)

    def _act(self, targets: Sequence[Target], result: _Round, skipped: Sequence[Target] = ()) -> None:
        """The deciding half of a round (event loop); ``skipped``: live replicas not measured this round."""
        mgr = self.manager
        mgr.host = result.host
        for lease_id in result.dead_leases:
            lease = mgr.release(lease_id)
            if lease is not None:
                log.info("lease %s of %s released: its process %s exited", lease_id, lease.holder, lease.pid)
        for path in result.removed_cgroups:
            if path in mgr.busy_cgroups:
                mgr.busy_cgroups.remove(path)
        candidates = []
        for t in targets:
            usage = result.usage.get(t.pid)
            if usage is None or mgr.alive.get(t.key) != t.pid:
                continue  # exited while we measured: its state is already forgotten
            mgr.usage[t.key] = usage
            if t.key in result.pinned:
                mgr.pinned.setdefault(t.key, set()).update(result.pinned[t.key])
            self._check_budget(t, usage)
            budget = t.resources.memory
            candidates.append(Candidate(
                service=t.key[0], replica=t.key[1], key=t.key, pid=t.pid, priority=t.resources.priority,
                rss=usage.rss, soft=budget.soft if budget else None, hard=budget.hard if budget else None,
                started_at=t.started_at_ns,
            ))  # fmt: skip
        for t in skipped:  # measured in an earlier round: their last figures still count
            usage = mgr.usage.get(t.key)
            if usage is not None and mgr.alive.get(t.key) == t.pid:
                candidates.append(Candidate(
                    service=t.key[0], replica=t.key[1], key=t.key, pid=t.pid, priority=t.resources.priority,
                    rss=usage.rss, soft=None, hard=None, started_at=t.started_at_ns,
                ))  # fmt: skip
        if candidates:
            self._check_pressure(result.host, candidates)

    def _check_budget(self, t: Target, usage: TreeUsage) -> None:
        mgr = self.manager
        service, replica, incarnation = t.key
        for event in mgr.tracker.observe(t.key, usage.rss, t.resources.memory):
            fields: dict[str, Any] = {"service": service, "replica": replica, "incarnation": incarnation,
                                      "pid": t.pid, "rss": event.rss, "soft": event.soft, "hard": event.hard}
            if event.kind == "soft_cleared":
                mgr.bus.emit(m.BudgetCleared, **fields)
            elif event.kind == "soft_exceeded":
                log.warning("%s[%d] above its soft memory budget: %s > %s", service, replica,
                            format_size(event.rss), format_size(event.soft or 0))
                mgr.bus.emit(m.BudgetExceeded, **fields, limit="soft", action="event")
            else:
                detail = (f"process tree RSS {format_size(event.rss)} above the hard memory budget "
                          f"{format_size(event.hard or 0)}")
                log.warning("%s[%d]: %s; killing it", service, replica, detail)
                mgr.bus.emit(m.BudgetExceeded, **fields, limit="hard", action="kill")
                self.replicas.kill_for_resources(t.key, detail)

    def _check_pressure(self, host: HostMemory, candidates: list[Candidate]) -> None:
        mgr = self.manager
        decision = mgr.pressure.check(host.available, candidates)
        if decision is None:
            return
        victim = decision.victim
        assert isinstance(victim.key, tuple)
        log.error("memory pressure: %s", decision.reason)
        mgr.bus.emit(m.MemoryPressure, incarnation=victim.key[2], **decision.to_data())
        if not self.replicas.kill_for_resources(victim.key, f"host memory pressure: {decision.reason}"):
            mgr.pressure.victim_gone(victim.key)

    # --- NVML audit ----------------------------------------------------------------------------

    def audit_enabled(self) -> bool:
        """Only with NVML (it is what sees per-process device memory) and enforcement not ``off``."""
        mgr = self.manager
        return mgr.inventory.nvml is not None and mgr.gpu_settings.enforce != "off"

    async def run_audit(self) -> None:
        """Audit forever (cancelled at shutdown); returns at once when the audit is disabled."""
        if not self.audit_enabled():
            return
        while True:
            await asyncio.sleep(self.manager.gpu_settings.audit_interval)  # periodic by definition
            try:
                await self.audit_once()
            except Exception:
                log.exception("GPU audit round failed")

    async def audit_once(self) -> list[Violation]:
        """One audit round: read NVML in the thread pool, publish ``lease.violated``, enforce."""
        mgr = self.manager
        nvml = mgr.inventory.nvml
        if nvml is None:
            return []
        targets = self.replicas.sample_targets()
        roots = {t.pid: holder_of(t.key[0], t.key[1]) for t in targets}
        table = _FrozenTable(mgr.broker.table.devices, mgr.broker.table.leases())
        settings = mgr.gpu_settings
        enforce = "kill" if settings.enforce == "kill" else "warn"
        loop = asyncio.get_running_loop()
        violations, used = await loop.run_in_executor(
            mgr.executor, _audit_round, nvml, table, roots, enforce, settings.audit_slack
        )
        mgr.gpu_used = used
        by_holder = {holder_of(t.key[0], t.key[1]): t for t in targets}
        for v in violations:
            log.warning("lease violation by %s on %s: %s (%s used, budget %s)", v.holder, v.device, v.kind,
                        format_size(v.used), format_size(v.budget))
            mgr.bus.emit(m.LeaseViolated, **v.to_event())
            target = by_holder.get(v.holder)
            if v.action == "kill" and target is not None:
                what = "a device it does not lease" if v.kind == "foreign_device" else "more device memory than leased"
                self.replicas.kill_for_resources(target.key, f"GPU lease violated: {what} ({v.device})")
        return violations


def _audit_round(
    nvml: Nvml, table: _FrozenTable, roots: Mapping[int, str], enforce: Any, slack: int
) -> tuple[list[Violation], dict[str, dict[str, int]]]:
    """The blocking audit (thread pool): NVML snapshot, pid → holder resolution, violations, usage."""
    snapshot, errors = read_snapshot(nvml, [d.uuid for d in table.devices])
    for uuid, error in errors.items():
        log.warning("NVML could not list the processes on %s: %s", uuid, error)
    resolver = _cached(ProcessTreeResolver(roots))
    by_pid = {lease.pid: lease.holder for lease in table.leases() if lease.pid is not None}
    used: dict[str, dict[str, int]] = {}
    for uuid, processes in snapshot.items():
        for proc in processes:
            holder = by_pid.get(proc.pid) or resolver(proc.pid)
            if holder is not None and proc.used_memory is not None:
                per_device = used.setdefault(holder, {})
                per_device[uuid] = per_device.get(uuid, 0) + proc.used_memory
    return audit(table, snapshot, resolve=resolver, enforce=enforce, slack=slack), used  # type: ignore[arg-type]


def _cached(resolve: Callable[[int], str | None]) -> Callable[[int], str | None]:
    memo: dict[int, str | None] = {}

    def lookup(pid: int) -> str | None:
        if pid not in memo:
            memo[pid] = resolve(pid)
        return memo[pid]

    return lookup


def _same_process(pid: int, start_time: float) -> bool:
    """Whether ``pid`` still is the process that started at ``start_time`` (not a reused pid)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    state = stat[stat.rindex(b")") + 2 :].split()[:1]
    if state in ([b"Z"], [b"X"]):
        return False  # exited, waiting to be reaped
    try:
        return abs(psutil.Process(pid).create_time() - start_time) < 0.01
    except psutil.Error:
        return False
