"""Data-parallel training: the rank environment the kernel hands out and the process group.

The kernel starts each replica of a distributed trainer with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` (torch's ``env://`` rendezvous, the port stable
across restarts) and ``MK_DIST_BACKEND``. A group is joined per job and left when the job ends;
a rank whose peer died gets an error from its next collective (or the group's timeout) and the
trainer exits its process, so the supervisor restarts it and every rank resumes from the last
checkpoint.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "join", "leave"]


@dataclass(frozen=True, slots=True, kw_only=True)
class DistEnv:
    """One rank's place in its group."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    backend: str

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None, *, cuda: bool = False) -> DistEnv | None:
        """The rank environment, or ``None`` when this process is not part of a group (no
        ``WORLD_SIZE``, or a world of one). ``cuda``: the replica holds CUDA devices (nccl default)."""
        env = os.environ if environ is None else environ
        world = int(env.get("WORLD_SIZE", env.get("MK_WORLD_SIZE", "1")) or 1)
        if world <= 1:
            return None
        backend = env.get("MK_DIST_BACKEND") or ("nccl" if cuda else "gloo")
        return cls(rank=int(env.get("RANK", env.get("MK_RANK", "0"))), world_size=world,
                   local_rank=int(env.get("LOCAL_RANK", "0")), master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                   master_port=int(env["MASTER_PORT"]), backend=backend)

    @property
    def device(self) -> torch.device:
        """Where this rank computes: its CUDA device under nccl, else the CPU."""
        if self.backend == "nccl":
            return torch.device("cuda", 0 if torch.cuda.device_count() == 1 else self.local_rank)
        return torch.device("cpu")


def join(env: DistEnv, timeout_s: float) -> None:
    """Join the group (blocks until every rank arrived, at most ``timeout_s``; raises after)."""
    if env.backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError("MK_DIST_BACKEND is nccl but this replica sees no CUDA device")
        torch.cuda.set_device(env.device)
    dist.init_process_group(
        backend=env.backend,
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def leave() -> None:
    """Leave the group joined by :func:`join` (a no-op when none is joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
