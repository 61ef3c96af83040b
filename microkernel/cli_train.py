"""``mkctl train``: start, watch and stop training jobs of the trainer service.

.. code-block:: sh

    mkctl train start --steps 500 --batch-size 32 --job demo --follow
    mkctl train status            # every job
    mkctl train status demo       # one job
    mkctl train follow demo       # a live progress bar until train.finished
    mkctl train stop demo
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping
from typing import Any

from protocols import wire

from microkernel.cli_format import EMPTY, dump_json, render_table
from microkernel.cli_types import int_at_least, json_object, sub_actions
from microkernel.client import Client

__all__ = ["progress_bar", "register", "status_table"]

EXIT_OK = 0
_POSITIVE = int_at_least(1)
EXIT_FAILED = 1
_START_TIMEOUT_S = 60.0    # train_start builds the model and checks the dataset
_STOP_TIMEOUT_S = 60.0     # train_stop waits for the loop to reach a step boundary
_FOLLOW_IDLE_S = 120.0     # follow gives up after this long without any event of the job
_BAR_WIDTH = 30
_END_TOPICS = ("train.finished", "train.stopped", "train.failed")


def register(command: Callable[..., argparse.ArgumentParser]) -> dict[str, Callable[[Client, argparse.Namespace], int]]:
    """Add ``mkctl train …``; return ``{"train": handler}``."""
    parser = command("train", "start, watch and stop training jobs (the trainer service)")
    action = sub_actions(parser, "train_action", service="trainer", role="trainer")

    p = action("start", "start a training job (--follow: then show its progress until it ends)")
    p.add_argument("--job", metavar="ID", help="the job id (default: a fresh job-XXXXXXXX)")
    p.add_argument("--model", default="charformer", metavar="ARCH",
                   help="architecture name or 'package.module:attr' (default: charformer)")
    p.add_argument("--config", type=json_object, metavar="JSON", help='model config overrides, e.g. \'{"n_layers": 4}\'')
    p.add_argument("--dataset", default="corpus", metavar="KEY", help="a store key of a text blob or a shipped corpus (default: corpus)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=_POSITIVE, metavar="N", help="optimizer steps (default 200 unless --epochs)")
    length.add_argument("--epochs", type=float, metavar="E", help="passes over the dataset instead of --steps")
    p.add_argument("--batch-size", type=_POSITIVE, default=32, metavar="B", help="the global batch (default 32)")
    p.add_argument("--checkpoint-every", type=int, default=50, metavar="N", help="steps between checkpoints (0: none; default 50)")
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "adam", "sgd"), help="default adamw")
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate (default 0.003)")
    p.add_argument("--seed", type=int, default=0, help="weights and data order seed (default 0)")
    p.add_argument("--name", metavar="NAME", help="store the final weights as models/NAME (default: the model name)")
    p.add_argument("--follow", action="store_true", help="show a live progress bar until the job ends")
    p = action("status", "show every job, or one job in detail")
    p.add_argument("job", nargs="?", metavar="JOB")
    p = action("stop", "stop a job at its next step (it writes a checkpoint first)")
    p.add_argument("job", metavar="JOB")
    p = action("follow", "a live progress bar fed by train.progress events until the job ends")
    p.add_argument("job", metavar="JOB")
    return {"train": _cmd_train}


# --- output ----------------------------------------------------------------------------------


def progress_bar(step: int, steps: int, loss: float | None, samples_per_s: float | None, width: int = _BAR_WIDTH) -> str:
    """``[#########.........]  120/500  24%  loss 2.1340  1,234 samples/s``."""
    fraction = min(1.0, step / steps) if steps > 0 else 0.0
    filled = int(fraction * width)
    parts = [f"[{'#' * filled}{'.' * (width - filled)}]", f"{step}/{steps}", f"{fraction * 100:3.0f}%"]
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if samples_per_s is not None:
        parts.append(f"{samples_per_s:,.0f} samples/s")
    return "  ".join(parts)


def _loss(value: Any) -> str:
    return EMPTY if value is None else f"{float(value):.4f}"


def status_table(jobs: list[Mapping[str, Any]]) -> str:
    """JOB STATE STEP LOSS MODEL DATASET WEIGHTS, one row per job."""
    if not jobs:
        return "no training jobs"
    rows = [[j.get("job"), j.get("state"), f"{j.get('step', 0)}/{j.get('steps', '?')}", _loss(j.get("loss")),
             j.get("model"), j.get("dataset"), j.get("weights")] for j in jobs]
    return render_table(["JOB", "STATE", "STEP", "LOSS", "MODEL", "DATASET", "WEIGHTS"], rows)


def job_detail(job: Mapping[str, Any]) -> str:
    """Every field of one job, one per line."""
    keys = ("job", "state", "step", "steps", "loss", "model", "dataset", "batch_size", "checkpoint_every",
            "checkpoint", "name", "weights", "error", "rank", "world_size")
    return "\n".join(f"{k + ':':18}{EMPTY if job.get(k) is None else job.get(k)}" for k in keys if k in job)


def end_line(topic: str, body: Mapping[str, Any]) -> str:
    """The last line ``follow`` prints."""
    if topic == "train.finished":
        return f"finished at step {body.get('step')} (loss {_loss(body.get('loss'))}): weights {body.get('weights')}" + (
            f" version {body['version']}" if body.get("version") is not None else "")
    if topic == "train.stopped":
        return f"stopped at step {body.get('step')} (loss {_loss(body.get('loss'))})"
    return f"failed at step {body.get('step')}: {body.get('error')}"


# --- handlers --------------------------------------------------------------------------------


def _cmd_train(client: Client, args: argparse.Namespace) -> int:
    handler = {"start": _start, "status": _status, "stop": _stop, "follow": _follow}[args.train_action]
    return handler(client, args)


def _start(client: Client, args: argparse.Namespace) -> int:
    request: dict[str, Any] = {
        "model": args.model, "dataset": args.dataset, "batch_size": args.batch_size,
        "checkpoint_every": args.checkpoint_every, "seed": args.seed,
        "optimizer": {"name": args.optimizer, "lr": args.lr},
    }
    if args.epochs is not None:
        request["epochs"] = args.epochs
    else:
        request["steps"] = args.steps if args.steps is not None else 200
    for key in ("job", "config", "name"):
        if getattr(args, key) is not None:
            request[key] = getattr(args, key)
    if not args.follow:
        reply = client.call_args(args.service, "train_start", request, timeout=args.timeout or _START_TIMEOUT_S)
        print(dump_json(reply) if args.json else f"{reply['job']}: {reply['state']} ({reply.get('steps', '?')} steps)")
        return EXIT_OK
    # Subscribe before starting: the first progress events may come before the reply.
    with client.events("train.*") as stream:
        reply = client.call_args(args.service, "train_start", request, timeout=args.timeout or _START_TIMEOUT_S)
        if not args.json:
            print(f"{reply['job']}: {reply['state']} ({reply.get('steps', '?')} steps)", flush=True)
        return _watch(stream, reply["job"], int(reply.get("steps") or 0), args.json)


def _status(client: Client, args: argparse.Namespace) -> int:
    timeout = args.timeout
    if args.job is None:
        jobs = client.call(args.service, "train_status", timeout=timeout)
        print(dump_json(jobs) if args.json else status_table(jobs))
    else:
        job = client.call(args.service, "train_status", job=args.job, timeout=timeout)
        print(dump_json(job) if args.json else job_detail(job))
    return EXIT_OK


def _stop(client: Client, args: argparse.Namespace) -> int:
    reply = client.call(args.service, "train_stop", job=args.job, timeout=args.timeout or _STOP_TIMEOUT_S)
    print(dump_json(reply) if args.json else f"{reply['job']}: {reply['state']} at step {reply.get('step')}")
    return EXIT_OK


def _follow(client: Client, args: argparse.Namespace) -> int:
    with client.events("train.*") as stream:
        # Subscribed first, then asked: an end between the two cannot be missed.
        job = client.call(args.service, "train_status", job=args.job, timeout=args.timeout)
        if job["state"] not in ("running", "stopping"):
            print(dump_json(job) if args.json else f"{job['job']}: {job['state']} at step {job['step']} "
                  f"(loss {_loss(job.get('loss'))})")
            return EXIT_FAILED if job["state"] == "failed" else EXIT_OK
        if not args.json:
            print(progress_bar(int(job["step"]), int(job["steps"]), job.get("loss"), None), flush=True)
        return _watch(stream, args.job, int(job["steps"]), args.json)


def _watch(stream: Any, job: str, steps: int, as_json: bool) -> int:
    """Print the job's events as a progress bar (or JSON lines) until it ends."""
    live = sys.stdout.isatty() and not as_json
    while True:
        env = stream.next_event(_FOLLOW_IDLE_S)
        if env is None:
            print(f"\nmkctl: no event of job {job} for {_FOLLOW_IDLE_S:g}s; giving up (the job may still run)",
                  file=sys.stderr)
            return EXIT_FAILED
        body = wire.body_of(env.message)
        if body.get("job") != job:
            continue
        topic = env.msg_type
        if as_json:
            print(json.dumps({"topic": topic, **body}, default=str), flush=True)
        elif topic == "train.progress":
            line = progress_bar(int(body["step"]), int(body.get("steps") or steps), body.get("loss"), body.get("samples_per_s"))
            print(("\r" + line) if live else line, end="" if live else "\n", flush=True)
        elif topic == "train.resumed":
            print(("\n" if live else "") + f"resumed from the checkpoint at step {body.get('step')}", flush=True)
        if topic in _END_TOPICS:
            if not as_json:
                print(("\n" if live else "") + end_line(topic, body), flush=True)
            return EXIT_FAILED if topic == "train.failed" else EXIT_OK
