"""A loader killed with -9: inferencers keep serving from their mappings, then move to the reload."""

from __future__ import annotations

import os
import signal

import pytest

from microkernel.client import Client
from tests.fixtures.models import expected, reference_state, write_weights
from tests.integration.conftest import start_kernel

CEILING = 60.0
ARCH = "tests.fixtures.models:LINEAR"


def test_inferencers_survive_a_loader_crash_and_follow_the_reload(short_tmp: str) -> None:
    state = reference_state(4, seed=5)
    weights = write_weights(os.path.join(short_tmp, "lin.safetensors"), state, arch=ARCH, config={"width": 4})
    config = f"""
[services.loader]
entry = "services.loader:Loader"
backoff = {{ initial = "0s" }}
[services.inferencer]
entry = "services.inferencer:Inferencer"
depends_on = ["loader"]
[services.inferencer.config]
model = "lin"
weights = "{weights}"
"""
    x = [1.0, -1.0, 2.0, 0.5]
    with start_kernel(config, short_tmp) as k, Client(runtime_dir=k.runtime_dir, timeout=CEILING) as c:
        c.wait_ready("inferencer", timeout=CEILING)
        old = c.call("inferencer", "stats")["model"]["segment"]
        loader_pid = c.status("loader")["services"][0]["replicas"][0]["pid"]
        with c.events("service.ready") as stream:
            os.kill(loader_pid, signal.SIGKILL)
            while True:
                event = stream.next_event(timeout=CEILING)
                assert event is not None, "the loader was not restarted"
                if event.message.service == "loader":
                    break
        assert c.call("loader", "list") == []  # a new loader process: nothing loaded
        # The replica's mapping outlives the loader: it keeps serving the same weights.
        assert c.call("inferencer", "infer", input=x) == pytest.approx(expected(state, x), rel=1e-5)
        assert c.call("inferencer", "stats")["model"]["segment"] == old
        with c.events("model.mapped") as stream:
            reloaded = c.call("loader", "load", name="lin", weights=weights)
            event = stream.next_event(timeout=CEILING)
        assert reloaded["version"] == 1 and event is not None and event.message.data["version"] == 1
        new = c.call("inferencer", "stats")["model"]["segment"]
        assert new != old and new == c.call("loader", "get", name="lin")["segment"]
        assert c.call("inferencer", "infer", input=x) == pytest.approx(expected(state, x), rel=1e-5)
