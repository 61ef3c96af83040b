"""Dynamic batching through the inferencer vs the same model in-process, and vs batching disabled.

Usage::

    .venv/bin/python bench/inference.py                  # ~1-2 minutes
    .venv/bin/python bench/inference.py --quick          # CI smoke run
    .venv/bin/python bench/inference.py --model fixed    # a fixed cost per batch

Prints exactly one JSON line on stdout (progress on stderr). One daemon runs the loader and two
inferencers over the same loaded model (one shared-memory copy): ``batched`` (``max_batch_size``
16, ``max_queue_delay_ms`` 5) and ``unbatched`` (``max_batch_size`` 1), one replica each.

* ``batched_items_per_s`` / ``unbatched_items_per_s``: 64 concurrent clients (64 asyncio tasks
  over one ``AsyncClient``, each with one request outstanding at all times) calling ``infer``.
* ``inprocess_items_per_s``: the same model, built the same way, called in this process with
  ``arch.infer_batch`` on batches of ``max_batch_size`` back to back: the ceiling. It and the two
  inferencers take turns in interleaved rounds (background load on the host hits every variant
  alike); the medians over the rounds count.
* ``batched_vs_inprocess`` (target >= 0.7, aim >= 0.85) and ``batched_vs_unbatched`` (>= 3).
* Latency: ``light_p99_ms`` with one client, next to ``max_queue_delay_ms + compute_ms_p50`` (a
  lone request waits for the delay, then computes); ``loaded_p99_ms`` with 64 clients, where a
  request also waits for the batches ahead of it (``clients / max_batch_size`` of them).

The default model is the shipped ``charformer`` (random weights: speed does not depend on them)
generating 8 characters per prompt; its cost on a CPU grows with the batch (batch 16 costs about
4x batch 1 here), so this is a modest case for batching. ``--model fixed`` serves
``tests.fixtures.models:LINEAR`` (width 256) with 20 ms of work per batch whatever its size: the
regime batching exists for (a step bound by reading the weights or by launch overhead, as on a GPU).
Replicas and the in-process baseline use one torch thread each.
"""

from __future__ import annotations

import argparse
import asyncio
import mmap
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from bench.harness import Daemon, emit, exit_cleanly_on_sigterm, log, percentile, ratio, short_tmp
from services.loader.layout import assemble, fill, plan, views
from services.models.registry import Architecture, merge_config, resolve
from tests.fixtures.models import reference_state, write_weights

CLIENTS = 64
BATCH = 16
DELAY_MS = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelChoice:
    """What to serve: an architecture, its config, and weights for it."""

    label: str
    arch: str
    config: dict[str, Any]


MODELS = {
    "fixed": ModelChoice(label="fixed", arch="tests.fixtures.models:LINEAR", config={"width": 256, "compute_ms": 20.0}),
    "charformer": ModelChoice(label="charformer", arch="charformer", config={"generate": 8}),
}


def write_model(choice: ModelChoice, path: str) -> tuple[Architecture, dict[str, Any]]:
    """Weights for ``choice`` in a safetensors file; returns the architecture and the merged config."""
    arch = resolve(choice.arch)
    config = merge_config(arch, choice.config)
    if choice.label == "fixed":
        state = reference_state(int(config["width"]))
    else:
        torch.manual_seed(0)
        state = arch.build(config).state_dict()
    write_weights(path, state, arch=choice.arch, config=config)
    return arch, config


def sample_inputs(arch: Architecture, config: dict[str, Any], n: int) -> list[Any]:
    """``n`` inputs for the model (the linear fixture's examples have its default width)."""
    if "width" in config:
        width = int(config["width"])
        return [[float((i + j) % 7) for j in range(width)] for i in range(n)]
    return arch.example_inputs(n)


