"""The inferencer under a real daemon: store, loader and 2 inferencer replicas sharing one copy of a model."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import zmq

from microkernel import cli_models
from microkernel.async_client import AsyncClient
from microkernel.client import Client
from protocols import messages
from protocols.errors import ErrorCode, RemoteError
from protocols.transport import SyncRequester
from tests.fixtures.models import expected, reference_state, write_weights
from tests.integration.conftest import REPO_ROOT as REPO
from tests.integration.conftest import KernelHandle, start_kernel

CEILING = 60.0
ARCH = "tests.fixtures.models:LINEAR"


def inferencer(name: str, model: str, weights: str, *, replicas: int, batch: int, delay_ms: float, max_queue: int,
               compute_ms: float) -> str:
    return f"""
[services.{name}]
entry = "services.inferencer:Inferencer"
depends_on = ["loader"]
replicas = {replicas}
[services.{name}.config]
model = "{model}"
weights = "{weights}"
max_batch_size = {batch}
max_queue_delay_ms = {delay_ms}
max_queue = {max_queue}
model_config = {{ compute_ms = {compute_ms} }}
"""


def config_for(weights: str) -> str:
    # "inferencer": two replicas of the fast model; "slow": one replica whose batches of 1 take
    # 200 ms each, so a burst overflows its 4-deep queue and a short deadline expires in it.
    return ('[services.store]\nentry = "services.store:Store"\n'
            '[services.loader]\nentry = "services.loader:Loader"\ndepends_on = ["store"]\n'
            + inferencer("inferencer", "lin", weights, replicas=2, batch=16, delay_ms=20, max_queue=256, compute_ms=0)
            + inferencer("slow", "lin-slow", weights, replicas=1, batch=1, delay_ms=0, max_queue=4, compute_ms=200))


def cli_parser() -> tuple[argparse.ArgumentParser, dict]:
    """``mkctl``'s way of adding a command module, with only this one (as cli.py wires it)."""
    parser = argparse.ArgumentParser(prog="mkctl")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--timeout", type=float)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS)

    def command(name: str, help_text: str, **kwargs: object) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, parents=[common], **kwargs)

    return parser, cli_models.register(command)


def call_replica(c: Client, service: str, replica: int, method: str, **args: object) -> object:
    """Call one particular replica (the data plane balances over all of them)."""
    endpoint = c.status(service)["services"][0]["replicas"][replica]["endpoint"]
    requester = SyncRequester(zmq.Context.instance(), [endpoint], sender="test")
    try:
        return requester.request(messages.RpcRequest(method=method, args=args), timeout=CEILING).message.result
    finally:
        requester.close()


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[KernelHandle, Client, dict]]:
    # One daemon for the module: starting torch services costs seconds on a loaded machine.
    tmp = tempfile.mkdtemp(prefix="mk-", dir="/tmp")
    try:
        state = reference_state(4)
        weights = write_weights(os.path.join(tmp, "lin.safetensors"), state, arch=ARCH, config={"width": 4})
        with start_kernel(config_for(weights), tmp) as k, Client(runtime_dir=k.runtime_dir) as c:
            c.wait_ready("inferencer", timeout=CEILING)
            c.wait_ready("slow", timeout=CEILING)
            yield k, c, state
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def _many_clients(runtime_dir: Path, inputs: list[list[float]], concurrency: int) -> list[object]:
    async with AsyncClient(runtime_dir=runtime_dir, timeout=CEILING) as client:
        gate = asyncio.Semaphore(concurrency)

        async def one(x: list[float]) -> object:
            async with gate:
                return await client.call("inferencer", "infer", input=x)

        return list(await asyncio.gather(*(one(x) for x in inputs)))


def test_many_concurrent_clients_get_correct_results_in_batches(served: tuple[KernelHandle, Client, dict]) -> None:
    k, c, state = served
    inputs = [[float(i), float(i % 3), -1.0, 0.5 * i] for i in range(400)]
    results = asyncio.run(_many_clients(k.runtime_dir, inputs, concurrency=64))
    for x, y in zip(inputs, results):
        assert y == pytest.approx(expected(state, x), rel=1e-5, abs=1e-5)
    stats = [call_replica(c, "inferencer", r, "stats") for r in (0, 1)]
    assert sum(s["computed"] for s in stats) == len(inputs)
    assert all(s["errors"] == 0 and s["overloaded"] == 0 for s in stats)
    sizes = {int(size) for s in stats for size in s["batch_sizes"]}
    assert max(sizes) > 1, stats  # requests were batched
    assert all(s["latency_ms"]["p99"] is not None and s["queue_ms"]["p50"] is not None for s in stats)


