"""The trainer under a real daemon with a real store: jobs, progress, checkpoints, resume, errors.

Tiny model config and a few dozen steps keep each job to seconds. Every wait is on an event
(``train.*``, ``service.*``) with a generous ceiling.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from microkernel import cli_train
from microkernel.client import Client, EventStream
from protocols import wire
from protocols.errors import ErrorCode, RemoteError
from tests.integration.conftest import KernelHandle, start_kernel

CEILING = 60.0
TINY = {"d_model": 32, "n_heads": 2, "n_layers": 1, "context": 32}
CONFIG = """
[services.store]
entry = "services.store:Store"

[services.trainer]
entry = "services.trainer:Trainer"
depends_on = ["store"]
backoff = { initial = "0s" }
start_timeout = "60s"
[services.trainer.config]
progress_every = 5
"""


def data(env: wire.Envelope) -> dict[str, Any]:
    """An event's body."""
    return wire.body_of(env.message)


def wait_for(stream: EventStream, predicate: Callable[[wire.Envelope], bool], seen: list[wire.Envelope] | None = None,
             timeout: float = CEILING) -> wire.Envelope:
    """The first event satisfying ``predicate``; every event read is appended to ``seen``."""
    end = time.monotonic() + timeout
    topics = []
    while (left := end - time.monotonic()) > 0:
        env = stream.next_event(left)
        if env is None:
            break
        topics.append(env.msg_type)
        if seen is not None:
            seen.append(env)
        if predicate(env):
            return env
    pytest.fail(f"no matching event within {timeout:g}s; saw {topics[-20:]}")


def of_job(topic: str, job: str, **fields: Any) -> Callable[[wire.Envelope], bool]:
    """Matches the event ``topic`` about ``job`` (with ``fields``)."""
    def match(env: wire.Envelope) -> bool:
        if env.msg_type != topic:
            return False
        body = data(env)
        return body.get("job") == job and all(body.get(k) == v for k, v in fields.items())
    return match


