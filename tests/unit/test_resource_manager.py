"""The kernel's resource manager and monitor, without a daemon: admission, placement and release,
restart-after-free and the NVML audit against a fake NVML, budget and pressure decisions on real
processes (only the kill is recorded instead of done)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop

from protocols.errors import ErrorCode, MicrokernelError
from microkernel.config import parse_config
from microkernel.resources.budgets import ServiceResources
from microkernel.resources.cpus import CpuBudget
from microkernel.resources.gpu import Device, GpuProcess, Inventory
from microkernel.resources.broker import LeaseBroker
from microkernel.resources.leases import GpuSpec, LeaseMode, LeaseRequest, LeaseTable
from microkernel.resources.manager import ExitFacts, ResourceManager
from microkernel.resources.memory import MemoryBudget
from microkernel.resources.monitor import Monitor, Target
from microkernel.resources.pressure import HostMemory
from microkernel.supervisor.process import spawn

GIB = 1024**3
MIB = 1024**2
T = TypeVar("T")


class Bus:
    """Records kernel events; building the message checks the fields like the real bus does."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def emit(self, event_type: type, **fields: Any) -> Any:
        event = event_type(seq=len(self.events) + 1, **fields)
        self.events.append((event_type.MSG_TYPE, fields))  # type: ignore[attr-defined]
        return event

    def topics(self) -> list[str]:
        return [topic for topic, _ in self.events]


class FakeNvml:
    """Per-device compute processes, changed by the test (or per read through ``on_call``)."""

    def __init__(self, devices: list[Device]) -> None:
        self._devices = devices
        self.processes: dict[str, list[GpuProcess]] = {}
        self.on_call: Callable[[FakeNvml], None] | None = None

    def devices(self) -> list[Device]:
        return list(self._devices)

    def compute_processes(self, uuid: str) -> list[GpuProcess]:
        if self.on_call is not None:
            self.on_call(self)
        return list(self.processes.get(uuid, []))


class Replicas:
    """The supervisor side: the targets, and kills recorded instead of done."""

    def __init__(self, targets: list[Target]) -> None:
        self.targets = targets
        self.killed: list[tuple[tuple[str, int, int], str]] = []

    def sample_targets(self) -> list[Target]:
        return list(self.targets)

    def kill_for_resources(self, key: tuple[str, int, int], detail: str) -> bool:
        self.killed.append((key, detail))
        return True


