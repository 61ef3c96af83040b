"""CPU budgets: parsing, placement of replicas on CPUs, thread counts, and affinity of real processes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from microkernel.resources.cpus import (
    THREAD_ENV,
    CpuBudget,
    CpuBudgetError,
    apply_affinity,
    drifted,
    parse_cpus,
    thread_env,
)


def test_a_count_spreads_replicas_over_the_available_cpus() -> None:
    budget = parse_cpus(2, available=range(8))
    assert budget == CpuBudget(count=2)
    assert [budget.affinity(i, range(8)) for i in range(5)] == [(0, 1), (2, 3), (4, 5), (6, 7), (0, 1)]
    assert parse_cpus(3, available=range(4)).affinity(1, range(4)) == (0, 1, 3)  # wraps around


def test_a_list_pins_every_replica_to_exactly_those_cpus() -> None:
    budget = parse_cpus([3, 1], available=range(4))
    assert budget == CpuBudget(count=2, cpus=(1, 3))
    assert budget.affinity(0, range(4)) == budget.affinity(5, range(4)) == (1, 3)
    assert budget.to_wire() == {"count": 2, "cpus": [1, 3]}


@pytest.mark.parametrize(
    "value,words",
    [
        (0, "count >= 1"),
        (9, "only use 4"),
        ([], "non-empty"),
        ([1, 1], "listed twice"),
        ([7], "not available"),
        (["0"], "integers"),
        (True, "expected a CPU count"),
        ("2", "expected a CPU count"),
    ],
)
def test_invalid_values_say_why(value: object, words: str) -> None:
    with pytest.raises(CpuBudgetError) as err:
        parse_cpus(value, available=range(4))
    assert words in err.value.reason


def test_thread_env_sets_every_library_and_the_sdk_variable() -> None:
    assert thread_env(3) == dict.fromkeys(THREAD_ENV, "3")
    assert set(THREAD_ENV) >= {"OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"}


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_apply_affinity_pins_every_thread_and_drifted_finds_processes_that_moved() -> None:
    first = min(os.sched_getaffinity(0))
    code = "import sys, threading; threading.Thread(target=sys.stdin.read).start(); print(flush=True); sys.stdin.read()"
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        child.stdout.readline()  # its second thread exists
        assert drifted([child.pid], [first]) == [child.pid]
        assert apply_affinity([child.pid, 999_999_999], [first]) == [child.pid]
        tids = [int(t) for t in os.listdir(f"/proc/{child.pid}/task")]
        assert len(tids) >= 2 and all(os.sched_getaffinity(t) == {first} for t in tids)
        assert drifted([child.pid], [first]) == []
    finally:
        child.kill()
        child.wait()
