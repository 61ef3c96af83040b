"""The trainer's parts without a daemon: request validation, job records, data order, the loop,
checkpoints and resume."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from protocols.errors import ErrorCode, MicrokernelError
from services.models import corpus
from services.models.charformer import ARCHITECTURE
from services.trainer.checkpoints import Checkpoint
from services.trainer.distributed import DistEnv
from services.trainer.jobs import JobRecord, JobState, check_optimizer, validate_start
from services.trainer.loop import Control, RunHooks, TokenBatches, TrainingRun

TINY = {"d_model": 32, "n_heads": 2, "n_layers": 1, "context": 16}


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread, as the trainer runs (2 spinning threads on a busy 2-core machine crawl)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def spec(**overrides: Any):  # type: ignore[no-untyped-def]
    args: dict[str, Any] = dict(job="j", model="charformer", config=TINY, dataset="corpus",
                                optimizer={"name": "adamw", "lr": 1e-2}, steps=10, epochs=None, batch_size=8,
                                checkpoint_every=0, seed=3, name=None, default_name="charformer")
    args.update(overrides)
    return validate_start(**args)


@pytest.mark.parametrize(("overrides", "words"), [
    ({"steps": 0}, "steps must be"),
    ({"steps": True}, "steps must be"),
    ({"steps": None}, "exactly one of steps or epochs"),
    ({"epochs": 2}, "exactly one of steps or epochs"),
    ({"steps": None, "epochs": -1}, "epochs must be"),
    ({"batch_size": 0}, "batch_size"),
    ({"checkpoint_every": -1}, "checkpoint_every"),
    ({"seed": -1}, "seed"),
    ({"job": "a/b"}, "job must be"),
    ({"job": ".."}, "job must be"),
    ({"name": "x y"}, "name must be"),
    ({"dataset": ""}, "dataset must be"),
    ({"config": [1]}, "config must be a map"),
    ({"optimizer": {"name": "lion"}}, "optimizer name"),
    ({"optimizer": {"lr": -1}}, "optimizer lr"),
    ({"optimizer": {"nesterov": True}}, "unknown key(s) nesterov"),
    ({"optimizer": "adam"}, "optimizer must be a map"),
])  # fmt: skip
def test_bad_start_requests_name_the_field(overrides: dict[str, Any], words: str) -> None:
    with pytest.raises(MicrokernelError) as err:
        spec(**overrides)
    assert err.value.code == ErrorCode.INVALID_FIELD and words in err.value.reason, err.value.reason


def test_defaults_of_a_start_request() -> None:
    s = spec(job=None, steps=None, epochs=1.5, optimizer={})
    assert s.job.startswith("job-") and s.steps == 0 and s.epochs == 1.5 and s.name == "charformer"
    assert s.optimizer == {"name": "adamw", "lr": 3e-3}
    assert check_optimizer({"name": "sgd", "lr": 1, "momentum": 0.9})["lr"] == 1.0


def test_job_records_round_trip_through_json() -> None:
    record = JobRecord(spec=spec(), state=JobState.RUNNING, step=4, loss=2.5, checkpoint=1, owner=1)
    again = JobRecord.from_json(record.to_json())
    assert again == record
    later = record.evolve(state=JobState.FINISHED, weights="models/charformer")
    assert later.updated_ns >= record.updated_ns and later.status()["state"] == "finished"
    assert JobState.RUNNING.active and not JobState.FINISHED.active
    with pytest.raises(MicrokernelError) as err:
        JobRecord.from_json(b'{"spec": {}}')
    assert err.value.code == ErrorCode.CORRUPTED


def test_batches_are_a_function_of_seed_and_step_and_ranks_split_the_global_batch() -> None:
    tokens = torch.arange(1000)
    data = TokenBatches(tokens, context=16, seed=7)
    x, y = data.batch(5, 8)
    assert x.shape == (8, 16) and torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(data.batch(5, 8)[0], x) and not torch.equal(data.batch(6, 8)[0], x)
    assert not torch.equal(TokenBatches(tokens, 16, seed=8).batch(5, 8)[0], x)
    halves = [data.batch(5, 8, rank=r, world_size=2)[0] for r in (0, 1)]
    assert torch.equal(torch.cat(halves), x)
    with pytest.raises(MicrokernelError):
        TokenBatches(torch.arange(10), context=16, seed=0)


def test_the_loss_falls_and_progress_is_reported() -> None:
    run = TrainingRun(spec(steps=40), ARCHITECTURE, corpus.read("corpus"))
    reports: list[tuple[int, float, float]] = []
    outcome = run.run(RunHooks(progress=lambda *r: reports.append(r), progress_every=10, progress_interval_s=1e9))
    assert outcome.control == Control.CONTINUE and outcome.step == 40
    assert [r[0] for r in reports] == [10, 20, 30, 40] and all(r[2] > 0 for r in reports)
    assert reports[-1][1] < reports[0][1]


def _params(run: TrainingRun) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in run.final_state().items()}


def test_a_run_resumed_from_a_checkpoint_continues_the_same_curve() -> None:
    text = corpus.read("corpus")
    straight = TrainingRun(spec(steps=12, checkpoint_every=5), ARCHITECTURE, text)
    saved: list[Checkpoint] = []
    straight.run(RunHooks(checkpoint=saved.append))
    assert [c.step for c in saved] == [5, 10]

    # A "crash" after step 5: a new run (new model, new optimizer) from the stored arrays.
    stored = Checkpoint({k: np.array(v) for k, v in saved[0].tensors.items()}, dict(saved[0].meta))
    for a in stored.tensors.values():
        a.flags.writeable = False
    resumed = TrainingRun(spec(steps=12, checkpoint_every=5), ARCHITECTURE, text, checkpoint=stored)
    assert resumed.step == 5 and resumed.loss == saved[0].loss
    outcome = resumed.run(RunHooks())
    assert outcome.step == 12 and outcome.loss == pytest.approx(straight.loss, abs=1e-5)
    for name, value in _params(straight).items():
        torch.testing.assert_close(_params(resumed)[name], value, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_that_does_not_fit_the_model_is_corrupted() -> None:
    text = corpus.read("corpus")
    run = TrainingRun(spec(steps=2), ARCHITECTURE, text)
    run.run(RunHooks())
    ckpt = run.checkpoint()
    with pytest.raises(MicrokernelError) as err:
        TrainingRun(spec(steps=4, config={**TINY, "d_model": 64}), ARCHITECTURE, text, checkpoint=ckpt)
    assert err.value.code == ErrorCode.CORRUPTED and "step 2" in err.value.reason


@pytest.mark.parametrize(("control", "writes_checkpoint"), [(Control.STOP, True), (Control.SHUTDOWN, True)])
def test_stop_and_shutdown_end_at_a_step_boundary_with_a_checkpoint(control: Control, writes_checkpoint: bool) -> None:
    run = TrainingRun(spec(steps=1000), ARCHITECTURE, corpus.read("corpus"))
    saved: list[Checkpoint] = []
    outcome = run.run(RunHooks(control=lambda: control if run.step >= 3 else Control.CONTINUE, checkpoint=saved.append))
    assert outcome.control == control and outcome.step == 3
    assert [c.step for c in saved] == [3]


def test_the_rank_environment() -> None:
    assert DistEnv.from_environ({}) is None
    assert DistEnv.from_environ({"WORLD_SIZE": "1", "MASTER_PORT": "1"}) is None
    env = DistEnv.from_environ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1",
                                "MASTER_PORT": "29500", "MK_DIST_BACKEND": "gloo"})
    assert env is not None and (env.rank, env.world_size, env.master_port, env.backend) == (1, 2, 29500, "gloo")
    assert env.device == torch.device("cpu")
    nccl = DistEnv.from_environ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "1"}, cuda=True)
    assert nccl is not None and nccl.backend == "nccl"


def test_store_calls_ride_through_a_restarting_store_and_give_up_on_real_errors() -> None:
    from services.trainer.storage import JobStore

    async def scenario() -> None:
        answers: list[object] = [MicrokernelError(ErrorCode.NOT_READY, "store has no ready replica"),
                                 MicrokernelError(ErrorCode.UNAVAILABLE, "replica went away"), {"version": 3}]
        calls: list[tuple[str, float]] = []

        async def call(method: str, timeout: float, **args: object) -> object:
            calls.append((method, timeout))
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer

        store = JobStore(call, asyncio.get_running_loop())
        assert await store._call("put", key="k", timeout=30.0) == {"version": 3}
        assert [m for m, _ in calls] == ["put"] * 3 and all(t <= 20.0 for _, t in calls)

        answers[:] = [MicrokernelError(ErrorCode.INVALID_FIELD, "bad key")]
        with pytest.raises(MicrokernelError) as info:
            await store._call("put", key="k", timeout=30.0)
        assert info.value.code is ErrorCode.INVALID_FIELD  # not a restart: raised at once, not retried

        answers[:] = [MicrokernelError(ErrorCode.NOT_READY, "down")] * 100
        with pytest.raises(MicrokernelError) as info:
            await store._call("get", key="k", timeout=0.5)  # the budget runs out: the last error is raised
        assert info.value.code is ErrorCode.NOT_READY

    asyncio.run(scenario())
