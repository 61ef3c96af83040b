"""Weights laid out in one shared-memory segment, and models built over views of it (no copy)."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from protocols.errors import ErrorCode, MicrokernelError
from protocols.shm import Segment
from services.environment import GpuLease
from services.loader.layout import ALIGN, Layout, assemble, fill, plan, shares, views
from services.loader.placement import device_for, place
from services.models.registry import Architecture
from tests.fixtures.models import LINEAR, expected, reference_state


def arrays_of(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in state.items()}


def test_plan_aligns_every_tensor_and_round_trips_on_the_wire() -> None:
    arrays = {"a": np.zeros(3, np.float32), "b": np.zeros((2, 5), np.int64), "c": np.zeros(0, np.float16)}
    layout = plan(arrays)
    assert [s.offset % ALIGN for s in layout.tensors.values()] == [0, 0, 0]
    assert layout.tensors["b"].offset == 64 and layout.size == 64 + 128
    assert layout.nbytes == 12 + 80
    wire = layout.to_wire()
    assert wire["b"] == {"dtype": "int64", "shape": [2, 5], "offset": 64}
    assert Layout.from_wire(wire, layout.size) == layout
    with pytest.raises(MicrokernelError) as err:
        Layout.from_wire(wire, 100)  # "b" would run past the end
    assert err.value.code == ErrorCode.INVALID_FIELD and "'b'" in err.value.reason


def test_a_model_built_over_a_read_only_mapping_shares_it_and_computes_right() -> None:
    state = reference_state(4, seed=3)
    arrays = arrays_of(state)
    layout = plan(arrays)
    owner = Segment.create(layout.size, tag="test")
    reader = None
    try:
        fill(owner.buffer, arrays, layout)
        reader = Segment.attach(owner.name)
        model = assemble(LINEAR, {"width": 4}, views(reader.buffer, layout))
        assert shares(model, reader.buffer) and not shares(model, owner.buffer)
        assert not any(p.requires_grad for p in model.parameters()) and not model.training
        x = [1.0, -2.0, 0.5, 3.0]
        with torch.inference_mode():
            got = model(torch.tensor([x]))[0].tolist()
        assert got == pytest.approx(expected(state, x), rel=1e-6)
        # The owner's writes show through: one copy, two mappings.
        np.frombuffer(owner.buffer, np.float32, count=4, offset=layout.tensors["bias"].offset)[:] = 0
        assert model.bias.tolist() == [0.0] * 4
        del model, got
        gc.collect()
        reader.close()  # no view left: unmapping works
        reader = None
    finally:
        if reader is not None:
            gc.collect()
            reader.close()
        owner.unlink()
        gc.collect()
        owner.close()


def test_weights_that_do_not_fit_are_invalid_field() -> None:
    arrays = arrays_of(reference_state(4))
    with pytest.raises(MicrokernelError) as err:
        assemble(LINEAR, {"width": 8}, {k: torch.from_numpy(v) for k, v in arrays.items()})
    assert err.value.code == ErrorCode.INVALID_FIELD and "'linear'" in err.value.reason
    with pytest.raises(MicrokernelError):
        assemble(LINEAR, {"width": 4}, {"weight": torch.zeros(4, 4)})  # bias missing


class WithMask(torch.nn.Module):
    """A model with a tensor outside its state_dict (cannot be built on the meta device)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(2))
        self.register_buffer("mask", torch.ones(2), persistent=False)


def test_models_with_non_persistent_buffers_are_built_for_real() -> None:
    arch = Architecture(name="masked", default_config={}, build=lambda c: WithMask(),
                        infer_batch=lambda m, xs, c: xs, example_inputs=lambda n: [0] * n)
    model = assemble(arch, {}, {"weight": torch.tensor([3.0, 4.0])})
    assert model.mask.tolist() == [1.0, 1.0] and model.weight.tolist() == [3.0, 4.0]


def test_placement_is_the_cpu_without_a_lease_and_the_first_leased_gpu_with_one() -> None:
    assert device_for(None) == "cpu"
    lease = GpuLease(id="lease-1", devices=("GPU-a", "GPU-b"), memory=(0, 0), mode="exclusive")
    assert device_for(lease) == "cuda:0"  # CUDA_VISIBLE_DEVICES puts the lease's first device at 0
    model = torch.nn.Linear(2, 2)
    assert place(model, "cpu") is model  # the shared views stay in place