class InProcess:
    """The model built as the inferencer builds it, called in this process on full batches."""

    def __init__(self, arch: Architecture, config: dict[str, Any], path: str) -> None:
        from services.loader.sources import read_file

        torch.set_num_threads(1)  # as the inferencer replicas
        weights = read_file(path)
        layout = plan(weights.arrays)
        # Page-aligned like the loader's segment (a bytearray's misaligned tensors compute slower).
        self.buffer = memoryview(mmap.mmap(-1, layout.size))
        fill(self.buffer, weights.arrays, layout)
        weights.close()
        self.arch, self.config = arch, config
        self.model = assemble(arch, config, views(self.buffer, layout))
        self.inputs = sample_inputs(arch, config, BATCH)
        self._call(self.inputs)  # warm-up

    def _call(self, inputs: list[Any]) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            self.arch.infer_batch(self.model, inputs, self.config)
        return time.perf_counter() - t0

    def run(self, seconds: float) -> dict[str, float]:
        """Items/s on full batches for ``seconds``, and the median time of a batch and of one input."""
        times: list[float] = []
        start = time.perf_counter()
        while time.perf_counter() - start < seconds or len(times) < 3:
            times.append(self._call(self.inputs))
        elapsed = time.perf_counter() - start
        one = [self._call(self.inputs[:1]) for _ in range(5)]
        return {"items_per_s": len(times) * BATCH / elapsed, "batch_ms_p50": statistics.median(times) * 1000,
                "single_ms_p50": statistics.median(one) * 1000}