def test_replicas_map_one_shared_copy(served: tuple[KernelHandle, Client, dict]) -> None:
    k, c, _ = served
    stats = [call_replica(c, "inferencer", r, "stats") for r in (0, 1)]
    segments = {s["model"]["segment"] for s in stats}
    assert len(segments) == 1 and all(s["model"]["shared"] for s in stats)  # parameters are views of it
    (segment,) = segments
    pids = [r["pid"] for r in c.status("inferencer")["services"][0]["replicas"]]
    loader_pid = c.status("loader")["services"][0]["replicas"][0]["pid"]
    for pid in [*pids, loader_pid]:
        mapped = {m.path for m in psutil.Process(pid).memory_maps(grouped=True)}
        assert f"/dev/shm/{segment}" in mapped, (pid, segment)
    rows = c.call("loader", "list")
    assert sorted((row["name"], row["state"]) for row in rows) == [("lin", "ready"), ("lin-slow", "ready")]


def test_infer_many_and_errors(served: tuple[KernelHandle, Client, dict]) -> None:
    _, c, state = served
    xs = [[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]]
    out = c.call("inferencer", "infer_many", inputs=xs)
    assert out == [pytest.approx(expected(state, x), rel=1e-5, abs=1e-5) for x in xs]
    with pytest.raises(RemoteError) as bad:
        c.call("inferencer", "infer", input=[1.0])
    assert bad.value.code == ErrorCode.HANDLER_ERROR and "list of 4 numbers" in bad.value.reason
    with pytest.raises(RemoteError) as bad:
        c.call("inferencer", "infer", input=[1.0, 2.0, 3.0, 4.0], deadline_ms=-5)
    assert bad.value.code == ErrorCode.INVALID_FIELD


def test_overload_and_deadlines_under_a_real_daemon(served: tuple[KernelHandle, Client, dict]) -> None:
    k, c, _ = served

    async def burst() -> list[object]:
        async with AsyncClient(runtime_dir=k.runtime_dir, timeout=CEILING) as client:
            x = [1.0, 2.0, 3.0, 4.0]
            calls = [client.call("slow", "infer", input=x) for _ in range(8)]
            return list(await asyncio.gather(*calls, return_exceptions=True))

    async def behind_a_batch() -> list[object]:
        async with AsyncClient(runtime_dir=k.runtime_dir, timeout=CEILING) as client:
            x = [1.0, 2.0, 3.0, 4.0]
            # The first computes for 200 ms; the second may wait 50 ms at most.
            calls = [client.call("slow", "infer", input=x),
                     client.call("slow", "infer", input=x, deadline_ms=50)]
            return list(await asyncio.gather(*calls, return_exceptions=True))

    outcomes = asyncio.run(burst())
    refused = [o for o in outcomes if isinstance(o, RemoteError)]
    assert refused and all(o.code == ErrorCode.OVERLOADED and "max_queue=4" in o.reason for o in refused)
    assert len(refused) <= 3  # 1 computing + 4 queued were accepted
    first, late = asyncio.run(behind_a_batch())
    assert isinstance(first, list)
    assert isinstance(late, RemoteError) and late.code == ErrorCode.DEADLINE_EXCEEDED
    stats = c.call("slow", "stats")
    assert stats["overloaded"] == len(refused) and stats["deadline_exceeded"] == 1
    assert stats["computed"] == 8 - len(refused) + 1


def _mkctl(c: Client, argv: list[str]) -> int:
    """Run an ``mkctl models``/``mkctl infer`` command line through this module's handlers."""
    parser, handlers = cli_parser()
    args = parser.parse_args(argv)
    return handlers[args.command](c, args)


def _wait_mapped(stream: object, version: int) -> None:
    """Until both replicas of "inferencer" announced serving ``version`` (others may come first)."""
    on: set[int] = set()
    while len(on) < 2:
        event = stream.next_event(timeout=CEILING)  # type: ignore[attr-defined]
        assert event is not None, f"only replicas {on} moved to version {version}"
        data = event.message.data
        if data["service"] == "inferencer" and data["version"] == version:
            on.add(data["replica"])


