"""The NVML audit and the wait for a dead worker's device memory, against a fake NVML."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable, Coroutine
from typing import Any, Literal

import msgpack
import pytest
import uvloop

from microkernel.resources.audit import (
    FreeResult,
    ProcessTreeResolver,
    Violation,
    audit,
    read_snapshot,
    wait_device_memory_freed,
)
from microkernel.resources.gpu import Device, GpuProcess
from microkernel.resources.leases import Lease, LeaseMode, LeaseRequest, LeaseTable

GIB = 1024**3
SHARED, EXCLUSIVE = LeaseMode.SHARED, LeaseMode.EXCLUSIVE


class FakeNvml:
    """Per-device compute processes; ``fail`` makes a device raise; ``on_call`` changes state per read."""

    def __init__(self, processes: dict[str, list[GpuProcess]] | None = None) -> None:
        self.processes = processes or {}
        self.fail: dict[str, Exception] = {}
        self.calls = 0
        self.on_call: Callable[[FakeNvml], None] | None = None

    def compute_processes(self, uuid: str) -> list[GpuProcess]:
        self.calls += 1
        if self.on_call is not None:
            self.on_call(self)
        if uuid in self.fail:
            raise self.fail[uuid]
        return list(self.processes.get(uuid, []))


def table(*totals: int) -> LeaseTable:
    return LeaseTable(
        [Device(index=i, uuid=f"GPU-{i}", name="fake", memory_total=t, source="nvml") for i, t in enumerate(totals)]
    )


def grant(t: LeaseTable, holder: str, pid: int | None, *, memory: int = 0, mode: LeaseMode = EXCLUSIVE,
          count: int = 1) -> Lease:  # fmt: skip
    lease = t.try_grant(LeaseRequest(holder=holder, pid=pid, count=count, memory=memory, mode=mode))
    assert lease is not None
    return lease


def run(coro_factory: Callable[[], Coroutine[Any, Any, FreeResult]]) -> FreeResult:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro_factory())


# --- audit ---------------------------------------------------------------------------------------------


def test_usage_within_the_leases_is_clean() -> None:
    t = table(16 * GIB, 16 * GIB)
    grant(t, "a/0", 100, memory=8 * GIB, mode=SHARED)
    grant(t, "b/0", 200)
    snapshot = {
        "GPU-0": [GpuProcess(pid=100, used_memory=8 * GIB)],
        "GPU-1": [GpuProcess(pid=200, used_memory=16 * GIB)],
    }
    assert audit(t, snapshot) == []


def test_a_process_on_a_device_it_does_not_hold() -> None:
    t = table(16 * GIB, 16 * GIB)
    lease = grant(t, "a/0", 100, memory=4 * GIB, mode=SHARED)
    assert lease.devices == ("GPU-0",)
    snapshot = {"GPU-1": [GpuProcess(pid=100, used_memory=GIB)]}
    assert audit(t, snapshot) == [
        Violation(kind="foreign_device", holder="a/0", pids=(100,), device="GPU-1", used=GIB, budget=0, slack=0,
                  lease_ids=(), action="warn")  # fmt: skip
    ]


def test_over_budget_sums_the_holders_processes_and_respects_the_slack() -> None:
    t = table(16 * GIB)
    lease = grant(t, "a/0", 100, memory=8 * GIB, mode=SHARED)
    roots = {101: "a/0"}  # a data-loader child that opened its own CUDA context
    snapshot = {"GPU-0": [GpuProcess(pid=100, used_memory=7 * GIB), GpuProcess(pid=101, used_memory=2 * GIB)]}
    [violation] = audit(t, snapshot, resolve=roots.get, enforce="kill")
    assert violation == Violation(kind="over_budget", holder="a/0", pids=(100, 101), device="GPU-0", used=9 * GIB,
                                  budget=8 * GIB, slack=0, lease_ids=(lease.id,), action="kill")  # fmt: skip
    event = violation.to_event()
    assert event["over"] == GIB and event["action"] == "kill" and event["leases"] == [lease.id]
    msgpack.packb(event)
    assert audit(t, snapshot, resolve=roots.get, slack=GIB) == []


def test_several_leases_of_one_holder_add_up_on_a_device() -> None:
    t = table(16 * GIB)
    grant(t, "a/0", 100, memory=4 * GIB, mode=SHARED)
    grant(t, "a/0", 100, memory=4 * GIB, mode=SHARED)
    assert audit(t, {"GPU-0": [GpuProcess(pid=100, used_memory=8 * GIB)]}) == []
    [violation] = audit(t, {"GPU-0": [GpuProcess(pid=100, used_memory=8 * GIB + 1)]})
    assert violation.budget == 8 * GIB and len(violation.lease_ids) == 2


def test_a_static_lease_is_audited_through_the_process_tree() -> None:
    t = table(16 * GIB)
    grant(t, "svc/0", None, memory=2 * GIB, mode=SHARED)  # granted before spawn, pid not bound
    [violation] = audit(t, {"GPU-0": [GpuProcess(pid=555, used_memory=3 * GIB)]}, resolve={555: "svc/0"}.get)
    assert violation.kind == "over_budget" and violation.holder == "svc/0"


def test_a_whole_device_exclusive_lease_is_never_over_budget() -> None:
    t = table(16 * GIB)
    grant(t, "a/0", 100)
    assert audit(t, {"GPU-0": [GpuProcess(pid=100, used_memory=16 * GIB)]}) == []


def test_unknown_pids_and_unknown_usage() -> None:
    t = table(16 * GIB, 16 * GIB)
    grant(t, "a/0", 100, memory=GIB, mode=SHARED)
    snapshot = {
        "GPU-0": [GpuProcess(pid=100, used_memory=None), GpuProcess(pid=999, used_memory=15 * GIB)],
        "GPU-1": [GpuProcess(pid=100, used_memory=None)],
    }
    # pid 999 is nobody the kernel manages; unreported usage is not judged, a foreign device still is.
    [violation] = audit(t, snapshot)
    assert violation.kind == "foreign_device" and violation.device == "GPU-1" and violation.used == 0


def test_a_managed_process_without_any_lease_is_on_a_foreign_device() -> None:
    t = table(16 * GIB)
    [violation] = audit(t, {"GPU-0": [GpuProcess(pid=300, used_memory=GIB)]}, resolve={300: "c/0"}.get)
    assert (violation.kind, violation.holder, violation.budget) == ("foreign_device", "c/0", 0)


def test_read_snapshot_keeps_going_past_a_failing_device() -> None:
    nvml = FakeNvml({"GPU-0": [GpuProcess(pid=1, used_memory=5)]})
    nvml.fail["GPU-1"] = RuntimeError("NVML_ERROR_GPU_IS_LOST")
    snapshot, errors = read_snapshot(nvml, ["GPU-0", "GPU-1", "GPU-2"])
    assert snapshot == {"GPU-0": (GpuProcess(pid=1, used_memory=5),), "GPU-2": ()}
    assert errors == {"GPU-1": "RuntimeError: NVML_ERROR_GPU_IS_LOST"}


# --- pid → holder through the real process tree -------------------------------------------------------------


def test_process_tree_resolver_maps_descendants_to_their_replica() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        resolve = ProcessTreeResolver({os.getpid(): "me/0"})
        assert resolve(os.getpid()) == "me/0"
        assert resolve(child.pid) == "me/0"
        assert ProcessTreeResolver({child.pid: "child/0"})(os.getpid()) is None
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=30)
    assert resolve(child.pid) is None  # gone


# --- waiting for device memory to be freed -------------------------------------------------------------------


def test_wait_returns_once_the_dead_pid_is_gone_from_its_devices() -> None:
    nvml = FakeNvml({"GPU-0": [GpuProcess(pid=100, used_memory=GIB), GpuProcess(pid=7, used_memory=GIB)]})

    def free_after_three_reads(fake: FakeNvml) -> None:
        if fake.calls > 3:
            fake.processes["GPU-0"] = [GpuProcess(pid=7, used_memory=GIB)]  # someone else stays

    nvml.on_call = free_after_three_reads
    result = run(lambda: wait_device_memory_freed(nvml, ["GPU-0"], 100, timeout=30.0, poll=0))
    assert result.freed and result.held == {}
    assert nvml.calls == 4


def test_wait_gives_up_at_its_timeout_and_says_what_is_still_held() -> None:
    nvml = FakeNvml(
        {"GPU-0": [GpuProcess(pid=100, used_memory=3 * GIB)], "GPU-1": [GpuProcess(pid=101, used_memory=GIB)]}
    )
    # The tiny timeout is the behaviour under test.
    result = run(lambda: wait_device_memory_freed(nvml, ["GPU-0", "GPU-1"], [100, 101], timeout=0.05, poll=0.01))
    assert not result.freed
    assert result.held == {"GPU-0": 3 * GIB, "GPU-1": GIB}
    assert result.error == ""


def test_wait_treats_nvml_errors_as_not_freed_yet() -> None:
    nvml = FakeNvml({"GPU-0": []})
    nvml.fail["GPU-0"] = RuntimeError("NVML_ERROR_UNKNOWN")

    def recover(fake: FakeNvml) -> None:
        if fake.calls > 2:
            fake.fail.clear()

    nvml.on_call = recover
    assert run(lambda: wait_device_memory_freed(nvml, ["GPU-0"], 100, timeout=30.0, poll=0)).freed

    broken = FakeNvml()
    broken.fail["GPU-0"] = RuntimeError("NVML_ERROR_UNKNOWN")
    result = run(lambda: wait_device_memory_freed(broken, ["GPU-0"], 100, timeout=0, poll=0))
    assert not result.freed and result.error == "RuntimeError: NVML_ERROR_UNKNOWN"


def test_wait_with_nothing_held_returns_at_once() -> None:
    nvml = FakeNvml()
    result = run(lambda: wait_device_memory_freed(nvml, ["GPU-0"], 100, timeout=0))
    assert result.freed and nvml.calls == 1


@pytest.mark.parametrize("enforce", ["warn", "kill"])
def test_the_action_is_what_the_caller_asked_for(enforce: Literal["warn", "kill"]) -> None:
    t = table(16 * GIB)
    [violation] = audit(t, {"GPU-0": [GpuProcess(pid=1, used_memory=1)]}, resolve={1: "x/0"}.get, enforce=enforce)
    assert violation.action == enforce
