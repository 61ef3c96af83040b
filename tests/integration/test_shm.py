"""Large tensors by shared memory between real processes under a real microkerneld.

A service returns 64 MiB arrays to the test's client and to another service, and takes 32 MiB
arguments from both; the data arrives
intact, read-only, mapped (not copied) from a segment; afterwards /dev/shm holds no segment of
the processes involved. A receiver killed (-9) before claiming its hand-over leaks nothing once
the sender expires it, or once the sender's own segments are swept after it dies.

``Tensors`` below is the service under test (the runner imports it from this module).
"""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest

from protocols import handover, shm
from services.base import Service, rpc

MIB = 1 << 20
CEILING = 60.0


def backing(arr: Any) -> str:
    """What an array's memory belongs to: 'mmap' for a shared-memory mapping."""
    obj = arr
    for _ in range(64):
        if isinstance(obj, mmap.mmap):
            return "mmap"
        nxt = obj.obj if isinstance(obj, memoryview) else getattr(obj, "base", None)
        if nxt is None:
            return type(obj).__name__
        obj = nxt
    return "?"


def expected(mib: int) -> np.ndarray:
    return np.arange(mib * MIB // 4, dtype=np.int32)


class Tensors(Service):
    """Hands out large arrays; relays another service's arrays; reports its shared-memory state."""

    @rpc
    def make(self, mib: int) -> np.ndarray:
        return expected(mib)

    @rpc
    def make_shared(self, mib: int) -> np.ndarray:
        arr = shm.empty(mib * MIB // 4, "int32")
        arr[:] = expected(mib)
        return arr

    @rpc
    async def relay(self, source: str, mib: int) -> dict[str, Any]:
        arr = await self.call(source, "make", mib=mib, timeout=CEILING)
        return {"correct": bool(np.array_equal(arr, expected(mib))), "backing": backing(arr),
                "writeable": bool(arr.flags.writeable)}

    @rpc
    def inspect(self, x: np.ndarray, mib: int) -> dict[str, Any]:
        return {"correct": bool(np.array_equal(x, expected(mib))), "backing": backing(x),
                "writeable": bool(x.flags.writeable)}

    @rpc
    async def forward(self, target: str, mib: int) -> dict[str, Any]:
        return await self.call(target, "inspect", x=expected(mib), mib=mib, timeout=CEILING)

    @rpc
    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "kernel_pid": shm.kernel_pid(), "pending": handover.pending()}

    @rpc
    def expire_all(self) -> int:
        return handover.expire(now=float("inf"))


pytestmark = pytest.mark.skipif(not shm.available(), reason="needs /dev/shm")

CONFIG = """
[kernel]
heartbeat_interval = "1s"
heartbeat_liveness = 20

[services.tensors]
entry = "tests.integration.test_shm:Tensors"
stop_timeout = "10s"

[services.relay]
entry = "tests.integration.test_shm:Tensors"
stop_timeout = "10s"
"""


@pytest.fixture
def kernel_config() -> str:
    return CONFIG


def segments_of(pids: set[int]) -> list[str]:
    return [n for n in os.listdir(shm.SHM_DIR) if shm.valid_name(n) and int(n.split(".")[2]) in pids]


def test_arrays_reach_a_client_and_a_service_by_shared_memory(kernel) -> None:
    from microkernel.client import Client

    with Client(str(kernel.endpoints.control)) as client:
        client.wait_ready("tensors", timeout=CEILING)
        client.wait_ready("relay", timeout=CEILING)
        infos = [client.call("tensors", "info"), client.call("relay", "info")]
        pids = {infos[0]["pid"], infos[1]["pid"], os.getpid()}
        kernel_pid = infos[0]["kernel_pid"]

        arr = client.call("tensors", "make", mib=64, timeout=CEILING)
        assert backing(arr) == "mmap" and not arr.flags.writeable
        assert np.array_equal(arr, expected(64))
        del arr
        shared = client.call("tensors", "make_shared", mib=64, timeout=CEILING)  # zero-copy hand-over
        assert backing(shared) == "mmap" and np.array_equal(shared, expected(64))
        del shared

        as_received = {"correct": True, "backing": "mmap", "writeable": False}
        assert client.call("relay", "relay", source="tensors", mib=64, timeout=CEILING) == as_received
        # Arguments too: client -> service and service -> service.
        assert client.call("tensors", "inspect", x=expected(32), mib=32, timeout=CEILING) == as_received
        assert client.call("relay", "forward", target="tensors", mib=32, timeout=CEILING) == as_received
        assert client.call("tensors", "info")["pending"] == []  # every hand-over was claimed
        assert client.call("relay", "info")["pending"] == [] and handover.pending() == []
        assert not [n for n in segments_of(pids) if ".h" in n or ".x" in n]
    kernel.proc.send_signal(signal.SIGTERM)
    assert kernel.proc.wait(timeout=CEILING) == 0
    # This process keeps its pool (of the arguments it sent) until it exits or it idles.
    assert [n for n in segments_of({os.getpid()}) if ".p" not in n] == []
    handover.release_all()
    # Graceful exits release the senders' pools; nothing of these processes is left.
    assert segments_of(pids) == []
    if kernel_pid:  # services know their kernel (MK_KERNEL_PID): nothing of that kernel either
        assert [n for n in os.listdir(shm.SHM_DIR) if n.startswith(f"mk.{kernel_pid}.")] == []


RECEIVER = """
import sys, zmq
from protocols import messages, wire
ctx = zmq.Context()
sock = ctx.socket(zmq.DEALER)
sock.connect(sys.argv[1])
sock.send_multipart(wire.encode(messages.RpcRequest(method="make", args={"mib": 32}), sender="doomed"))
sock.poll(60_000)
print("reply waiting, not claimed", flush=True)
sys.stdin.read()
"""


def _doomed_receiver(endpoint: str) -> None:
    """A caller that gets its reply to the socket, never decodes it, and is killed -9."""
    proc = subprocess.Popen([sys.executable, "-c", RECEIVER, endpoint], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "reply waiting, not claimed"
    finally:
        proc.kill()
        proc.wait(timeout=CEILING)
    assert proc.returncode == -signal.SIGKILL


def test_a_receiver_killed_before_claiming_leaks_nothing(kernel) -> None:
    from microkernel.client import Client
    from microkernel.client_base import event_service

    with Client(str(kernel.endpoints.control)) as client:
        client.wait_ready("tensors", timeout=CEILING)
        endpoint = client.lookup("tensors")["endpoints"][0]
        info = client.call("tensors", "info")

        # 1. The sender expires a hand-over nobody claimed.
        _doomed_receiver(endpoint)
        pending = client.call("tensors", "info")["pending"]
        assert len(pending) == 1 and os.path.exists(os.path.join(shm.SHM_DIR, pending[0]))
        assert client.call("tensors", "expire_all") == 1
        assert not os.path.exists(os.path.join(shm.SHM_DIR, pending[0]))

        # 2. The sender dies too (-9): its segments are swept by (kernel, owner) pid.
        _doomed_receiver(endpoint)
        assert segments_of({info["pid"]})  # the unclaimed hand-over and the sender's pool
        with client.events("service.exited") as exits:
            os.kill(info["pid"], signal.SIGKILL)
            deadline = time.monotonic() + CEILING
            while True:
                event = exits.next_event(deadline - time.monotonic())
                assert event is not None, "no service.exited event"
                if event_service(event) == "tensors":
                    break
        # What the kernel does when a replica exits (a no-op once it has done it already).
        shm.sweep(kernel_pid=info["kernel_pid"], owner_pid=info["pid"])
        assert segments_of({info["pid"]}) == []