async def drive(daemon: Daemon, service: str, inputs: list[Any], clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` tasks each keeping one ``infer`` outstanding for ``seconds`` (after a warm-up)."""
    from microkernel.async_client import AsyncClient

    async with AsyncClient(daemon.control, timeout=120.0, name="bench-infer") as client:
        await client.call(service, "infer", input=inputs[0])
        latencies: list[float] = []
        measuring = False
        stop = False
        done = 0

        async def worker(i: int) -> None:
            nonlocal done
            x = inputs[i % len(inputs)]
            while not stop:
                t0 = time.perf_counter()
                await client.call(service, "infer", input=x)
                if measuring:
                    latencies.append(time.perf_counter() - t0)
                    done += 1

        tasks = [asyncio.create_task(worker(i)) for i in range(clients)]
        await asyncio.sleep(min(2.0, seconds / 4))  # warm-up: the measured window starts in steady state
        measuring = True
        t0 = time.perf_counter()
        await asyncio.sleep(seconds)  # the measured window
        elapsed = time.perf_counter() - t0
        measuring = False
        count = done
        stop = True
        await asyncio.gather(*tasks)
        stats = await client.call(service, "stats")
    ms = [x * 1000 for x in latencies]
    return {"items_per_s": count / elapsed, "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99),
            "mean_batch_size": stats.get("mean_batch_size"), "errors": stats.get("errors")}


def inferencer(weights: str, max_batch_size: int, delay_ms: float) -> dict[str, Any]:
    # The inferencer has the loader load the model from the file at start (one copy for both).
    # One torch thread, like the in-process baseline; no CPU affinity: the replica's event loop
    # (taking requests while a batch computes) must not share one core with the compute thread.
    threads = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MK_CPU_THREADS": "1"}
    return {"entry": "services.inferencer:Inferencer", "depends_on": ["loader"], "env": threads,
            "config": {"model": "bench", "weights": weights, "max_batch_size": max_batch_size,
                       "max_queue_delay_ms": delay_ms, "max_queue": 1024}}


def run(choice: ModelChoice, seconds: float, rounds: int) -> dict[str, Any]:
    tmp = short_tmp("mk-bench-")
    try:
        return measure(choice, seconds, rounds, os.path.join(tmp, "bench.safetensors"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def measure(choice: ModelChoice, seconds: float, rounds: int, weights: str) -> dict[str, Any]:
    arch, config = write_model(choice, weights)
    daemon = Daemon({
        "loader": {"entry": "services.loader:Loader"},
        "batched": inferencer(weights, BATCH, DELAY_MS),
        "unbatched": inferencer(weights, 1, 0.0),
    }, ready_timeout=60.0)
    base_model = InProcess(arch, config, weights)
    inputs = sample_inputs(arch, config, CLIENTS)
    bases, batcheds, unbatcheds = [], [], []
    with daemon:
        from microkernel.client import Client

        with Client(daemon.control, timeout=120.0) as c:
            c.wait_ready("batched", timeout=120.0)
            c.wait_ready("unbatched", timeout=120.0)
        # Interleaved rounds: background load on the host hits every variant alike; medians count.
        for r in range(rounds):
            log(f"round {r + 1}/{rounds}: in-process ({choice.label}, batches of {BATCH}), batched, unbatched")
            bases.append(base_model.run(seconds))
            batcheds.append(asyncio.run(drive(daemon, "batched", inputs, CLIENTS, seconds)))
            unbatcheds.append(asyncio.run(drive(daemon, "unbatched", inputs, CLIENTS, seconds)))
        log("1 client, batched (latency at light load)")
        light = asyncio.run(drive(daemon, "batched", inputs, 1, max(2.0, seconds)))
    base = {k: statistics.median(b[k] for b in bases) for k in bases[0]}
    batched = {k: statistics.median(b[k] for b in batcheds) for k in ("items_per_s", "p50_ms", "p99_ms")}
    batched.update(mean_batch_size=batcheds[-1]["mean_batch_size"], errors=batcheds[-1]["errors"])
    unbatched = {"items_per_s": statistics.median(b["items_per_s"] for b in unbatcheds), "errors": unbatcheds[-1]["errors"]}
    return {
        "bench": "inference",
        "model": choice.label,
        "arch": choice.arch,
        "config": config,
        "rounds": rounds,
        "clients": CLIENTS,
        "max_batch_size": BATCH,
        "max_queue_delay_ms": DELAY_MS,
        "inprocess_items_per_s": round(base["items_per_s"], 1),
        "batched_items_per_s": round(batched["items_per_s"], 1),
        "unbatched_items_per_s": round(unbatched["items_per_s"], 1),
        "batched_vs_inprocess": ratio(batched["items_per_s"], base["items_per_s"]),
        "batched_vs_unbatched": ratio(batched["items_per_s"], unbatched["items_per_s"]),
        "mean_batch_size": batched["mean_batch_size"],
        "compute_ms_p50": round(base["batch_ms_p50"], 2),
        "compute_single_ms_p50": round(base["single_ms_p50"], 2),
        "light_p50_ms": round(light["p50_ms"], 2),
        "light_p99_ms": round(light["p99_ms"], 2),
        "light_p99_bound_ms": round(DELAY_MS + base["single_ms_p50"], 2),
        "loaded_p50_ms": round(batched["p50_ms"], 2),
        "loaded_p99_ms": round(batched["p99_ms"], 2),
        "loaded_p99_bound_ms": round(DELAY_MS + base["batch_ms_p50"] * (CLIENTS / BATCH + 1), 2),
        "errors": (batched["errors"] or 0) + (unbatched["errors"] or 0),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short measuring windows (CI smoke run)")
    parser.add_argument("--model", choices=sorted(MODELS), default="charformer", help="what to serve (default: charformer)")
    args = parser.parse_args(argv)
    exit_cleanly_on_sigterm()
    result = run(MODELS[args.model], seconds=3.0 if args.quick else 6.0, rounds=2 if args.quick else 3)
    result["verdicts"] = {
        "batched_vs_inprocess>=0.7": "PASS" if result["batched_vs_inprocess"] >= 0.7 else "FAIL",
        "batched_vs_unbatched>=3": "PASS" if result["batched_vs_unbatched"] >= 3 else "FAIL",
    }
    result["pass"] = all(v == "PASS" for v in result["verdicts"].values())
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