def run(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(factory())


FAKE_HOST = HostMemory(total=16 * GIB, available=12 * GIB)


def manager(config: str = "", *, devices: int = 0, nvml: FakeNvml | None = None,
            host: HostMemory | None = FAKE_HOST) -> tuple[ResourceManager, Bus]:
    """A manager on a fake 16 GiB host (``host=None``: the real one, as the monitor reads it)."""
    bus = Bus()
    mgr = ResourceManager(parse_config(config), bus=bus, host=host)
    if devices or nvml is not None:
        found = nvml.devices() if nvml is not None else [
            Device(index=i, uuid=f"GPU-{i}", name="fake", memory_total=8 * GIB, source="declared") for i in range(devices)
        ]
        mgr.inventory = Inventory(devices=tuple(found), source="nvml" if nvml else "declared", nvml=nvml)
        mgr.broker = LeaseBroker(LeaseTable(found))
    return mgr, bus


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


# --- admission ------------------------------------------------------------------------------------


def test_admission_reserves_hard_budgets_all_or_nothing() -> None:
    mgr, _ = manager('[kernel]\nmemory_pool = "1GiB"')
    budget = ServiceResources(memory=MemoryBudget(soft=200 * MIB, hard=400 * MIB))
    mgr.admit("a", budget, range(2))
    assert mgr.pool.used == 800 * MIB
    mgr.admit("a", budget, range(2))  # a restart: the slots already hold their reservation
    assert mgr.pool.used == 800 * MIB
    with pytest.raises(MicrokernelError) as refused:
        mgr.admit("b", budget, range(1))
    assert refused.value.code is ErrorCode.BAD_STATE
    assert refused.value.details == {"requested": 400 * MIB, "free": 224 * MIB, "capacity": 1024 * MIB}
    assert "b: not enough host memory for b[0]" in refused.value.reason
    mgr.admit("c", ServiceResources(), range(10))  # no hard budget: nothing to reserve
    mgr.release_slots("a", [1])
    mgr.admit("b", budget, range(1))
    assert mgr.pool.used == 800 * MIB


# --- placement and exit ---------------------------------------------------------------------------


def test_placement_env_cpus_and_release_on_exit() -> None:
    mgr, _ = manager(devices=2)
    mgr.cpus = (0, 1, 2, 3)
    resources = ServiceResources(cpus=CpuBudget(count=2), gpu=GpuSpec(count=1, memory=2 * GIB, mode=LeaseMode.SHARED))

    async def scenario() -> tuple[Any, Any, ExitFacts]:
        placement = await mgr.place("svc", 1, 1, resources, timeout=0)
        mgr.spawned(("svc", 1, 1), 4242, placement)
        bound = mgr.broker.table.leases()
        facts = mgr.exited(("svc", 1, 1), 4242, placement)
        return placement, bound, facts

    placement, bound, facts = run(scenario)
    assert placement.holder == "svc/1" and placement.cpus == (2, 3)
    assert placement.defaults["OMP_NUM_THREADS"] == "2" and placement.defaults["MK_CPU_THREADS"] == "2"
    assert placement.env["CUDA_VISIBLE_DEVICES"] == "GPU-0" and placement.env["MK_GPU_MEMORY_FRACTION"] == "0.250000"
    assert bound[0].pid == 4242
    assert [lease.id for lease in facts.released] == [bound[0].id] and facts.pids == (4242,)
    assert mgr.broker.table.leases() == ()
    assert mgr.place_now("plain", 0, ServiceResources()).env == {
        "CUDA_VISIBLE_DEVICES": "", "MK_GPU_LEASE": "", "MK_GPU_MEMORY_FRACTION": ""}


def test_an_abandoned_placement_gives_its_lease_back() -> None:
    mgr, _ = manager(devices=1)

    async def scenario() -> None:
        placement = await mgr.place("svc", 0, 1, ServiceResources(gpu=GpuSpec(count=1)), timeout=0)
        assert len(mgr.broker.table.leases()) == 1
        mgr.abandon(placement)

    run(scenario)
    assert mgr.broker.table.leases() == ()


# --- restart-after-free (fake NVML) ---------------------------------------------------------------


def _nvml() -> FakeNvml:
    return FakeNvml([Device(index=0, uuid="GPU-0", name="fake", memory_total=8 * GIB, source="nvml")])


def _dead_holder(mgr: ResourceManager, pid: int) -> ExitFacts:
    async def scenario() -> ExitFacts:
        placement = await mgr.place("svc", 0, 1, ServiceResources(gpu=GpuSpec(count=1)), timeout=0)
        mgr.spawned(("svc", 0, 1), pid, placement)
        return mgr.exited(("svc", 0, 1), pid, placement)

    return run(scenario)


def test_the_replacement_waits_until_nvml_no_longer_lists_the_dead_process() -> None:
    nvml = _nvml()
    mgr, bus = manager('[gpu]\nfree_timeout = "10s"', nvml=nvml)
    facts = _dead_holder(mgr, 777)
    nvml.processes["GPU-0"] = [GpuProcess(pid=777, used_memory=GIB)]
    reads = []

    def free_after_three_reads(n: FakeNvml) -> None:
        reads.append(1)
        if len(reads) >= 3:
            n.processes["GPU-0"] = []

    nvml.on_call = free_after_three_reads
    assert run(lambda: mgr.wait_gpu_freed("svc", 0, facts)) is True
    assert len(reads) >= 3 and bus.events == []


@pytest.mark.parametrize("policy,starts", [("start", True), ("fail", False)])
def test_memory_never_freed_follows_the_policy_and_says_so(policy: str, starts: bool) -> None:
    nvml = _nvml()
    mgr, bus = manager(f'[gpu]\nfree_timeout = "300ms"\non_free_timeout = "{policy}"', nvml=nvml)
    facts = _dead_holder(mgr, 777)
    nvml.processes["GPU-0"] = [GpuProcess(pid=777, used_memory=GIB)]
    assert run(lambda: mgr.wait_gpu_freed("svc", 0, facts)) is starts
    (topic, data), = bus.events
    assert topic == "lease.free_timed_out"
    assert data["devices"] == {"GPU-0": GIB} and data["action"] == policy


def test_without_nvml_the_replacement_starts_at_once() -> None:
    mgr, bus = manager(devices=1)
    facts = _dead_holder(mgr, 777)
    assert facts.released and run(lambda: mgr.wait_gpu_freed("svc", 0, facts)) is True
    assert bus.events == []


# --- NVML audit (fake NVML) ------------------------------------------------------------------------


@pytest.mark.parametrize("enforce,kills", [("warn", 0), ("kill", 1)])
def test_the_audit_publishes_violations_and_enforces(enforce: str, kills: int, sleeper: Any) -> None:
    nvml = FakeNvml([Device(index=i, uuid=f"GPU-{i}", name="fake", memory_total=8 * GIB, source="nvml")
                     for i in range(2)])  # fmt: skip
    mgr, bus = manager(f'[gpu]\nenforce = "{enforce}"\naudit_slack = "0"', nvml=nvml)
    key = ("svc", 0, 1)
    replicas = Replicas([Target(key=key, pid=sleeper.pid, resources=ServiceResources(), started_at_ns=1)])
    monitor = Monitor(mgr, replicas)
    assert monitor.audit_enabled()

    async def scenario() -> list[Any]:
        placement = await mgr.place("svc", 0, 1, ServiceResources(gpu=GpuSpec(count=1, memory=GIB,
                                                                             mode=LeaseMode.SHARED)), timeout=0)
        mgr.spawned(key, sleeper.pid, placement)
        leased = placement.lease.devices[0]
        other = "GPU-1" if leased == "GPU-0" else "GPU-0"
        nvml.processes = {leased: [GpuProcess(pid=sleeper.pid, used_memory=2 * GIB)],
                          other: [GpuProcess(pid=sleeper.pid, used_memory=MIB)]}
        return await monitor.audit_once()

    violations = run(scenario)
    assert sorted(v.kind for v in violations) == ["foreign_device", "over_budget"]
    assert bus.topics() == ["lease.violated", "lease.violated"]
    assert all(data["holder"] == "svc/0" and data["action"] == enforce for _, data in bus.events)
    assert len(replicas.killed) == 2 * kills
    assert sum(mgr.gpu_used["svc/0"].values()) == 2 * GIB + MIB
    assert mgr.replica_view(key, "svc/0")["gpu_memory"] == mgr.gpu_used["svc/0"]


def test_no_audit_without_nvml() -> None:
    mgr, _ = manager(devices=1)
    assert not Monitor(mgr, Replicas([])).audit_enabled()


# --- sampling: budgets and pressure on a real process ---------------------------------------------------


def _sample(mgr: ResourceManager, replicas: Replicas) -> None:
    async def scenario() -> None:
        for target in replicas.targets:
            mgr.spawned(target.key, target.pid, mgr.place_now(target.key[0], target.key[1], target.resources))
        monitor = Monitor(mgr, replicas)
        await monitor.sample_once()
        await monitor.sample_once()

    run(scenario)


def test_soft_then_hard_crossings_publish_once_and_kill_only_at_hard(sleeper: Any) -> None:
    mgr, bus = manager()
    soft_only = Target(key=("soft", 0, 1), pid=sleeper.pid, started_at_ns=1,
                       resources=ServiceResources(memory=MemoryBudget(soft=MIB, hard=None)))
    _sample(mgr, Replicas([soft_only]))
    assert bus.topics() == ["budget.exceeded"]  # once, although sampled twice
    assert bus.events[0][1]["limit"] == "soft" and bus.events[0][1]["action"] == "event"

    mgr, bus = manager()
    hard = dataclasses.replace(soft_only, key=("hard", 0, 1), resources=ServiceResources(memory=MemoryBudget(hard=MIB)))
    replicas = Replicas([hard])
    _sample(mgr, replicas)
    (topic, data), = bus.events
    assert topic == "budget.exceeded" and data["limit"] == "hard" and data["action"] == "kill"
    assert data["rss"] > MIB and data["pid"] == sleeper.pid
    assert [key for key, _ in replicas.killed] == [("hard", 0, 1)]
    assert "above the hard memory budget 1 MiB" in replicas.killed[0][1]


def test_host_pressure_kills_the_lowest_priority_replica_once(sleeper: Any) -> None:
    other = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        # Any real host is "under pressure" at 0.01 %.
        mgr, bus = manager('[kernel]\nmemory_pressure = "0.01%"', host=None)
        important = Target(key=("db", 0, 1), pid=sleeper.pid, started_at_ns=1, resources=ServiceResources(priority=10))
        batch = Target(key=("batch", 0, 1), pid=other.pid, started_at_ns=2, resources=ServiceResources(priority=-1))
        replicas = Replicas([important, batch])
        _sample(mgr, replicas)
    finally:
        other.kill()
        other.wait()
    (topic, data), = bus.events  # one victim: the next decision waits for it to go
    assert topic == "memory.pressure"
    assert data["service"] == "batch" and data["priority"] == -1 and data["candidates"] == 2
    assert [key for key, _ in replicas.killed] == [("batch", 0, 1)]
    assert replicas.killed[0][1].startswith("host memory pressure: ")


def test_a_lease_bound_to_a_client_process_is_released_when_it_exits(sleeper: Any) -> None:
    mgr, _ = manager(devices=1)

    async def scenario() -> None:
        lease = await mgr.acquire(LeaseRequest(holder="client@00", pid=sleeper.pid), timeout=0)
        monitor = Monitor(mgr, Replicas([]))
        await monitor.sample_once()
        assert [held.id for held in mgr.broker.table.leases()] == [lease.id]
        sleeper.kill()
        sleeper.wait()
        await monitor.sample_once()
        assert mgr.broker.table.leases() == ()
        with pytest.raises(MicrokernelError) as gone:
            await mgr.acquire(LeaseRequest(holder="client@00", pid=sleeper.pid), timeout=0)
        assert gone.value.code is ErrorCode.INVALID_FIELD

    run(scenario)


def test_an_inline_grant_never_overtakes_a_queued_request() -> None:
    mgr, _ = manager(devices=2)

    async def scenario() -> None:
        first = mgr.try_acquire(LeaseRequest(holder="a@00"))
        assert first is not None
        both = asyncio.ensure_future(mgr.acquire(LeaseRequest(holder="b@00", count=2), timeout=None))
        await asyncio.sleep(0)  # let it queue: it needs both devices
        assert len(mgr.broker.waiters()) == 1
        # One device is free, but the queued request comes first.
        assert mgr.try_acquire(LeaseRequest(holder="c@00")) is None
        mgr.release(first.id)
        assert (await both).holder == "b@00"
        # A client's request bound to a pid is never answered inline: its pid is checked in the pool.
        assert mgr.try_acquire(LeaseRequest(holder="d@00", pid=1)) is None

    run(scenario)


# --- cgroups (a stand-in manager: this host has no cgroup v2 memory controller) ---------------------


class FakeCgroups:
    """Records what the resource manager asks of a CgroupManager; ``kills`` is the OOM counter."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.kills = 0
        self.limits: dict[Path, tuple[int | None, int | None]] = {}

    def create(self, service: str, key: str) -> Path:
        path = self.root / f"{service}.{key}"
        path.mkdir()
        return path

    def set_memory(self, path: Path, high: int | None, max: int | None) -> None:
        self.limits[path] = (high, max)

    def set_oom_group(self, path: Path, enabled: bool = True) -> None:
        assert enabled

    def oom_kills(self, path: Path) -> int:
        return self.kills

    def remove(self, path: Path) -> bool:
        path.rmdir()
        return True


@pytest.mark.parametrize("kills,oom", [(0, False), (1, True)])
def test_each_replica_gets_a_cgroup_at_its_hard_budget_and_an_oom_kill_is_reported(
    kills: int, oom: bool, tmp_path: Path
) -> None:
    mgr, _ = manager()
    cgroups = FakeCgroups(tmp_path)
    mgr.cgroup_manager = cgroups  # type: ignore[assignment]
    resources = ServiceResources(memory=MemoryBudget(soft=MIB, hard=64 * MIB))
    assert mgr.needs_waiting(resources)

    async def scenario() -> ExitFacts:
        placement = await mgr.place("svc", 0, 3, resources, timeout=0)
        assert placement.cgroup == tmp_path / "svc.0.3" and placement.cgroup.is_dir()
        assert cgroups.limits[placement.cgroup] == (None, 64 * MIB)
        mgr.spawned(("svc", 0, 3), 4242, placement)
        cgroups.kills = kills
        return mgr.exited(("svc", 0, 3), 4242, placement)

    facts = run(scenario)
    assert facts.oom is oom
    assert list(tmp_path.iterdir()) == []


def test_spawn_sets_the_affinity_and_joins_the_cgroup_before_exec(tmp_path: Path) -> None:
    cpu = min(os.sched_getaffinity(0))
    (tmp_path / "cgroup.procs").write_text("")
    code = "import os; print(sorted(os.sched_getaffinity(0)), flush=True)"

    async def scenario() -> bytes:
        child = await spawn([sys.executable, "-c", code], env=dict(os.environ), stdout=asyncio.subprocess.PIPE,
                            cpus=[cpu], cgroup=tmp_path)
        assert child.stdout is not None
        out = await child.stdout.read()
        await child.wait()
        return out

    # The first thing the child does is report its affinity: it was set before exec.
    assert run(scenario).strip() == str([cpu]).encode()
    assert (tmp_path / "cgroup.procs").read_text() == "0"  # "0" = the writing process joins


def test_replicas_with_nothing_to_enforce_are_measured_less_often(sleeper: Any) -> None:
    from microkernel.resources.monitor import OBSERVE_EVERY

    mgr, _ = manager()
    budgeted = Target(key=("budgeted", 0, 1), pid=sleeper.pid, started_at_ns=1,
                      resources=ServiceResources(memory=MemoryBudget(hard=64 * GIB)))
    idle = Target(key=("idle", 0, 1), pid=sleeper.pid, started_at_ns=2, resources=ServiceResources())
    replicas = Replicas([budgeted, idle])
    seen: dict[str, list[object]] = {"budgeted": [], "idle": []}

    async def scenario() -> None:
        for target in replicas.targets:
            mgr.spawned(target.key, target.pid, mgr.place_now(target.key[0], target.key[1], target.resources))
        monitor = Monitor(mgr, replicas)
        for _ in range(OBSERVE_EVERY + 1):
            await monitor.sample_once()
            for name, target in (("budgeted", budgeted), ("idle", idle)):
                seen[name].append(mgr.usage[target.key])

    run(scenario)
    # The budgeted replica gets a fresh measurement every round ...
    assert len({id(u) for u in seen["budgeted"]}) == OBSERVE_EVERY + 1
    # ... the idle one in the first round and again OBSERVE_EVERY rounds later, its last figures kept between.
    assert len({id(u) for u in seen["idle"][:OBSERVE_EVERY]}) == 1
    assert seen["idle"][OBSERVE_EVERY] is not seen["idle"][0]
