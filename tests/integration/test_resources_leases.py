"""GPU leases end to end on declared devices: the very same lease code a host with NVML runs.

Static leases reach the child's environment and die with the process; run-time leases go through
the kernel's fair queue from clients and from services. Waits are on events or on kernel state,
with generous ceilings.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from typing import Any

import pytest

from microkernel.client import Client
from protocols import wire
from protocols.errors import RemoteError
from tests.integration.conftest import start_kernel
from tests.integration.test_resources_memory import MEMHOG, until
from tests.integration.test_supervisor import CEILING, is_event, wait_event

GIB = 1024**3
DEVICES = """
[[gpu.device]]
uuid = "GPU-aaaa"
name = "fake-16g"
memory = "16GiB"

[[gpu.device]]
uuid = "GPU-bbbb"
name = "fake-8g"
memory = "8GiB"
"""
LEASE_ENV = ["CUDA_VISIBLE_DEVICES", "MK_GPU_LEASE", "MK_GPU_MEMORY_FRACTION"]


def _data(env: wire.Envelope) -> dict:
    return wire.body_of(env.message)


def leases_of(c: Client, holder: str) -> list[dict[str, Any]]:
    return [lease for lease in c.leases()["leases"] if lease["holder"] == holder]


def test_a_static_lease_is_in_the_childs_environment_and_dies_with_the_process(short_tmp: str) -> None:
    config = DEVICES + f"""
[services.trainer]
{MEMHOG}
gpu = {{ count = 1, memory = "4GiB", mode = "shared" }}
backoff = {{ initial = "10ms", max = "10ms" }}

[services.plain]
{MEMHOG}
"""
    with start_kernel(config, short_tmp) as k, Client(runtime_dir=k.runtime_dir) as c:
        c.wait_ready("trainer", timeout=CEILING)
        c.wait_ready("plain", timeout=CEILING)
        env = c.call("trainer", "environ", names=LEASE_ENV)
        # Shared leases pack onto the fullest device that fits: the 8 GiB one.
        assert env["CUDA_VISIBLE_DEVICES"] == "GPU-bbbb"
        assert env["MK_GPU_MEMORY_FRACTION"] == "0.500000"
        lease = c.call("trainer", "lease_info")
        assert lease["devices"] == ["GPU-bbbb"] and lease["memory"] == [4 * GIB] and lease["mode"] == "shared"
        assert lease["fractions"] == [0.5]
        # A service without a lease sees no device at all.
        assert c.call("plain", "environ", names=LEASE_ENV) == {
            "CUDA_VISIBLE_DEVICES": "", "MK_GPU_LEASE": "", "MK_GPU_MEMORY_FRACTION": ""}
        assert c.call("plain", "lease_info") is None

        pid = c.call("trainer", "rss")["pid"]
        (first,) = leases_of(c, "trainer/0")
        assert first["pid"] == pid and first["id"] == lease["id"]
        view = c.leases()
        assert view["source"] == "declared"
        device = next(d for d in view["devices"] if d["uuid"] == "GPU-bbbb")
        assert device["used"] == 4 * GIB and device["free"] == 4 * GIB and device["leases"] == [first["id"]]
        status = c.status("trainer")["services"][0]
        assert status["replicas"][0]["leases"][0]["id"] == first["id"]

        with c.events("service.*") as stream:
            os.kill(pid, signal.SIGKILL)
            wait_event(stream, is_event("service.exited", "trainer", pid=pid))
            ready = wait_event(stream, is_event("service.ready", "trainer"))
        (second,) = leases_of(c, "trainer/0")  # the old one was released, a new one granted
        assert second["id"] != first["id"] and second["pid"] == _data(ready)["pid"]
        # A fresh client: the first one's directory still points at the dead replica's endpoint.
        with Client(runtime_dir=k.runtime_dir) as fresh:
            assert fresh.call("trainer", "environ", names=LEASE_ENV)["CUDA_VISIBLE_DEVICES"] == "GPU-bbbb"


def test_run_time_leases_from_clients_queue_fairly_and_time_out_clearly(short_tmp: str) -> None:
    with start_kernel(DEVICES, short_tmp) as k, Client(runtime_dir=k.runtime_dir, name="alice") as alice, \
            Client(runtime_dir=k.runtime_dir, name="bob") as bob:
        both = alice.acquire_lease(2)
        assert both["lease"]["devices"] == ["GPU-aaaa", "GPU-bbbb"] and both["lease"]["mode"] == "exclusive"
        assert both["env"]["CUDA_VISIBLE_DEVICES"] == "GPU-aaaa,GPU-bbbb"
        assert both["lease"]["holder"].startswith("alice@")

        with pytest.raises(RemoteError) as late:
            bob.acquire_lease(1, "2GiB", "shared", timeout=0.2)
        assert late.value.code.value == "timeout"
        assert "no GPU lease" in late.value.reason and "within 200 ms" in late.value.reason
        with pytest.raises(RemoteError) as impossible:
            bob.acquire_lease(3)
        assert impossible.value.code.value == "invalid_field"

        granted: dict[str, Any] = {}
        waiter = threading.Thread(target=lambda: granted.update(bob.acquire_lease(1, "2GiB", "shared", timeout=CEILING)))
        waiter.start()
        try:
            queued = until(lambda: alice.leases()["waiters"], "bob's request in the queue")
            assert queued[0]["holder"].startswith("bob@") and queued[0]["position"] == 0
            assert alice.release_lease(both["lease"]["id"]) is True
        finally:
            waiter.join(CEILING)
        assert granted["lease"]["devices"] == ["GPU-bbbb"]  # packed onto the smaller device
        assert alice.release_lease(both["lease"]["id"]) is False
        view = alice.leases()
        assert view["waiters"] == [] and [lease["id"] for lease in view["leases"]] == [granted["lease"]["id"]]


def test_a_client_lease_bound_to_a_process_is_released_when_it_exits(short_tmp: str) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        with start_kernel(DEVICES, short_tmp) as k, Client(runtime_dir=k.runtime_dir) as c:
            lease = c.acquire_lease(1, pid=sleeper.pid)["lease"]
            assert lease["pid"] == sleeper.pid
            sleeper.kill()
            sleeper.wait()
            until(lambda: not c.leases()["leases"], "the lease of the dead process released")
            with pytest.raises(RemoteError) as gone:
                c.acquire_lease(1, pid=sleeper.pid)
            assert gone.value.code.value == "invalid_field"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_service_leases_at_run_time_through_the_sdk_and_its_exit_releases_them(short_tmp: str) -> None:
    config = DEVICES + f"""
