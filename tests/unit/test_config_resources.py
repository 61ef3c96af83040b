"""The resource keys of the config: budgets, priority, CPUs, GPU leases, [kernel] memory keys, [gpu]."""

from __future__ import annotations

import os
import textwrap

import pytest

from microkernel.config import ConfigError, parse_config
from microkernel.config_resources import DEFAULT_MEMORY_POOL, DEFAULT_SAMPLE_INTERVAL
from microkernel.resources.cpus import CpuBudget
from microkernel.resources.leases import GpuSpec, LeaseMode
from microkernel.resources.memory import MemoryBudget

GIB = 1024**3
MIB = 1024**2

FULL = """\
[kernel]
memory_pool = "8GiB"
memory_pressure = "90%"
memory_sample_interval = "100ms"

[gpu]
nvml = false
enforce = "kill"
audit_interval = "2s"
audit_slack = "256MiB"
free_timeout = "10s"
on_free_timeout = "fail"

[[gpu.device]]
uuid = "GPU-a"
name = "A100"
memory = "80GiB"

[[gpu.device]]
uuid = "GPU-b"
memory = "40GiB"

[services.trainer]
entry = "a.b:C"
memory = { soft = "1.5GiB", hard = "2GiB" }
priority = 5
cpus = 1
gpu = { count = 1, memory = "8GiB", mode = "shared" }

[services.plain]
entry = "a.b:C"
memory = "1GiB"
"""


def test_every_resource_key() -> None:
    config = parse_config(FULL)
    kernel = config.kernel
    assert (kernel.memory_pool, kernel.memory_pressure, kernel.memory_sample_interval) == ("8GiB", 0.9, 0.1)
    gpu = config.gpu
    assert (gpu.nvml, gpu.enforce, gpu.audit_interval, gpu.audit_slack) == (False, "kill", 2.0, 256 * MIB)
    assert (gpu.free_timeout, gpu.on_free_timeout) == (10.0, "fail")
    assert [(d.index, d.uuid, d.name, d.memory_total) for d in gpu.devices] == [
        (0, "GPU-a", "A100", 80 * GIB), (1, "GPU-b", "declared", 40 * GIB)]
    trainer = config.services["trainer"].resources
    assert trainer.memory == MemoryBudget(soft=1536 * MIB, hard=2 * GIB) and trainer.priority == 5
    assert trainer.cpus == CpuBudget(count=1)
    assert trainer.gpu == GpuSpec(count=1, memory=8 * GIB, mode=LeaseMode.SHARED)
    plain = config.services["plain"].resources
    assert plain.memory == MemoryBudget(soft=int(GIB * 0.9), hard=GIB) and plain.hard_memory == GIB
    assert plain.cpus is None and plain.gpu is None and plain.priority == 0


def test_defaults() -> None:
    config = parse_config('[services.x]\nentry = "a:B"')
    assert config.kernel.memory_pool == DEFAULT_MEMORY_POOL and config.kernel.memory_sample_interval == DEFAULT_SAMPLE_INTERVAL
    assert config.gpu.devices == () and config.gpu.enforce == "warn"
    assert config.services["x"].resources.to_wire() == {"memory": None, "priority": 0, "cpus": None, "gpu": None}


@pytest.mark.parametrize(
    "text,where,words",
    [
        ('[services.x]\nentry = "a:B"\nmemory = "lots"', "3: services.x.memory", "expected a size"),
        ('[services.x]\nentry = "a:B"\nmemory = { soft = "2GiB", hard = "1GiB" }', "3: services.x.memory.soft",
         "above the hard limit"),
        ('[services.x]\nentry = "a:B"\nmemory = { hard = "1GiB", max = "2GiB" }', "3: services.x.memory.max",
         "unknown key"),
        ('[services.x]\nentry = "a:B"\npriority = "high"', "3: services.x.priority", "expected an integer"),
        ('[services.x]\nentry = "a:B"\ncpus = 0', "3: services.x.cpus", "count >= 1"),
        ('[services.x]\nentry = "a:B"\ngpu = { count = 0 }', "3: services.x.gpu.count", "integer >= 1"),
        ('[services.x]\nentry = "a:B"\ngpu = { mode = "shared" }', "3: services.x.gpu.memory", "memory budget > 0"),
        ('[services.x]\nentry = "a:B"\n[services.x.env]\nCUDA_VISIBLE_DEVICES = "0"',
         "4: services.x.env.CUDA_VISIBLE_DEVICES", "set by the kernel"),
        ('[kernel]\nmemory_pool = "0%"', "2: kernel.memory_pool", "percentage"),
        ('[kernel]\nmemory_pressure = "150%"', "2: kernel.memory_pressure", "percentage"),
        ('[kernel]\nmemory_sample_interval = "0"\n[services.x]\nentry = "a:B"\nmemory = "1GiB"',
         "5: services.x.memory", "need sampling"),
        ('[gpu]\nenforce = "shout"', "2: gpu.enforce", "'off', 'warn', 'kill'"),
        ('[gpu]\non_free_timeout = "retry"', "2: gpu.on_free_timeout", "'start', 'fail'"),
        ('[gpu]\nnvm = true', "2: gpu.nvm", "did you mean 'nvml'"),
        ('[[gpu.device]]\nuuid = "GPU-a"\nmemory = "8GiB"\n\n[[gpu.device]]\nuuid = "GPU-a"\nmemory = "8GiB"',
         "6: gpu.device[1].uuid", "already declared"),
        ('[[gpu.device]]\nuuid = "GPU-a"\nmemory = "8GiB"\n\n[[gpu.device]]\nuuid = "GPU-b"', "5: gpu.device[1].memory",
         "missing"),
    ],
)
def test_errors_name_the_key_and_line(text: str, where: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(textwrap.dedent(text), source="k.toml")
    assert f"k.toml:{where}:" in str(err.value)
    assert words in str(err.value)


def test_cpu_lists_must_be_cpus_the_kernel_may_use() -> None:
    beyond = max(os.sched_getaffinity(0)) + 1
    with pytest.raises(ConfigError) as err:
        parse_config(f'[services.x]\nentry = "a:B"\ncpus = [{beyond}]')
    assert "not available to the kernel" in str(err.value)
