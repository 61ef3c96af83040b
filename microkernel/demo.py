"""The end-to-end demo: ``python -m microkernel.demo``.

Starts a real ``microkerneld`` on an embedded configuration with the built-in ML services (store,
trainer, loader, and an inferencer with two replicas), then runs the main job the way a user would:
trains the shipped character-level transformer on the shipped corpus with a live progress bar fed
by ``train.progress`` events (checkpointing to the store as it goes), loads the trained weights
into shared memory, starts the inferencer on them, serves batched inference to many concurrent
clients, prints sample outputs and throughput, and shuts everything down cleanly.

The daemon never imports torch: the services do, in their own supervised processes. This module
only talks to them through the client, like any program would.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from microkernel.cli_train import end_line, progress_bar
from microkernel.client import AsyncClient, Client
from microkernel.tour import CEILING_S, Session, run_in_workdir

CONFIG = """\
[kernel]
heartbeat_interval = "1s"

[services.store]
entry = "services.store:Store"

[services.store.config]
root = "{store_root}"

[services.trainer]
entry = "services.trainer:Trainer"
depends_on = ["store"]

[services.loader]
entry = "services.loader:Loader"
depends_on = ["store"]

[services.inferencer]
entry = "services.inferencer:Inferencer"
replicas = 2
cpus = 1                          # one CPU per replica (affinity + one torch thread): no oversubscription
depends_on = ["loader"]
autostart = false                 # it serves the model trained below: started once that exists

[services.inferencer.config]
model = "charformer"
max_batch_size = 32
max_queue_delay_ms = 5
max_queue = 512
"""

PROMPTS = ["The keeper ", "The lamp burned ", "One winter the ", "In the morning, "]


class Plan:
    """How much work the demo does (``--quick`` is for the test suite)."""

    def __init__(self, quick: bool) -> None:
        self.steps = 60 if quick else 400
        self.checkpoint_every = 20 if quick else 100
        self.batch_size = 32
        self.clients = 16 if quick else 64
        self.requests_per_client = 4 if quick else 25
        self.train_ceiling_s = 600.0


class MLDemo(Session):
    """Train, checkpoint, load, serve: the main job end to end."""

    def __init__(self, workdir: Path, verbose: bool, plan: Plan) -> None:
        super().__init__(workdir, verbose, CONFIG.format(store_root=workdir / "store"))
        self.plan = plan

    def run(self) -> None:
        started = time.monotonic()
        self.step("1. Start the daemon with the ML services (store, trainer, loader; inferencer on demand)")
        self.start_daemon()
        with Client(runtime_dir=self.runtime_dir, name="demo", timeout=CEILING_S) as client:
            for name in ("store", "trainer", "loader"):
                client.wait_ready(name, timeout=120.0)
            self.mkctl("status")

            self.step(f"2. Train the shipped char-level transformer for {self.plan.steps} steps "
                      f"(checkpoints every {self.plan.checkpoint_every})")
            finished = self.train(client)
            self.mkctl("train", "status", "demo", check=False)

            self.step("3. Load the trained weights into shared memory (one copy for every inferencer replica)")
            self.mkctl("models", "load", "charformer", "--weights", str(finished["weights"]))
            self.mkctl("models", "ls")

            self.step("4. Start the inferencer (2 replicas, dynamic batching) and ask it a few things")
            self.mkctl("start", "inferencer")
            self.mkctl("infer", *PROMPTS)

            self.step(f"5. Serve {self.plan.clients} concurrent clients")
            self.serve()
            self.mkctl("call", "inferencer", "stats")

        self.step("6. Shut down cleanly (services stop in reverse dependency order)")
        code = self.shutdown()
        print(f"\ndemo finished in {time.monotonic() - started:.1f}s (daemon log: {self.log_path})", flush=True)
        if code != 0:
            raise SystemExit(code)

    def train(self, client: Client) -> dict[str, Any]:
        """Start the job and draw its progress from the event stream until it finishes."""
        plan = self.plan
        with client.events("train.*") as stream:  # live before the job starts: no event is missed
            reply = client.call("trainer", "train_start", job="demo", model="charformer", steps=plan.steps,
                                batch_size=plan.batch_size, checkpoint_every=plan.checkpoint_every)
            print(f">>> client.call('trainer', 'train_start', ...) -> {reply}", flush=True)
            first_loss: float | None = None
            checkpoints = 0
            deadline = time.monotonic() + plan.train_ceiling_s
            while True:
                event = stream.next_event(timeout=max(0.0, deadline - time.monotonic()))
                if event is None:
                    raise SystemExit("demo: training did not finish in time")
                data = event.message.data
                if data.get("job") != "demo":
                    continue
                if event.msg_type == "train.progress":
                    if first_loss is None:
                        first_loss = float(data["loss"])
                    bar = progress_bar(int(data["step"]), plan.steps, data.get("loss"), data.get("samples_per_s"))
                    print("\r" + bar, end="", flush=True)
                elif event.msg_type == "train.checkpointed":
                    checkpoints += 1
                elif event.msg_type in ("train.finished", "train.failed", "train.stopped"):
                    print("\n" + end_line(event.msg_type, data), flush=True)
                    if event.msg_type != "train.finished":
                        raise SystemExit("demo: training did not finish")
                    print(f"loss {first_loss:.3f} -> {float(data['loss']):.3f}; {checkpoints} checkpoints written to "
                          "the store on the way", flush=True)
                    return data

    def serve(self) -> None:
        """Many concurrent clients; the replicas batch their requests."""
        plan = self.plan
        latencies, elapsed, sample = asyncio.run(_load(self.runtime_dir, plan.clients, plan.requests_per_client))
        total = len(latencies)
        print(f"{total} requests from {plan.clients} concurrent clients in {elapsed:.2f}s: "
              f"{total / elapsed:.0f} requests/s; latency p50 {_ms(statistics.median(latencies))}, "
              f"p99 {_ms(_quantile(latencies, 0.99))}", flush=True)
        print(f"a sample: {sample[0]!r} -> {sample[1]!r}", flush=True)


async def _load(runtime_dir: Path, clients: int, per_client: int) -> tuple[list[float], float, tuple[str, Any]]:
    latencies: list[float] = []
    sample: list[tuple[str, Any]] = []
    async with AsyncClient(runtime_dir=runtime_dir, name="demo-load", timeout=CEILING_S) as kernel:
        await kernel.call("inferencer", "infer", input=PROMPTS[0])  # route looked up once, before timing

        async def one_client(i: int) -> None:
            for j in range(per_client):
                prompt = PROMPTS[(i + j) % len(PROMPTS)]
                t0 = time.perf_counter()
                result = await kernel.call("inferencer", "infer", input=prompt)
                latencies.append(time.perf_counter() - t0)
                if not sample:
                    sample.append((prompt, result))

        t0 = time.perf_counter()
        await asyncio.gather(*(one_client(i) for i in range(clients)))
        elapsed = time.perf_counter() - t0
    return latencies, elapsed, sample[0]


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m microkernel.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", "-v", action="store_true", help="also show the daemon's log as it runs")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (config, log, store)")
    parser.add_argument("--quick", action="store_true", help="a shorter run (fewer steps and requests)")
    args = parser.parse_args(argv)
    plan = Plan(args.quick)
    return run_in_workdir(lambda workdir: MLDemo(workdir, verbose=args.verbose, plan=plan), prefix="mk-demo-",
                          keep=args.keep)


if __name__ == "__main__":
    sys.exit(main())
