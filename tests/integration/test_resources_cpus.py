"""CPU budgets end to end: affinity of the replica's tree and thread counts in its environment."""

from __future__ import annotations

import os

import pytest

from microkernel.client import Client
from tests.integration.conftest import start_kernel
from tests.integration.test_resources_memory import MEMHOG, call_replica, sampling_rounds, until
from tests.integration.test_supervisor import CEILING

THREADS = ["OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MK_CPU_THREADS"]

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs at least two CPUs")


def test_cpus_set_the_affinity_and_the_thread_counts_of_each_replica(short_tmp: str) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    config = f"""
[kernel]
memory_sample_interval = "50ms"

[services.pinned]
{MEMHOG}
cpus = [{cpus[1]}]

[services.spread]
{MEMHOG}
replicas = 2
cpus = 1

[services.own]
{MEMHOG}
cpus = 2
env = {{ OMP_NUM_THREADS = "7" }}

[services.free]
{MEMHOG}
"""
    with start_kernel(config, short_tmp) as k, Client(runtime_dir=k.runtime_dir) as c:
        for name in ("pinned", "spread", "own", "free"):
            c.wait_ready(name, timeout=CEILING)
        assert c.call("pinned", "affinity") == [cpus[1]]
        assert c.call("pinned", "environ", names=THREADS) == dict.fromkeys(THREADS, "1")
        # Replicas of one service land on different CPUs while there are enough of them.
        spread = {tuple(call_replica(c, "spread", i, "affinity")) for i in (0, 1)}
        assert spread == {(cpus[0],), (cpus[1],)}
        # A variable the service sets itself wins over the derived one.
        assert c.call("own", "environ", names=THREADS) == {
            "OMP_NUM_THREADS": "7", "MKL_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2", "MK_CPU_THREADS": "2"}
        assert c.call("free", "affinity") == cpus
        status = {s["name"]: s for s in c.status()["services"]}
        assert status["pinned"]["replicas"][0]["cpus"] == [cpus[1]]
        assert status["pinned"]["resources"]["cpus"] == {"count": 1, "cpus": [cpus[1]]}
        assert status["free"]["replicas"][0]["cpus"] is None


def test_sampling_pins_descendants_that_widen_their_affinity(short_tmp: str) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    config = f"""
[kernel]
memory_sample_interval = "50ms"

[services.pinned]
{MEMHOG}
cpus = [{cpus[-1]}]
"""
    with start_kernel(config, short_tmp) as k, Client(runtime_dir=k.runtime_dir) as c:
        c.wait_ready("pinned", timeout=CEILING)
        child = c.call("pinned", "unpinned_child")
        first = sampling_rounds(c)
        until(lambda: sampling_rounds(c) >= first + 2, "two sampling rounds")
        until(lambda: sorted(os.sched_getaffinity(child)) == [cpus[-1]], "the child pinned again")
