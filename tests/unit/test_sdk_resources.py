"""The service side of resources: the lease and CPU budget read back from the environment, and what
the runner applies to torch (a stand-in torch module: this venv has no torch, and the runner must
never import it itself)."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import pytest

from microkernel.resources.gpu import env_for
from microkernel.resources.leases import Lease, LeaseMode
from services.environment import GpuLease, cpu_threads, gpu_lease
from services.runner import apply_resource_limits

GIB = 1024**3


def lease_env() -> dict[str, str]:
    lease = Lease(id="lease-7", holder="t/0", pid=None, devices=("GPU-a", "GPU-b"), memory=4 * GIB,
                  mode=LeaseMode.SHARED)
    return env_for(lease, {"GPU-a": 16 * GIB, "GPU-b": 8 * GIB})


def test_the_lease_the_kernel_sets_reads_back() -> None:
    env = lease_env()
    lease = gpu_lease(env)
    assert lease == GpuLease(id="lease-7", devices=("GPU-a", "GPU-b"), memory=(4 * GIB, 4 * GIB), mode="shared",
                             fractions=(0.25, 0.5), env=env)
    assert json.loads(json.dumps(lease.to_dict()))["devices"] == ["GPU-a", "GPU-b"]
    assert gpu_lease(env_for(None, {})) is None
    assert gpu_lease({}) is None
    with pytest.raises(ValueError):
        gpu_lease({"MK_GPU_LEASE": "{not json"})


def test_cpu_threads() -> None:
    assert cpu_threads({"MK_CPU_THREADS": "4"}) == 4
    assert cpu_threads({}) is None and cpu_threads({"MK_CPU_THREADS": "x"}) is None
    assert cpu_threads({"MK_CPU_THREADS": "0"}) is None


class FakeTorch:
    """Records the calls the runner makes; ``cuda`` says whether CUDA is available."""

    def __init__(self, cuda: bool) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.cuda = SimpleNamespace(
            is_available=lambda: cuda,
            set_per_process_memory_fraction=lambda f, i: self.calls.append(("fraction", (f, i))),
        )

    def set_num_threads(self, n: int) -> None:
        self.calls.append(("threads", n))


def test_nothing_happens_without_torch_and_torch_is_never_imported() -> None:
    modules: dict[str, Any] = {}
    assert apply_resource_limits({**lease_env(), "MK_CPU_THREADS": "2"}, modules) == []
    assert modules == {}
    # In a fresh interpreter: other tests of this process may have imported torch already.
    check = ("import json, sys\n"
             "from services.runner import apply_resource_limits\n"
             f"apply_resource_limits(json.loads({json.dumps(json.dumps(lease_env()))}), sys.modules)\n"
             "assert 'torch' not in sys.modules, 'torch was imported'\n")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_threads_and_memory_fractions_are_applied_when_torch_is_imported() -> None:
    torch = FakeTorch(cuda=True)
    applied = apply_resource_limits({**lease_env(), "MK_CPU_THREADS": "2"}, {"torch": torch})
    assert torch.calls == [("threads", 2), ("fraction", (0.25, 0)), ("fraction", (0.5, 1))]
    assert len(applied) == 3


def test_without_cuda_only_the_threads_are_applied() -> None:
    torch = FakeTorch(cuda=False)
    applied = apply_resource_limits({**lease_env(), "MK_CPU_THREADS": "1"}, {"torch": torch})
    assert torch.calls == [("threads", 1)]
    assert applied[-1] == "GPU lease not applied: torch sees no CUDA device"