[services.w]
{MEMHOG}
"""
    with start_kernel(config, short_tmp) as k, Client(runtime_dir=k.runtime_dir) as c:
        c.wait_ready("w", timeout=CEILING)
        pid = c.call("w", "rss")["pid"]
        lease = c.call("w", "grab", count=1, memory=GIB, mode="shared")
        assert lease["devices"] == ["GPU-bbbb"] and lease["env"]["CUDA_VISIBLE_DEVICES"] == "GPU-bbbb"
        (held,) = leases_of(c, "w/0")
        assert held["pid"] == pid
        assert c.call("w", "give", lease_id=lease["id"]) is True
        assert leases_of(c, "w/0") == []
        c.call("w", "grab", count=2)
        assert len(leases_of(c, "w/0")[0]["devices"]) == 2
        with c.events("service.*") as stream:
            os.kill(pid, signal.SIGKILL)
            wait_event(stream, is_event("service.exited", "w", pid=pid))
        assert c.leases()["leases"] == []


def test_a_replica_waits_for_its_static_lease_and_gets_it_when_the_holder_dies(short_tmp: str) -> None:
    config = """
[[gpu.device]]
uuid = "GPU-only"
memory = "8GiB"
""" + f"""
[services.solo]
{MEMHOG}
replicas = 2
gpu = 1
start_timeout = "60s"
backoff = {{ initial = "10ms", max = "10ms" }}
"""
    with start_kernel(config, short_tmp) as k, Client(runtime_dir=k.runtime_dir) as c:
        with c.events("service.*", since_seq=0) as stream:
            first = wait_event(stream, is_event("service.ready", "solo"))
            holder, pid = _data(first)["replica"], _data(first)["pid"]
            waiting = until(lambda: c.leases()["waiters"], "the other replica queued for the device")
            assert waiting[0]["holder"] == f"solo/{1 - holder}"
            assert c.status("solo")["services"][0]["replicas"][1 - holder]["detail"] == "waiting for a GPU lease"
            os.kill(pid, signal.SIGKILL)
            second = wait_event(stream, is_event("service.ready", "solo", replica=1 - holder))
        env = c.call("solo", "environ", names=["CUDA_VISIBLE_DEVICES"])
        assert env == {"CUDA_VISIBLE_DEVICES": "GPU-only"}
        assert leases_of(c, f"solo/{1 - holder}")[0]["pid"] == _data(second)["pid"]
