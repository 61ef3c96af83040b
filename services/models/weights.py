"""state_dicts as numpy arrays (what the store keeps as safetensors) and back."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["from_numpy", "to_numpy"]


def to_numpy(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Contiguous CPU numpy copies of ``state``'s tensors (detached, same dtypes; never views of the
    live parameters, which the next optimizer step would change under a checkpoint)."""
    return {name: np.array(t.detach().cpu().numpy(), order="C", copy=True) for name, t in state.items()}


def from_numpy(tensors: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Writable torch tensors from numpy arrays (received arrays are read-only: copied once)."""
    return {name: torch.from_numpy(np.array(a, copy=True)) for name, a in tensors.items()}
