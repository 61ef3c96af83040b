"""The loader's placement on a leased GPU (skipped without CUDA; the CPU path is in tests/unit)."""

from __future__ import annotations

import pytest
import torch

from services.environment import GpuLease
from services.loader.layout import assemble, fill, plan, views
from services.loader.placement import device_for, place, release_device_memory
from tests.fixtures.models import LINEAR, expected, reference_state

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_a_model_over_shared_views_is_placed_on_the_leased_device() -> None:
    lease = GpuLease(id="lease-1", devices=("GPU-test",), memory=(0,), mode="exclusive")
    device = device_for(lease)
    assert device == "cuda:0"
    state = reference_state(4)
    buffer = memoryview(bytearray(4096))
    arrays = {k: v.numpy() for k, v in state.items()}
    layout = plan(arrays)
    fill(buffer, arrays, layout)
    model = place(assemble(LINEAR, {"width": 4}, views(buffer, layout)), device)
    assert all(p.device.type == "cuda" for p in model.parameters())
    x = [1.0, 2.0, 3.0, 4.0]
    out = LINEAR.infer_batch(model.cpu(), [x], {"width": 4, "compute_ms": 0.0})
    assert out[0] == pytest.approx(expected(state, x), rel=1e-5)
    del model
    release_device_memory(device)
