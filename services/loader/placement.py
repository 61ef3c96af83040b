"""Which device a model goes to: the replica's leased GPU, or the CPU without a lease."""

from __future__ import annotations

import torch

from services.environment import GpuLease

__all__ = ["device_for", "place", "release_device_memory"]


def device_for(lease: GpuLease | None) -> str:
    """``"cuda:0"`` (the first device of the lease, as ``CUDA_VISIBLE_DEVICES`` orders them) or ``"cpu"``."""
    if lease is None or not lease.devices:
        return "cpu"
    return "cuda:0"


def place(model: torch.nn.Module, device: str) -> torch.nn.Module:
    """``model`` on ``device``. On the CPU this is the model itself: its weights stay the shared views."""
    if device == "cpu":
        return model
    return model.to(torch.device(device))


def release_device_memory(device: str) -> None:
    """Hand cached GPU blocks back to the driver once a model on ``device`` was dropped."""
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()
