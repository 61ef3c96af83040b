"""Distributed services: the replicas of one service as the ranks of one torch.distributed group.

The kernel hands out what a rank needs to join its group and nothing more: its rank (the replica
index), the world size (the service's replica count) and a rendezvous address (``MASTER_ADDR`` /
``MASTER_PORT``, torch's ``env://`` initialisation). The port is chosen once per service and kept
across restarts of its replicas, so a restarted rank finds its peers where they are.

Failure model: a rank that loses a peer gets an error from its next collective and exits; the
supervisor restarts it like any replica, and every rank rejoins the same rendezvous (see
``docs/services.md``). A change of the replica count changes the world size, so scaling a running
distributed service restarts all of its ranks.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

BACKENDS = ("gloo", "nccl", "mpi")


@dataclass(frozen=True, slots=True, kw_only=True)
class DistributedSpec:
    """``distributed = { backend = "gloo", port = 29500, master_addr = "127.0.0.1" }`` of a service."""

    backend: str = "gloo"
    """The torch.distributed backend the ranks should use (``gloo`` on CPU, ``nccl`` on GPUs)."""
    port: int | None = None
    """Fixed rendezvous port; ``None`` lets the kernel pick a free one when the service is set up."""
    master_addr: str = "127.0.0.1"
    """Where rank 0 listens for the rendezvous (this host unless the group spans hosts)."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.port is not None and not 1 <= self.port <= 65535:
            raise ValueError(f"port must be in 1..65535, got {self.port!r}")
        if not self.master_addr:
            raise ValueError("master_addr must not be empty")


def free_port(addr: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now at ``addr`` (the OS picks it)."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((addr, 0))
        return int(sock.getsockname()[1])


def rank_environment(spec: DistributedSpec, *, rank: int, world_size: int, port: int) -> dict[str, str]:
    """The variables a rank reads: torch's ``env://`` set plus the kernel's own ``MK_*`` names."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of size {world_size}")
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": spec.master_addr,
        "MASTER_PORT": str(port),
        "MK_RANK": str(rank),
        "MK_WORLD_SIZE": str(world_size),
        "MK_DIST_BACKEND": spec.backend,
    }
