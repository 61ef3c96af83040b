"""Where each tensor of a state_dict lies in one shared-memory segment, and models built over it.

The loader copies every tensor of a model into one segment at aligned offsets (``plan`` + ``fill``)
and hands out the layout; inferencer replicas map the same segment and build their model over
views of it (``views`` + ``assemble``): N replicas, one copy of the weights, no per-replica copy.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from protocols.errors import ErrorCode, MicrokernelError
from services.models.registry import Architecture

__all__ = ["ALIGN", "Layout", "TensorSlot", "assemble", "fill", "plan", "shares", "views"]

# Cache-line (and AVX-512) alignment for every tensor: kernels read the views at full speed.
ALIGN = 64


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorSlot:
    """One tensor in the segment: numpy dtype name, shape, byte offset."""

    dtype: str
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True, slots=True, kw_only=True)
class Layout:
    """Every tensor's slot and the segment size they need."""

    tensors: dict[str, TensorSlot]
    size: int

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data (without the alignment padding)."""
        return sum(slot.nbytes for slot in self.tensors.values())

    def to_wire(self) -> dict[str, dict[str, Any]]:
        """``{param: {"dtype", "shape", "offset"}}`` as the loader's ``get`` returns it."""
        return {name: {"dtype": s.dtype, "shape": list(s.shape), "offset": s.offset} for name, s in self.tensors.items()}

    @classmethod
    def from_wire(cls, tensors: Mapping[str, Mapping[str, Any]], size: int) -> Layout:
        """The layout of a handle from the loader's ``get``."""
        slots = {name: TensorSlot(dtype=str(t["dtype"]), shape=tuple(int(d) for d in t["shape"]), offset=int(t["offset"]))
                 for name, t in tensors.items()}
        for name, slot in slots.items():
            if slot.offset < 0 or slot.offset + slot.nbytes > size:
                raise MicrokernelError(ErrorCode.INVALID_FIELD, f"tensor {name!r} does not fit the {size}-byte segment")
        return cls(tensors=slots, size=size)


def plan(arrays: Mapping[str, np.ndarray]) -> Layout:
    """Aligned offsets for ``arrays`` (name -> numpy array), in their order."""
    slots: dict[str, TensorSlot] = {}
    offset = 0
    for name, array in arrays.items():
        slots[name] = TensorSlot(dtype=array.dtype.name, shape=tuple(array.shape), offset=offset)
        offset += -(-array.nbytes // ALIGN) * ALIGN
    return Layout(tensors=slots, size=max(offset, ALIGN))


def fill(buffer: memoryview, arrays: Mapping[str, np.ndarray], layout: Layout) -> None:
    """Copy ``arrays`` into ``buffer`` (the writable mapping) at their slots."""
    for name, slot in layout.tensors.items():
        target = np.frombuffer(buffer, dtype=slot.dtype, count=int(np.prod(slot.shape, dtype=np.int64)), offset=slot.offset)
        np.copyto(target.reshape(slot.shape), arrays[name], casting="no")
        del target  # no view of the mapping may outlive this call


def views(buffer: memoryview, layout: Layout) -> dict[str, torch.Tensor]:
    """Torch tensors over ``buffer`` at the layout's slots (no copy; read-only when it is)."""
    out: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():
        # A read-only mapping gives non-writable arrays; inference never writes to the weights.
        warnings.filterwarnings("ignore", message=".*not writable.*", category=UserWarning)
        for name, slot in layout.tensors.items():
            count = int(np.prod(slot.shape, dtype=np.int64))
            array = np.frombuffer(buffer, dtype=slot.dtype, count=count, offset=slot.offset).reshape(slot.shape)
            out[name] = torch.from_numpy(array)
    return out


def _has_meta(model: torch.nn.Module) -> bool:
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def assemble(arch: Architecture, config: dict[str, Any], state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """``arch``'s model with ``state``'s tensors as its parameters (assigned, not copied), in eval mode.

    The model is first built on the meta device (no memory for weights that are replaced at once);
    an architecture that makes tensors outside its state_dict (non-persistent buffers) is built for
    real instead. Mismatched names or shapes are ``invalid_field`` errors naming the model.
    """
    with torch.device("meta"):
        model = arch.build(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise MicrokernelError(ErrorCode.INVALID_FIELD, f"the weights do not fit model {arch.name!r}: {exc}") from None
    if _has_meta(model):
        model = arch.build(config)
        model.load_state_dict(state, strict=True, assign=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def shares(model: torch.nn.Module, buffer: memoryview) -> bool:
    """Whether every parameter of ``model`` lies inside ``buffer`` (built over it, not copied)."""
    start = np.frombuffer(buffer, dtype=np.uint8, count=1).ctypes.data
    end = start + len(buffer)
    return all(start <= p.data_ptr() and p.data_ptr() + p.numel() * p.element_size() <= end for p in model.parameters())
