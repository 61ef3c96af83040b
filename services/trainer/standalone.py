"""Run one training job outside the service: ``python -m services.trainer.standalone``.

For torch.distributed checks and benchmarks without a daemon or a store: start N processes with
``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` set (or none, for one rank), each trains
the same job on the shipped corpus, and rank 0 writes the final parameters (``--out``, ``.npz``)
and prints one JSON line ``{"steps", "loss", "seconds", "samples_per_s", "world_size"}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from services.models import corpus
from services.models.registry import resolve
from services.models.weights import to_numpy
from services.trainer import distributed
from services.trainer.distributed import DistEnv
from services.trainer.execution import torch_threads
from services.trainer.jobs import validate_start
from services.trainer.loop import Control, RunHooks, TrainingRun

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Train, write rank 0's parameters, print the summary line; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32, help="the global batch (split over the ranks)")
    parser.add_argument("--config", type=json.loads, default={}, help="model config overrides (JSON)")
    parser.add_argument("--optimizer", type=json.loads, default={"name": "adamw", "lr": 3e-3},
                        help='the optimizer table (JSON), e.g. {"name": "sgd", "lr": 0.1}')
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=0, help="untimed steps first (part of --steps)")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--out", help="rank 0 writes the final parameters here (.npz)")
    args = parser.parse_args(argv)
    torch_threads(args.threads)
    env = DistEnv.from_environ()
    spec = validate_start(job="standalone", model="charformer", config=args.config, dataset="corpus",
                          optimizer=args.optimizer, steps=args.steps, epochs=None,
                          batch_size=args.batch_size, checkpoint_every=0, seed=args.seed, name=None,
                          default_name="charformer")
    if env is not None:
        distributed.join(env, args.timeout)
    try:
        run = TrainingRun(spec, resolve("charformer"), corpus.read("corpus"), dist_env=env)
        hooks = RunHooks(progress_interval_s=float("inf"))
        if args.warmup:
            run.run(RunHooks(progress_interval_s=float("inf"), control=lambda: _stop_at(run, args.warmup)))
        started, first = time.perf_counter(), run.step
        outcome = run.run(hooks)
        seconds = time.perf_counter() - started
    finally:
        distributed.leave()
    if run.rank == 0:
        if args.out:
            np.savez(args.out, **to_numpy(run.final_state()))
        samples = (outcome.step - first) * spec.batch_size
        print(json.dumps({"steps": outcome.step, "loss": outcome.loss, "seconds": seconds,
                          "samples_per_s": samples / seconds if seconds > 0 else 0.0,
                          "world_size": run.world_size}), flush=True)
    return 0


def _stop_at(run: TrainingRun, step: int) -> Control:
    return Control.STOP if run.step >= step else Control.CONTINUE


if __name__ == "__main__":
    sys.exit(main())
