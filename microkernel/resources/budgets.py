"""What one service declares about resources: memory budget, kill priority, CPUs, GPU lease.

A plain frozen value on :class:`~microkernel.supervisor.spec.ServiceSpec` (``spec.resources``),
built by the config loader and read by the kernel's resource manager.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from microkernel.resources.cpus import CpuBudget
from microkernel.resources.leases import GpuSpec
from microkernel.resources.memory import MemoryBudget

__all__ = ["ServiceResources"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceResources:
    """A service's resource declarations; every part is optional.

    ``priority`` orders victims under host memory pressure (lower is killed first) and GPU lease
    waiters (higher is served first): one number, one meaning — how much the service matters.
    """

    memory: MemoryBudget | None = None
    priority: int = 0
    cpus: CpuBudget | None = None
    gpu: GpuSpec | None = None

    @property
    def hard_memory(self) -> int:
        """Bytes one replica reserves in the kernel's memory pool (its hard budget; 0 without one)."""
        return self.memory.hard if self.memory is not None and self.memory.hard is not None else 0

    def to_wire(self) -> dict[str, Any]:
        """The msgpack-native form used in status replies (``ServiceStatus.resources``)."""
        gpu = self.gpu
        return {
            "memory": None if self.memory is None else self.memory.to_wire(),
            "priority": self.priority,
            "cpus": None if self.cpus is None else self.cpus.to_wire(),
            "gpu": None if gpu is None else {"count": gpu.count, "memory": gpu.memory, "mode": gpu.mode.value},
        }
