"""A training run's state as store tensors + meta, and back.

A checkpoint is one ``put`` of ``checkpoints/<job>`` (a new version each time): the model's
``state_dict`` (``model.*``), the optimizer's per-parameter state (``optim.<index>.<name>``),
torch's RNG state (``rng.torch``) as tensors; step, last loss, seed and the optimizer's
``param_groups`` in the meta. The data position is the step itself: batches are a pure function
of (seed, step), so a resumed run draws exactly the batches the lost run would have drawn.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from protocols.errors import ErrorCode, MicrokernelError
from services.models.weights import from_numpy, to_numpy

__all__ = ["Checkpoint", "capture", "restore"]

_MODEL = "model."
_OPTIM = "optim."
_RNG = "rng.torch"


class Checkpoint:
    """Tensors and meta of one checkpoint, as stored (``tensors`` maps names to numpy arrays)."""

    __slots__ = ("meta", "tensors")

    def __init__(self, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self.tensors = tensors
        self.meta = meta

    @property
    def step(self) -> int:
        """The number of optimizer steps taken when it was written."""
        return int(self.meta["step"])

    @property
    def loss(self) -> float | None:
        """The last training loss before it was written."""
        loss = self.meta.get("loss")
        return None if loss is None else float(loss)

    def model_state(self) -> dict[str, torch.Tensor]:
        """The model's ``state_dict``."""
        return from_numpy({k[len(_MODEL):]: v for k, v in self.tensors.items() if k.startswith(_MODEL)})


def capture(model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, step: int, loss: float | None,
            extra_meta: dict[str, Any]) -> Checkpoint:
    """Copy the run's state (call between steps, on the training thread)."""
    tensors = {_MODEL + k: v for k, v in to_numpy(model.state_dict()).items()}
    opt = optimizer.state_dict()
    scalars: list[str] = []
    numbers: dict[str, float] = {}
    for index, state in opt["state"].items():
        for name, value in state.items():
            key = f"{_OPTIM}{index}.{name}"
            if torch.is_tensor(value):
                array = np.array(value.detach().cpu().numpy(), order="C", copy=True)
                if array.ndim == 0:  # stored as shape (1,): 0-d tensors are not portable everywhere
                    scalars.append(key)
                    array = array.reshape(1)
                tensors[key] = array
            else:
                numbers[key] = float(value)
    tensors[_RNG] = torch.get_rng_state().numpy().copy()
    meta = {**extra_meta, "step": step, "loss": loss, "param_groups": opt["param_groups"], "scalars": scalars,
            "numbers": numbers}
    return Checkpoint(tensors, meta)


def restore(checkpoint: Checkpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load ``checkpoint`` into a freshly built ``model`` and ``optimizer`` (``corrupted`` if it does not fit)."""
    meta = checkpoint.meta
    try:
        model.load_state_dict(checkpoint.model_state())
        scalars = set(meta.get("scalars", ()))
        state: dict[int, dict[str, Any]] = {}
        for key, array in checkpoint.tensors.items():
            if key.startswith(_OPTIM):
                index, _, name = key[len(_OPTIM):].partition(".")
                t = torch.from_numpy(np.array(array, copy=True))
                state.setdefault(int(index), {})[name] = t.reshape(()) if key in scalars else t
        for key, value in meta.get("numbers", {}).items():
            index, _, name = key[len(_OPTIM):].partition(".")
            state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        if _RNG in checkpoint.tensors:
            torch.set_rng_state(torch.from_numpy(np.array(checkpoint.tensors[_RNG], dtype=np.uint8, copy=True)))
    except (KeyError, RuntimeError, ValueError) as exc:
        raise MicrokernelError(ErrorCode.CORRUPTED, f"checkpoint at step {meta.get('step')} does not fit the model: {exc}") from None
