"""A 256 MiB tensor between processes: shared memory against memcpy, frames and pickle, one run.

Usage::

    .venv/bin/python bench/tensor.py            # full run (~1 minute)
    .venv/bin/python bench/tensor.py --quick    # CI smoke run (64 MiB, fewer rounds)

Prints exactly one JSON line on stdout (progress on stderr). Every figure is the median of the
rounds, in GB/s (10^9 bytes per second) of the tensor's size. What is timed, per round: from
the call until the caller holds a usable numpy array with the data (a read-only array over the
mapped segment: its pages are mapped lazily). ``*_touched_*`` variants also read one byte of
every 4 KiB page of the received array (so every page is faulted in), which is what a consumer
reading the whole tensor pays on top.

* ``memcpy_gbps``: ``np.copyto`` of 256 MiB into an already-touched buffer, in this process, one
  sample before every transfer round (``memcpy_same_rounds_gbps``: those taken between the
  service-to-service rounds, the base of ``tensor_vs_memcpy``).
* ``service_to_client_gbps``: ``Client.call("tensors", "tensor")``; the service holds an
  ordinary numpy array, which its reply copies into a pooled shared-memory segment.
* ``service_to_service_gbps``: the same call made by another service (``Service.call``), timed
  inside that service. ``tensor_vs_memcpy`` is this over ``memcpy_gbps``.
* ``handoff_ms``: ``Client.call("tensors", "shared")``, an array the service keeps in shared
  memory (``protocols.shm.empty``): handed over without copying, at any size.
* ``frames_gbps``: ``service_to_client`` with shared memory off (``MK_SHM_THRESHOLD=off``): zmq
  zero-copy frames over ipc.
* ``pickle_gbps``: a raw pyzmq ROUTER helper replying ``pickle.dumps(array)``; the caller
  ``pickle.loads`` it (what a pickle-based stack pays).
* ``store_to_client_gbps``: ``store.get`` of a 256 MiB tensor put there at the start of the run
  (so its blob file has settled, see docs/draft-store.md): the store maps the blob file and copies
  it into a pooled shared-memory segment, which the reply hands over as it is. The blob was
  verified in full by an earlier get and its file has not changed since, so these gets do not
  check it again. ``store_vs_memcpy`` is this over the memcpy samples taken between these rounds.
* ``store_checked_to_client_gbps``: the same from a store with ``reverify_after = 0``, which checks
  every 1 MiB block's CRC32 on every get (what a blob's first get after a change costs);
  ``store_checked_vs_memcpy`` likewise. Both are absent (with ``store_error``) when the store
  service cannot run.
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from bench.harness import Daemon, Helper, emit, exit_cleanly_on_sigterm, log, ratio
from protocols import shm
from services.base import Service, rpc

MIB = 1 << 20
PAGE = 4096
TARGETS = {"tensor_vs_memcpy": (0.5, 0.9), "store_vs_memcpy": (0.5, 0.9)}


def touch(arr: np.ndarray) -> int:
    """Read one byte of every page (faults the whole mapping in)."""
    return int(arr.reshape(-1).view(np.uint8)[::PAGE].sum())


class Tensors(Service):
    """Holds a tensor of ``config.mib`` MiB, both as a plain array and in shared memory."""

    async def setup(self) -> None:
        n = int(self.config.get("mib", 256)) * MIB // 4
        self.held = np.arange(n, dtype=np.float32)
        self.shared = shm.empty(n, "float32")
        self.shared[:] = self.held

    @rpc
    def tensor(self) -> np.ndarray:
        return self.held

    @rpc(name="shared")
    def shared_tensor(self) -> np.ndarray:
        return self.shared

    @rpc
    async def pull(self, source: str, method: str, rounds: int, touched: bool) -> list[int]:
        """Call ``source.method`` ``rounds`` times; nanoseconds until each array was usable."""
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter_ns()
            arr = await self.call(source, method, timeout=120.0)
            if touched:
                touch(arr)
            times.append(time.perf_counter_ns() - t0)
            del arr
        return times


def gbps(nbytes: int, samples_ns: list[int]) -> float:
    return round(nbytes / statistics.median(samples_ns), 2)


class Memcpy:
    """``np.copyto`` of ``nbytes`` into an already-touched buffer; its samples are taken between the
    transfer rounds, so the ratio compares figures measured under the same background load."""

    def __init__(self, nbytes: int) -> None:
        self.src = np.ones(nbytes, dtype=np.uint8)
        self.dst = np.zeros(nbytes, dtype=np.uint8)
        self.samples: list[int] = []

    def sample(self) -> None:
        t0 = time.perf_counter_ns()
        np.copyto(self.dst, self.src)
        self.samples.append(time.perf_counter_ns() - t0)


def timed(fn: Any, rounds: int, memcpy: Memcpy, touched: bool = False) -> list[int]:
    """``rounds`` timings of ``fn()`` (+ ``touch``), each after a memcpy sample; one warm-up first."""
    fn()  # warm-up: pools, connections, page tables
    out = []
    for _ in range(rounds):
        memcpy.sample()
        t0 = time.perf_counter_ns()
        arr = fn()
        if touched:
            touch(arr)
        out.append(time.perf_counter_ns() - t0)
        del arr
    return out


def pickle_server(mib: int) -> int:
    """Helper: a ROUTER answering every request with a pickled array (exits when stdin closes)."""
    import threading

    import zmq

    arr = np.arange(mib * MIB // 4, dtype=np.float32)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    port_dir = os.environ.get("TMPDIR", "/tmp")
    endpoint = f"ipc://{port_dir}/mk-bench-pickle-{os.getpid()}.sock"
    sock.bind(endpoint)
    print(endpoint, flush=True)
    threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
    while True:
        ident, _ = sock.recv_multipart()
        sock.send_multipart([ident, pickle.dumps(arr)], copy=False)


def pickle_rounds(endpoint: str, rounds: int, memcpy: Memcpy) -> list[int]:
    import zmq

    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoint)

    def one() -> np.ndarray:
        sock.send(b"get")
        return pickle.loads(sock.recv(copy=False).buffer)

    try:
        return timed(one, rounds, memcpy)
    finally:
        sock.close()


def run(quick: bool) -> dict[str, Any]:
    from microkernel.client import Client

    mib = 64 if quick else 256
    rounds = 3 if quick else 7
    nbytes = mib * MIB
    result: dict[str, Any] = {"bench": "tensor", "quick": quick, "size_mib": mib, "rounds": rounds, "cpus": os.cpu_count()}
    t_start = time.monotonic()
    memcpy = Memcpy(nbytes)
    memcpy.sample()

    checked_root = tempfile.mkdtemp(prefix="mk-bench-store-")
    services = {
        "tensors": {"entry": "bench.tensor:Tensors", "config": {"mib": mib}},
        "puller": {"entry": "bench.tensor:Tensors", "config": {"mib": 1}},
        "frames": {"entry": "bench.tensor:Tensors", "config": {"mib": mib}, "env": {"MK_SHM_THRESHOLD": "off"}},
        "store": {"entry": "services.store:Store"},
        "store_checked": {"entry": "services.store:Store", "config": {"root": checked_root, "reverify_after": 0}},
    }
    kernel = {"max_message_size": f"{4 * mib}MiB"}  # frames and the store's put carry the whole tensor
    with Daemon(services, kernel=kernel, ready_timeout=60.0) as daemon, Client(daemon.control, timeout=120.0) as client:
        for name in ("tensors", "puller", "frames"):
            client.wait_ready(name, timeout=120.0)
        try:  # first, so the blob files are well settled when the store is measured
            stored = np.arange(nbytes // 4, dtype=np.float32)
            for name in ("store", "store_checked"):
                client.wait_ready(name, timeout=120.0)
                client.call(name, "put", key="bench/tensor", tensors={"t": stored})
            del stored
        except Exception as exc:  # the store is another component: report, do not fail the transfer figures
            result["store_error"] = f"{type(exc).__name__}: {exc}"
        log("service -> service")

        def pull(touched: bool) -> list[int]:
            client.call("puller", "pull", source="tensors", method="tensor", rounds=1, touched=touched)  # warm-up
            out = []
            for _ in range(rounds):
                memcpy.sample()
                out += client.call("puller", "pull", source="tensors", method="tensor", rounds=1, touched=touched)
            return out

        s2s_memcpy = len(memcpy.samples)
        result["service_to_service_gbps"] = gbps(nbytes, pull(False))
        result["memcpy_same_rounds_gbps"] = gbps(nbytes, memcpy.samples[s2s_memcpy:])
        result["service_to_service_touched_gbps"] = gbps(nbytes, pull(True))
        log("service -> client")
        result["service_to_client_gbps"] = gbps(nbytes, timed(lambda: client.call("tensors", "tensor"), rounds, memcpy))
        result["service_to_client_touched_gbps"] = gbps(
            nbytes, timed(lambda: client.call("tensors", "tensor"), rounds, memcpy, touched=True))
        log("zero-copy hand-over")
        handoff = timed(lambda: client.call("tensors", "shared"), rounds, memcpy)
        result["handoff_ms"] = round(statistics.median(handoff) / 1e6, 3)
        log("frames (shared memory off)")
        result["frames_gbps"] = gbps(nbytes, timed(lambda: client.call("frames", "tensor"), rounds, memcpy))
        if "store_error" not in result:
            try:
                for name in ("store_checked", "store"):
                    log(f"{name} -> client")
                    first = len(memcpy.samples)
                    samples = timed(lambda s=name: client.call(s, "get", key="bench/tensor")["tensors"]["t"], rounds, memcpy)
                    result[f"{name}_to_client_gbps"] = gbps(nbytes, samples)
                    result[f"{name}_vs_memcpy"] = ratio(result[f"{name}_to_client_gbps"], gbps(nbytes, memcpy.samples[first:]))
            except Exception as exc:
                result["store_error"] = f"{type(exc).__name__}: {exc}"
    shutil.rmtree(checked_root, ignore_errors=True)
    log("pickle over zmq")
    with Helper([os.path.abspath(__file__), "--pickle-server", str(mib)]) as helper:
        result["pickle_gbps"] = gbps(nbytes, pickle_rounds(helper.ready_line, rounds, memcpy))
    result["memcpy_gbps"] = gbps(nbytes, memcpy.samples)

    result["tensor_vs_memcpy"] = ratio(result["service_to_service_gbps"], result["memcpy_same_rounds_gbps"])
    result["tensor_touched_vs_memcpy"] = ratio(result["service_to_service_touched_gbps"], result["memcpy_gbps"])
    result["client_vs_memcpy"] = ratio(result["service_to_client_gbps"], result["memcpy_gbps"])
    result["tensor_vs_pickle"] = ratio(result["service_to_service_gbps"], result["pickle_gbps"], 1)
    result["tensor_vs_frames"] = ratio(result["service_to_service_gbps"], result["frames_gbps"], 1)
    result["loadavg_1m"] = round(os.getloadavg()[0], 2)
    result["elapsed_s"] = round(time.monotonic() - t_start, 1)
    return result


def verdicts(result: dict[str, Any]) -> dict[str, str]:
    out = {}
    for key, (bar, aim) in TARGETS.items():
        v = result.get(key)
        out[key] = "FAIL" if v is None or v < bar else ("aim" if v >= aim else "pass")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 MiB and fewer rounds (CI smoke run)")
    parser.add_argument("--pickle-server", type=int, metavar="MIB", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.pickle_server is not None:
        return pickle_server(args.pickle_server)
    exit_cleanly_on_sigterm()
    result = run(args.quick)
    result["verdicts"] = verdicts(result)
    result["pass"] = all(v != "FAIL" for v in result["verdicts"].values())
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
