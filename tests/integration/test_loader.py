"""The model loader under a real daemon: versions, defaults, events, store and file weights,
loads that do not block each other, and memory that really comes back after an unload."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import psutil
import pytest
import torch

from microkernel.client import Client
from protocols.errors import ErrorCode, RemoteError
from tests.fixtures.models import reference_state, write_weights
from tests.integration.conftest import KernelHandle, start_kernel

CEILING = 60.0
LINEAR = "tests.fixtures.models:LINEAR"
WIDE = "tests.fixtures.models:WIDE"
WIDE_WIDTH = 2896  # 2896² float32 = 32 MiB
MIB = 1 << 20

CONFIG = """
[services.store]
entry = "services.store:Store"
[services.loader]
entry = "services.loader:Loader"
depends_on = ["store"]
[services.wide]
entry = "services.inferencer:Inferencer"
depends_on = ["loader"]
[services.wide.config]
model = "wide"
weights = "{wide}"
max_batch_size = 4
max_queue_delay_ms = 1
"""


def write_wide(path: str) -> str:
    """A WIDE model (32 MiB of weights, all 0.5) for the memory test; its inferencer loads it at start."""
    state = {"weight": torch.full((WIDE_WIDTH, WIDE_WIDTH), 0.5), "bias": torch.zeros(WIDE_WIDTH)}
    return write_weights(path, state, arch=WIDE, config={"width": WIDE_WIDTH})


class Daemon:
    """The module's daemon and a scratch directory for weight files."""

    def __init__(self, handle: KernelHandle, client: Client, tmp: str) -> None:
        self.handle, self.client, self.tmp = handle, client, tmp

    def weights(self, name: str, state: dict[str, Any], arch: str = LINEAR, config: dict[str, Any] | None = None) -> str:
        return write_weights(os.path.join(self.tmp, f"{name}.safetensors"), state, arch=arch,
                             config=config if config is not None else {"width": 4})

    def pid(self, service: str) -> int:
        return self.client.status(service)["services"][0]["replicas"][0]["pid"]


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    # One daemon for the module: every torch service start costs seconds on a loaded machine.
    tmp = tempfile.mkdtemp(prefix="mk-", dir="/tmp")
    try:
        config = CONFIG.format(wide=write_wide(os.path.join(tmp, "wide.safetensors")))
        # Every service starts with the daemon: a start during a test would leave the kernel's
        # refilled warm standby process behind as that test's leftover.
        with start_kernel(config, tmp) as k, Client(runtime_dir=k.runtime_dir, timeout=CEILING) as c:
            c.wait_ready("wide", timeout=CEILING)
            yield Daemon(k, c, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def rows(c: Client, name: str) -> list[dict[str, Any]]:
    return [r for r in c.call("loader", "list") if r["name"] == name]


def test_versions_defaults_events_and_unload(daemon: Daemon) -> None:
    c = daemon.client
    one, two = reference_state(4, seed=1), reference_state(4, seed=2)
    with c.events("model.*") as stream:
        first = c.call("loader", "load", name="ver", weights=daemon.weights("ver1", one), arch=LINEAR)
        second = c.call("loader", "load", name="ver", weights=daemon.weights("ver2", two))  # arch from the file
        assert (first["version"], second["version"]) == (1, 2)
        assert first["arch"] == LINEAR and first["device"] == "cpu" and first["bytes"] == (16 + 4) * 4
        assert first["params"] == 20
        loaded = [stream.next_event(timeout=CEILING) for _ in range(2)]
        assert [(e.topic, e.message.data["version"]) for e in loaded] == [("model.loaded", 1), ("model.loaded", 2)]
        assert loaded[0].message.data == {"name": "ver", "version": 1, "arch": LINEAR, "bytes": 80, "device": "cpu"}

        listed = rows(c, "ver")
        assert [(r["version"], r["default"], r["state"]) for r in listed] == [(1, True, "ready"), (2, False, "ready")]
        assert c.call("loader", "get", name="ver")["version"] == 1  # the first loaded is the default
        c.call("loader", "set_default", name="ver", version=2)
        defaulted = stream.next_event(timeout=CEILING)
        assert (defaulted.topic, defaulted.message.data) == ("model.defaulted", {"name": "ver", "version": 2})
        handle = c.call("loader", "get", name="ver")
        assert handle["version"] == 2 and handle["arch"] == LINEAR and handle["config"]["width"] == 4
        assert set(handle["tensors"]) == {"weight", "bias"}
        assert all(t["offset"] % 64 == 0 for t in handle["tensors"].values())
        assert os.path.exists(f"/dev/shm/{handle['segment']}")
        # The handle maps to the very weights of version 2.
        with open(f"/dev/shm/{handle['segment']}", "rb") as f:
            raw = f.read()
        w = handle["tensors"]["weight"]
        got = np.frombuffer(raw, dtype=w["dtype"], count=16, offset=w["offset"]).reshape(w["shape"])
        np.testing.assert_array_equal(got, two["weight"].numpy())

        # Loading the same version from the same file again is idempotent; from another source it is refused.
        assert c.call("loader", "load", name="ver", version=2, weights=daemon.weights("ver2", two))["version"] == 2
        with pytest.raises(RemoteError) as clash:
            c.call("loader", "load", name="ver", version=2, weights=daemon.weights("ver1", one))
        assert clash.value.code == ErrorCode.BAD_STATE and "unload it first" in clash.value.reason

        reply = c.call("loader", "unload", name="ver", version=2)
        assert reply == {"unloaded": [{"name": "ver", "version": 2}], "freed_bytes": 80}
        unloaded = stream.next_event(timeout=CEILING)
        assert (unloaded.topic, unloaded.message.data) == ("model.unloaded", {"name": "ver", "version": 2})
        assert not os.path.exists(f"/dev/shm/{handle['segment']}")
        assert [(r["version"], r["default"]) for r in rows(c, "ver")] == [(1, True)]  # the default moved
        assert c.call("loader", "unload", name="ver")["unloaded"] == [{"name": "ver", "version": 1}]
    assert rows(c, "ver") == []
    with pytest.raises(RemoteError) as missing:
        c.call("loader", "get", name="ver")
    assert missing.value.code == ErrorCode.NOT_FOUND and "'ver'" in missing.value.reason


def test_bad_loads_fail_clearly_and_are_listed(daemon: Daemon) -> None:
    c = daemon.client
    with pytest.raises(RemoteError) as err:
        c.call("loader", "load", name="ghost", weights="/nonexistent/ghost.safetensors", arch=LINEAR)
    assert err.value.code == ErrorCode.NOT_FOUND and "ghost.safetensors" in err.value.reason
    with pytest.raises(RemoteError) as err:
        c.call("loader", "load", name="nomodel", weights=daemon.weights("nomodel", reference_state(4)),
               arch="tests.fixtures.models:NOPE")
    assert err.value.code == ErrorCode.NOT_FOUND and "NOPE" in err.value.reason
    with pytest.raises(RemoteError) as err:
        # Width-4 weights for a width-8 model.
        c.call("loader", "load", name="misfit", weights=daemon.weights("misfit", reference_state(4)), arch=LINEAR,
               config={"width": 8})
    assert err.value.code == ErrorCode.INVALID_FIELD and "do not fit" in err.value.reason
    assert [r["state"] for r in rows(c, "misfit")] == ["failed"] and "do not fit" in rows(c, "misfit")[0]["error"]
    with pytest.raises(RemoteError) as err:
        c.call("loader", "get", name="misfit")
    assert err.value.code == ErrorCode.BAD_STATE
    with pytest.raises(RemoteError) as err:
        c.call("loader", "load", name="bad/name")
    assert err.value.code == ErrorCode.INVALID_FIELD
    with pytest.raises(RemoteError) as err:
        c.call("loader", "load", name="absent")  # models/absent is not in the store
    assert err.value.code == ErrorCode.NOT_FOUND
    for name in ("ghost", "nomodel", "misfit"):
        c.call("loader", "unload", name=name)
    assert not [r for r in c.call("loader", "list") if r["state"] == "failed"]


def test_weights_from_the_store_carry_their_version_and_arch(daemon: Daemon) -> None:
    c = daemon.client
    state = reference_state(4, seed=7)
    tensors = {k: v.numpy() for k, v in state.items()}
    c.call("store", "put", key="models/stored", tensors=tensors, meta={"arch": LINEAR, "config": {"width": 4}})
    put = c.call("store", "put", key="models/stored", tensors=tensors, meta={"arch": LINEAR, "config": {"width": 4}})
    assert put["version"] == 2
    latest = c.call("loader", "load", name="stored")
    assert (latest["version"], latest["arch"]) == (2, LINEAR)
    assert c.call("loader", "load", name="stored", version=1)["version"] == 1
    handle = c.call("loader", "get", name="stored", version=1)
    assert handle["config"] == {"width": 4, "compute_ms": 0.0}
    # Any other key: the next free version of the name.
    c.call("store", "put", key="checkpoints/x/step-5", tensors=tensors, meta={"arch": LINEAR})
    assert c.call("loader", "load", name="stored", weights="checkpoints/x/step-5")["version"] == 3
    assert [r["source"] for r in rows(c, "stored")] == ["store:models/stored@1", "store:models/stored@2",
                                                          "store:checkpoints/x/step-5@1"]
    assert len(c.call("loader", "unload", name="stored")["unloaded"]) == 3


def test_a_slow_load_does_not_block_other_models(daemon: Daemon) -> None:
    c = daemon.client
    gate = os.path.join(daemon.tmp, "gate")
    os.mkfifo(gate)
    slow_weights = daemon.weights("slow", reference_state(4), arch="tests.fixtures.models:SLOW",
                                  config={"width": 4, "gate": gate})
    opened = threading.Event()
    try:
        with c.events("model.loaded") as stream:
            reply = c.call("loader", "load", name="slow", weights=slow_weights, wait=False)
            assert reply["state"] == "loading"
            # The same source again while it loads (two inferencer replicas starting together): the
            # same version, not a second one.
            again = c.call("loader", "load", name="slow", weights=slow_weights, wait=False)
            assert (again["version"], again["state"]) == (reply["version"], "loading")
            # While its build blocks on the gate: list, get, a whole load of another model and
            # inference on a third go through.
            assert [r["state"] for r in rows(c, "slow")] == ["loading"]
            fast = c.call("loader", "load", name="fast", weights=daemon.weights("fast", reference_state(4)), arch=LINEAR)
            assert fast["version"] == 1 and c.call("loader", "get", name="fast")["version"] == 1
            assert c.call("wide", "infer", input=[1.0] * WIDE_WIDTH)[0] == 0.5 * WIDE_WIDTH  # serving goes on
            assert [r["state"] for r in rows(c, "slow")] == ["loading"]
            assert stream.next_event(timeout=CEILING).message.data["name"] == "fast"
            with open(gate, "wb"):  # releases the build
                opened.set()
            event = stream.next_event(timeout=CEILING)
            assert event is not None and event.message.data["name"] == "slow"
        assert [r["state"] for r in rows(c, "slow")] == ["ready"]
    finally:
        if not opened.is_set():
            # Never leave the loader's build blocked on the FIFO: a waiting reader lets this open succeed.
            try:
                os.close(os.open(gate, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
    for name in ("slow", "fast"):
        c.call("loader", "unload", name=name)


def _rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def test_unload_gives_the_memory_back(daemon: Daemon) -> None:
    c = daemon.client
    handle = c.call("loader", "get", name="wide")
    model_bytes, segment = handle["bytes"], handle["segment"]
    assert model_bytes >= 32 * MIB
    x = [1.0] * WIDE_WIDTH
    assert c.call("wide", "infer", input=x)[:3] == [0.5 * WIDE_WIDTH] * 3  # every weight page touched
    assert c.call("wide", "stats")["model"]["shared"]
    loader_pid, replica_pid = daemon.pid("loader"), daemon.pid("wide")
    before = {"loader": _rss(loader_pid), "wide": _rss(replica_pid)}
    shm_before = os.statvfs("/dev/shm")
    with c.events("model.unloaded", "model.released") as stream:
        c.call("loader", "unload", name="wide")
        # The replica drops its mapping when it handles the same event, and says so.
        topics = {stream.next_event(timeout=CEILING).topic for _ in range(2)}
    assert topics == {"model.unloaded", "model.released"}
    assert c.call("wide", "stats")["model"] is None
    after = {"loader": _rss(loader_pid), "wide": _rss(replica_pid)}
    assert not os.path.exists(f"/dev/shm/{segment}")
    shm_after = os.statvfs("/dev/shm")
    freed_shm = (shm_after.f_bfree - shm_before.f_bfree) * shm_after.f_frsize
    for who in ("loader", "wide"):
        assert before[who] - after[who] >= model_bytes // 2, (who, before, after)
    assert freed_shm >= model_bytes // 2, freed_shm
    with pytest.raises(RemoteError) as gone:
        c.call("wide", "infer", input=x)
    assert gone.value.code == ErrorCode.NOT_FOUND
    # Loaded again: the replica, which had no model, maps the new copy and serves again.
    with c.events("model.mapped") as stream:
        reloaded = c.call("loader", "load", name="wide", weights=os.path.join(daemon.tmp, "wide.safetensors"))
        event = stream.next_event(timeout=CEILING)
    assert event is not None and event.message.data == {"name": "wide", "version": reloaded["version"],
                                                         "service": "wide", "replica": 0}
    assert c.call("wide", "infer", input=x)[:3] == [0.5 * WIDE_WIDTH] * 3
