"""Data-parallel training with torch.distributed (gloo, CPU): 2 ranks == 1 rank on the same global batch.

First without a daemon (plain processes with the rank environment set, as the kernel sets it),
then through a real daemon running the trainer with ``replicas = 2`` and ``distributed``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from microkernel.client import Client
from microkernel.supervisor.distributed import free_port
from services.models import corpus
from services.models.registry import resolve
from services.models.weights import to_numpy
from services.trainer.jobs import validate_start
from services.trainer.loop import RunHooks, TrainingRun
from protocols import wire
from tests.integration.conftest import REPO_ROOT, kernel_env, start_kernel
from tests.integration.test_trainer import CEILING, TINY, data, of_job, wait_for

STEPS = 6
GLOBAL_BATCH = 8
# SGD: its update is linear in the gradient. (Adam turns float noise in a zero gradient, like the
# key bias's, into lr-sized steps, so two exact-in-math runs drift apart in such parameters.)
OPTIMIZER = json.dumps({"name": "sgd", "lr": 0.5, "momentum": 0.9})


def standalone(out: Path, *, rank: int | None, world: int, port: int) -> subprocess.Popen[bytes]:
    env = kernel_env()
    if rank is not None:
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), MK_DIST_BACKEND="gloo")
    cmd = [sys.executable, "-m", "services.trainer.standalone", "--steps", str(STEPS), "--batch-size",
           str(GLOBAL_BATCH), "--config", json.dumps(TINY), "--optimizer", OPTIMIZER, "--out", str(out), "--timeout", "60"]
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    try:
        out, err = proc.communicate(timeout=CEILING * 2)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("a standalone training process did not finish")
    assert proc.returncode == 0, err.decode()
    lines = out.decode().strip().splitlines()
    return json.loads(lines[-1]) if lines else {}


def test_two_ranks_match_one_rank_with_the_same_global_batch(short_tmp: str) -> None:
    tmp = Path(short_tmp)
    port = free_port()
    ranks = [standalone(tmp / f"two-{r}.npz", rank=r, world=2, port=port) for r in (0, 1)]
    # The 1-rank run (same loop, same job) here, while the ranks run.
    spec = validate_start(job="one", model="charformer", config=TINY, dataset="corpus",
                          optimizer=json.loads(OPTIMIZER), steps=STEPS, epochs=None, batch_size=GLOBAL_BATCH,
                          checkpoint_every=0, seed=0, name=None, default_name="charformer")
    single = TrainingRun(spec, resolve("charformer"), corpus.read("corpus"))
    initial = to_numpy(single.final_state())
    one = single.run(RunHooks())
    two = [finish(p) for p in ranks]
    assert two[0]["world_size"] == 2 and two[0]["steps"] == STEPS
    a, b = to_numpy(single.final_state()), np.load(tmp / "two-0.npz")
    assert sorted(a) == sorted(b.files)
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=1e-5, err_msg=name)
    assert any(not np.allclose(a[name], initial[name]) for name in a)  # k steps really moved the weights
    assert one.loss is not None and abs(two[0]["loss"] - one.loss) < 1e-4


DISTRIBUTED = """
[services.store]
entry = "services.store:Store"

[services.trainer]
entry = "services.trainer:Trainer"
depends_on = ["store"]
replicas = 2
distributed = { backend = "gloo" }
backoff = { initial = "0s" }
start_timeout = "60s"
[services.trainer.config]
progress_every = 5
dist_timeout_s = 30
"""


def test_a_job_runs_on_both_ranks_of_a_daemon_and_survives_a_killed_rank(short_tmp: str) -> None:
    with start_kernel(DISTRIBUTED, short_tmp) as k, Client(runtime_dir=k.runtime_dir, timeout=CEILING) as c:
        c.wait_ready("trainer", timeout=CEILING)
        seen: list[wire.Envelope] = []
        with c.events("train.*", "service.*") as stream:
            reply = c.call("trainer", "train_start", job="ddp", config=TINY, steps=60, batch_size=16,
                           checkpoint_every=10, optimizer={"name": "adamw", "lr": 1e-2})
            assert reply["state"] == "running"
            first = data(wait_for(stream, of_job("train.progress", "ddp"), seen))
            assert (first["rank"], first["world_size"]) == (0, 2)
            ckpt = data(wait_for(stream, lambda e: of_job("train.checkpointed", "ddp")(e) and data(e)["step"] >= 20, seen))
            # Every rank runs the job: both report the live step.
            ranks: set[int] = set()
            for _ in range(100):  # load-balanced: both replicas answer long before this bound
                view = c.call("trainer", "train_status", job="ddp")
                assert view["state"] == "running" and view["step"] > 0 and view["world_size"] == 2
                ranks.add(view["rank"])
                if ranks == {0, 1}:
                    break
            assert ranks == {0, 1}
            replicas = c.status("trainer")["services"][0]["replicas"]
            victim = next(r for r in replicas if r["replica"] == 1)
            os.kill(int(victim["pid"]), signal.SIGKILL)
            resumed = data(wait_for(stream, of_job("train.resumed", "ddp"), seen, timeout=CEILING * 2))
            finished = data(wait_for(stream, of_job("train.finished", "ddp"), seen, timeout=CEILING * 2))
        assert resumed["step"] >= ckpt["step"] >= 20 and resumed["world_size"] == 2
        assert resumed["loss"] < first["loss"]
        assert finished["step"] == 60
        assert c.call("trainer", "train_status", job="ddp")["state"] == "finished"