def test_mkctl_models_and_infer_follow_the_default(served: tuple[KernelHandle, Client, dict],
                                                  capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    _, c, state = served
    assert _mkctl(c, ["models", "ls"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:4] == ["NAME", "VERSION", "DEFAULT", "STATE"]
    assert any(line.split()[:4] == ["lin", "1", "*", "ready"] for line in table.splitlines())

    # Version 2 from the store, version 3 from a file given relative to mkctl's directory.
    other = reference_state(4, seed=9)
    c.call("store", "put", key="models/lin-next", tensors={k: v.numpy() for k, v in other.items()},
           meta={"arch": ARCH, "config": {"width": 4}})
    assert _mkctl(c, ["models", "load", "lin", "--weights", "models/lin-next"]) == 0
    assert capsys.readouterr().out.startswith("lin v2: ready (tests.fixtures.models:LINEAR,")
    write_weights(str(tmp_path / "v3.safetensors"), state, arch=ARCH, config={"width": 4})
    os.chdir(tmp_path)
    try:
        assert _mkctl(c, ["models", "load", "lin", "--weights", "v3.safetensors"]) == 0
    finally:
        os.chdir(REPO)
    assert capsys.readouterr().out.startswith("lin v3: ready")
    assert [r["source"] for r in c.call("loader", "list") if r["name"] == "lin"][1:] == [
        "store:models/lin-next@1", f"file:{tmp_path / 'v3.safetensors'}"]

    with c.events("model.mapped") as stream:
        assert _mkctl(c, ["models", "default", "lin", "2", "--json"]) == 0
        _wait_mapped(stream, 2)  # both replicas follow the default
    assert json.loads(capsys.readouterr().out) == {"name": "lin", "version": 2}
    assert _mkctl(c, ["infer", "--json-input", "[1, 2, 3, 4]", "[0, 0, 0, 0]"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in lines] == [pytest.approx(expected(other, [1, 2, 3, 4]), rel=1e-5),
                                                    pytest.approx(expected(other, [0, 0, 0, 0]), rel=1e-5, abs=1e-5)]
    assert _mkctl(c, ["infer", "--json-input", "[1, 2, 3, 4]", "--json"]) == 0
    (record,) = json.loads(capsys.readouterr().out)
    assert record["input"] == [1, 2, 3, 4] and record["result"] == pytest.approx(expected(other, [1, 2, 3, 4]), rel=1e-5)

    assert _mkctl(c, ["models", "unload", "lin", "--version", "3"]) == 0
    with c.events("model.mapped") as stream:
        assert _mkctl(c, ["models", "unload", "lin", "--version", "2"]) == 0
        _wait_mapped(stream, 1)  # the default went back to version 1, and the replicas with it
    assert capsys.readouterr().out.splitlines()[-1].startswith("unloaded lin v2 (")
    assert [r["version"] for r in c.call("loader", "list") if r["name"] == "lin"] == [1]
    assert c.call("inferencer", "infer", input=[1.0, 2.0, 3.0, 4.0]) == pytest.approx(
        expected(state, [1.0, 2.0, 3.0, 4.0]), rel=1e-5)


def test_an_inferencer_starting_while_the_loader_is_away_waits_for_it() -> None:
    # The loader restarting while an inferencer replica starts (found by the chaos soak): the
    # replica waits for it, reporting progress, instead of failing its start and being restarted.
    # Here the loader is simply not there yet (0 replicas, no depends_on) until the test scales it up.
    tmp = tempfile.mkdtemp(prefix="mk-", dir="/tmp")  # short: ipc paths are limited
    state = reference_state(4)
    weights = write_weights(os.path.join(tmp, "lin.safetensors"), state, arch=ARCH, config={"width": 4})
    config = ('[services.store]\nentry = "services.store:Store"\n'
              '[services.loader]\nentry = "services.loader:Loader"\ndepends_on = ["store"]\nreplicas = 0\n'
              + inferencer("inferencer", "lin", weights, replicas=1, batch=4, delay_ms=0, max_queue=16, compute_ms=0)
              .replace('depends_on = ["loader"]\n', ""))
    with start_kernel(config, tmp) as k, Client(runtime_dir=k.runtime_dir) as c:
        with c.events("service.progress", since_seq=0) as stream:
            while True:  # the replica found no loader and said it waits
                event = stream.next_event(timeout=CEILING)
                assert event is not None, "the inferencer never reported waiting for the loader"
                progress = event.message
                if progress.service == "inferencer" and "waiting for the loader (not_ready" in progress.message:
                    break
        c.scale("loader", 1)
        entry = c.wait_ready("inferencer", timeout=CEILING)
        assert entry["restarts"] == 0, entry  # the first start went through
        x = [1.0, 2.0, 3.0, 4.0]
        assert c.call("inferencer", "infer", input=x) == pytest.approx(expected(state, x), rel=1e-5, abs=1e-5)
    shutil.rmtree(tmp, ignore_errors=True)
