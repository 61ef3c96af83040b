"""Data-parallel training throughput: samples/s of 2 DDP ranks (gloo, CPU) vs 1 rank, same global batch.

Usage::

    .venv/bin/python bench/train.py            # ~1 minute on 2 cores
    .venv/bin/python bench/train.py --quick    # CI smoke run

Prints exactly one JSON line on stdout (progress on stderr). Every configuration runs the shipped
charformer (default config) on the shipped corpus with ``python -m services.trainer.standalone``
(the trainer's own loop, ``TrainingRun``) and times the steps after a warm-up:

* ``single_samples_per_s``: one process, 1 torch thread.
* ``single_2threads_samples_per_s``: one process, 2 torch threads (both cores, no DDP).
* ``ddp2_samples_per_s``: two processes (ranks) of 1 thread each, gradients all-reduced by DDP over
  gloo on localhost, each rank computing half of the global batch.

``ddp2_vs_single`` is the ratio the DDP path earns over one rank on one core (ideal 2.0 on 2 idle
cores); ``ddp2_vs_single_2threads`` compares against intra-op threading on the same 2 cores.
Configurations alternate over the rounds (background load hits all alike); best round of each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

from harness import PYTHON, REPO, emit, log

from microkernel.supervisor.distributed import free_port

CEILING_S = 600.0


def _run(world: int, threads: int, steps: int, warmup: int, batch: int) -> dict[str, Any]:
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, PYTHONPATH=str(REPO))
        if world > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), MK_DIST_BACKEND="gloo")
        cmd = [PYTHON, "-m", "services.trainer.standalone", "--steps", str(steps + warmup), "--warmup", str(warmup),
               "--batch-size", str(batch), "--threads", str(threads)]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outputs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=CEILING_S)
            if p.returncode != 0:
                raise RuntimeError(f"standalone training failed ({p.returncode}): {err.decode()[-2000:]}")
            outputs.append(out.decode())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return json.loads(outputs[0].strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds (CI smoke run)")
    args = parser.parse_args()
    steps, warmup, rounds, batch = (20, 5, 1, 64) if args.quick else (60, 10, 2, 64)
    configs = {"single": (1, 1), "single_2threads": (1, 2), "ddp2": (2, 1)}
    best: dict[str, float] = {}
    losses: dict[str, float] = {}
    for r in range(rounds):
        for name, (world, threads) in configs.items():
            result = _run(world, threads, steps, warmup, batch)
            log(f"round {r + 1}/{rounds} {name}: {result['samples_per_s']:.0f} samples/s (loss {result['loss']:.3f})")
            best[name] = max(best.get(name, 0.0), float(result["samples_per_s"]))
            losses[name] = float(result["loss"])
    emit({
        "bench": "train",
        "model": "charformer (default config)",
        "global_batch": batch,
        "timed_steps": steps,
        "rounds": rounds,
        "single_samples_per_s": round(best["single"], 1),
        "single_2threads_samples_per_s": round(best["single_2threads"], 1),
        "ddp2_samples_per_s": round(best["ddp2"], 1),
        "ddp2_vs_single": round(best["ddp2"] / best["single"], 3),
        "ddp2_vs_single_2threads": round(best["ddp2"] / best["single_2threads"], 3),
        # Same data order and global batch: the final losses agree (DDP computes the same update).
        "loss_single": round(losses["single"], 4),
        "loss_ddp2": round(losses["ddp2"], 4),
        "cpus": os.cpu_count(),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