def mkctl_train(client: Client, argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run a ``mkctl train`` handler (parsed by ``cli_train.register``) with ``client``; its exit code and stdout."""
    root = argparse.ArgumentParser(prog="mkctl")
    sub = root.add_subparsers(dest="command", required=True)
    handlers = cli_train.register(lambda name, help_text, **kw: sub.add_parser(name, help=help_text, **kw))
    args = root.parse_args(argv)
    for key, default in {"json": False, "timeout": None}.items():
        if not hasattr(args, key):
            setattr(args, key, default)
    capsys.readouterr()
    code = handlers[args.command](client, args)
    return code, capsys.readouterr().out


@pytest.fixture
def kernel_config() -> str:
    return CONFIG


@pytest.fixture
def client(kernel: KernelHandle) -> Iterator[Client]:
    """A client of a fresh daemon (store + trainer) whose trainer is ready."""
    with Client(runtime_dir=kernel.runtime_dir, timeout=CEILING) as c:
        c.wait_ready("trainer", timeout=CEILING)
        yield c


def test_loss_falls_and_the_final_weights_are_stored_for_the_loader(client: Client,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    with client.events("train.*") as stream:
        reply = client.call("trainer", "train_start", job="falls", config=TINY, steps=60, batch_size=16,
                            checkpoint_every=20, optimizer={"name": "adamw", "lr": 1e-2})
        assert reply == {"job": "falls", "state": "running", "step": 0, "steps": 60}
        seen: list[wire.Envelope] = []
        finished = data(wait_for(stream, of_job("train.finished", "falls"), seen))
    progress = [data(e) for e in seen if of_job("train.progress", "falls")(e)]
    steps = [p["step"] for p in progress]
    assert steps == sorted(steps) and steps[-1] == 60 and len(steps) >= 4
    assert all(p["steps"] == 60 and p["samples_per_s"] > 0 and (p["rank"], p["world_size"]) == (0, 1) for p in progress)
    assert progress[-1]["loss"] < progress[0]["loss"] - 0.5, [p["loss"] for p in progress]
    checkpointed = [data(e)["step"] for e in seen if of_job("train.checkpointed", "falls")(e)]
    assert checkpointed == [20, 40]
    assert finished["step"] == 60 and finished["weights"] == "models/charformer"

    stored = client.call("store", "get", key=finished["weights"], version=finished["version"])
    assert stored["kind"] == "tensors" and "tok.weight" in stored["tensors"]
    assert stored["meta"]["arch"] == "charformer" and stored["meta"]["job"] == "falls"
    assert stored["meta"]["step"] == 60 and stored["meta"]["config"]["d_model"] == 32
    status = client.call("trainer", "train_status", job="falls")
    assert status["state"] == "finished" and status["step"] == 60 and status["weights"] == "models/charformer"
    assert any(s["job"] == "falls" for s in client.call("trainer", "train_status"))

    # mkctl train start --follow: a dataset from the store, trained for epochs, weights named explicitly.
    text = ("the cat sat on the mat. " * 40).encode()
    client.call("store", "put", key="datasets/cats", data=text)
    code, out = mkctl_train(client, ["train", "start", "--job", "cats", "--config", json.dumps(TINY), "--dataset",
                                     "datasets/cats", "--epochs", "2", "--batch-size", "8", "--checkpoint-every", "0",
                                     "--name", "cats", "--follow", "--json"], capsys)
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and lines[-1]["topic"] == "train.finished" and lines[-1]["weights"] == "models/cats"
    expected_steps = -(-2 * ((len(text) - 1) // 32) // 8)
    assert lines[-1]["step"] == expected_steps and any(x["topic"] == "train.progress" for x in lines)
    assert client.call("store", "stat", key="models/cats")["meta"]["dataset"] == "datasets/cats"
    code, out = mkctl_train(client, ["train", "status"], capsys)
    assert code == 0 and out.splitlines()[0].split()[:3] == ["JOB", "STATE", "STEP"]
    assert {line.split()[0] for line in out.splitlines()[1:]} == {"falls", "cats"}
    code, out = mkctl_train(client, ["train", "follow", "cats"], capsys)
    assert code == 0 and out.strip() == f"cats: finished at step {expected_steps} (loss {lines[-1]['loss']:.4f})"


def test_train_stop_one_job_at_a_time_and_bad_requests(client: Client, capsys: pytest.CaptureFixture[str]) -> None:
    assert_bad_requests(client)
    with client.events("train.*") as stream:
        client.call("trainer", "train_start", job="long", config=TINY, steps=100_000, batch_size=8)
        wait_for(stream, of_job("train.progress", "long"))
        code, out = mkctl_train(client, ["train", "status", "long", "--json"], capsys)
        assert code == 0 and json.loads(out)["state"] == "running" and json.loads(out)["step"] > 0
        with pytest.raises(RemoteError) as busy:
            client.call("trainer", "train_start", job="second", config=TINY, steps=10)
        assert busy.value.code == ErrorCode.BAD_STATE and "'long' is running" in busy.value.reason
        code, out = mkctl_train(client, ["train", "stop", "long", "--json"], capsys)
        stopped = json.loads(out)
        assert code == 0 and stopped["state"] == "stopped" and 0 < stopped["step"] < 100_000
        wait_for(stream, of_job("train.stopped", "long"))
    status = client.call("trainer", "train_status", job="long")
    assert status["state"] == "stopped" and status["step"] == stopped["step"]
    # The stop wrote a checkpoint at the step it stopped at.
    assert client.call("store", "stat", key="checkpoints/long")["meta"]["step"] == stopped["step"]
    with pytest.raises(RemoteError) as again:
        client.call("trainer", "train_start", job="long", config=TINY, steps=10)
    assert again.value.code == ErrorCode.BAD_STATE and "already exists" in again.value.reason

    # A graceful restart (SIGTERM) checkpoints where the loop paused, and the job resumes exactly there.
    with client.events("train.*") as stream:
        client.call("trainer", "train_start", job="paused", config=TINY, steps=100_000, batch_size=8, checkpoint_every=0)
        wait_for(stream, of_job("train.progress", "paused"))
        client.restart("trainer", timeout=CEILING)
        paused = data(wait_for(stream, of_job("train.checkpointed", "paused")))
        resumed = data(wait_for(stream, of_job("train.resumed", "paused")))
        assert resumed["step"] == paused["step"] > 0
        wait_for(stream, lambda e: of_job("train.progress", "paused")(e) and data(e)["step"] > resumed["step"])
    assert client.call("trainer", "train_stop", job="paused")["state"] == "stopped"


BAD_REQUESTS: list[tuple[dict[str, Any], ErrorCode, str]] = [
    ({"model": "no-such-model", "steps": 5}, ErrorCode.NOT_FOUND, "unknown model 'no-such-model'"),
    ({"model": "no_such_pkg.mod:ARCH", "steps": 5}, ErrorCode.NOT_FOUND, "cannot import module"),
    ({"steps": 0}, ErrorCode.INVALID_FIELD, "steps must be an integer"),
    ({"steps": "ten"}, ErrorCode.INVALID_FIELD, "steps must be an integer"),
    ({}, ErrorCode.INVALID_FIELD, "exactly one of steps or epochs"),
    ({"steps": 5, "epochs": 1}, ErrorCode.INVALID_FIELD, "exactly one of steps or epochs"),
    ({"steps": 5, "batch_size": 0}, ErrorCode.INVALID_FIELD, "batch_size"),
    ({"steps": 5, "config": {"layers": 3}}, ErrorCode.INVALID_FIELD, "no config key(s) layers"),
    ({"steps": 5, "config": {"d_model": 30, "n_heads": 4}}, ErrorCode.INVALID_FIELD, "not divisible"),
    ({"steps": 5, "optimizer": {"name": "lion"}}, ErrorCode.INVALID_FIELD, "optimizer name"),
    ({"steps": 5, "dataset": "datasets/missing"}, ErrorCode.NOT_FOUND, "dataset 'datasets/missing'"),
    ({"steps": 5, "job": "bad/id"}, ErrorCode.INVALID_FIELD, "job must be"),
]


def assert_bad_requests(client: Client) -> None:
    """Every malformed train_start, and unknown jobs, get a clear error naming the problem."""
    for args, code, words in BAD_REQUESTS:
        with pytest.raises(RemoteError) as err:
            client.call("trainer", "train_start", **args)
        assert err.value.code == code and words in err.value.reason, (args, err.value.code, err.value.reason)
    for method in ("train_status", "train_stop"):
        with pytest.raises(RemoteError) as err:
            client.call("trainer", method, job="never-started")
        assert err.value.code == ErrorCode.NOT_FOUND and "'never-started'" in err.value.reason


def trainer_pid(c: Client) -> int:
    (replica,) = c.status("trainer")["services"][0]["replicas"]
    return int(replica["pid"])


def test_kill_9_mid_job_resumes_from_the_last_checkpoint(short_tmp: str) -> None:
    with start_kernel(CONFIG, short_tmp) as k, Client(runtime_dir=k.runtime_dir, timeout=CEILING) as c:
        c.wait_ready("trainer", timeout=CEILING)
        seen: list[wire.Envelope] = []
        with c.events("train.*", "service.*") as stream:
            c.call("trainer", "train_start", job="crash", config=TINY, steps=50, batch_size=16, checkpoint_every=10,
                   optimizer={"name": "adamw", "lr": 1e-2})
            first = data(wait_for(stream, of_job("train.progress", "crash"), seen))
            ckpt = data(wait_for(stream, lambda e: of_job("train.checkpointed", "crash")(e) and data(e)["step"] >= 20, seen))
            os.kill(trainer_pid(c), signal.SIGKILL)
            wait_for(stream, lambda e: e.msg_type == "service.ready" and data(e).get("service") == "trainer"
                     and data(e).get("incarnation") == 2, seen)
            resumed = data(wait_for(stream, of_job("train.resumed", "crash"), seen))
            after: list[wire.Envelope] = []
            finished = data(wait_for(stream, of_job("train.finished", "crash"), after))
        # Resumed from the checkpoint we saw (or a later one written just before the kill), never from 0.
        assert resumed["step"] >= ckpt["step"] >= 20
        post = [data(e) for e in after if of_job("train.progress", "crash")(e)]
        assert post and all(p["step"] > resumed["step"] for p in post)
        # The curve continues: the resumed loss is the checkpoint's, far below the untrained loss.
        assert resumed["loss"] < first["loss"] - 0.3 and post[0]["loss"] < first["loss"] - 0.3
        assert finished["step"] == 50
        status = c.call("trainer", "train_status", job="crash")
        assert status["state"] == "finished" and status["step"] == 50
