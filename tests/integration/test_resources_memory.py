"""Memory budgets and admission end to end: a real daemon sampling real, growing processes.

Every wait is on an event from the kernel's bus, with a generous ceiling.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import pytest
import zmq

from microkernel.client import Client
from protocols import messages, wire
from protocols.errors import CallTimeout, RemoteError
from protocols.transport import SyncRequester
from tests.integration.conftest import start_kernel
from tests.integration.test_supervisor import CEILING, is_event, wait_event
from tests.processes import assert_all_gone

MEMHOG = 'entry = "tests.fixtures.memhog:MemHog"'
MIB = 1024 * 1024
FAST_SAMPLING = """
[kernel]
memory_sample_interval = "50ms"
"""


def _data(env: wire.Envelope) -> dict:
    return wire.body_of(env.message)


def until(condition: Callable[[], Any], what: str, ceiling: float = CEILING) -> Any:
    """The first truthy value of ``condition()`` (a query to the kernel), failing after the ceiling."""
    deadline = time.monotonic() + ceiling
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
    pytest.fail(f"{what}: not within {ceiling:g}s")


def sampling_rounds(c: Client) -> int:
    return c.status()["kernel"]["resources"]["memory"]["rounds"]


def call_replica(c: Client, service: str, replica: int, method: str, timeout: float = CEILING, **args):
    """Call one particular replica (the data plane round-robins over all of them)."""
    status = c.status(service)["services"][0]
    endpoint = status["replicas"][replica]["endpoint"]
    assert endpoint, f"{service}[{replica}] is not ready: {status['replicas'][replica]}"
    requester = SyncRequester(zmq.Context.instance(), [endpoint], sender="test")
    try:
        return requester.request(messages.RpcRequest(method=method, args=args), timeout=timeout).message.result
    finally:
        requester.close()


def test_a_hog_is_killed_at_its_hard_budget_while_its_sibling_keeps_serving(short_tmp: str) -> None:
    config = FAST_SAMPLING + f"""
[services.hog]
{MEMHOG}
replicas = 2
memory = {{ soft = "120MiB", hard = "200MiB" }}
backoff = {{ initial = "10ms", max = "10ms" }}
"""
    with start_kernel(config, short_tmp) as k, Client(runtime_dir=k.runtime_dir) as c:
        c.wait_ready("hog", timeout=CEILING)
        sibling = call_replica(c, "hog", 0, "rss")
        victim = call_replica(c, "hog", 1, "rss")
        with c.events("budget.*", "service.*") as stream:
            with contextlib.suppress(CallTimeout):
                # 300 MiB on top of the interpreter: far above the hard budget. The replica may be
                # killed before it answers.
                call_replica(c, "hog", 1, "hog", timeout=2.0, mib=300)
            hard = wait_event(stream, is_event("budget.exceeded", "hog", limit="hard"))
            assert _data(hard)["replica"] == 1 and _data(hard)["action"] == "kill"
            assert _data(hard)["rss"] > _data(hard)["hard"] == 200 * MIB
            exited = wait_event(stream, is_event("service.exited", "hog", replica=1))
            reason = _data(exited)["reason"]
            assert reason["kind"] == "budget", reason
            assert "hard memory budget" in reason["detail"]
            assert _data(exited)["will_restart"] is True
            # The sibling was never touched and serves throughout.
            assert call_replica(c, "hog", 0, "rss")["pid"] == sibling["pid"]
            ready = wait_event(stream, is_event("service.ready", "hog", replica=1))
            assert _data(ready)["incarnation"] == 2
        assert_all_gone([victim["pid"]], timeout=CEILING)
        status = c.status("hog")["services"][0]
        first, second = status["replicas"]
        assert first["restarts"] == 0 and first["incarnation"] == 1
        assert second["last_exit"]["kind"] == "budget"
        assert status["resources"]["memory"] == {"soft": 120 * MIB, "hard": 200 * MIB}


def test_soft_crossing_is_reported_once_then_cleared(short_tmp: str) -> None:
    config = FAST_SAMPLING + f"""
[services.hog]
{MEMHOG}
memory = {{ soft = "150MiB", hard = "1GiB" }}
"""
    with start_kernel(config, short_tmp) as k, Client(runtime_dir=k.runtime_dir) as c:
        c.wait_ready("hog", timeout=CEILING)
        with c.events("budget.*") as stream:
            grown = c.call("hog", "hog", mib=200)
            soft = wait_event(stream, is_event("budget.exceeded", "hog"))
            assert _data(soft)["limit"] == "soft" and _data(soft)["action"] == "event"
            assert _data(soft)["soft"] == 150 * MIB and _data(soft)["hard"] == 1024 * MIB
            assert _data(soft)["pid"] == grown["pid"]
            # Still above the soft limit, sampled again and again: no new event until it clears.
            c.call("hog", "hog", mib=20)
            first = sampling_rounds(c)
            until(lambda: sampling_rounds(c) >= first + 3, "three more sampling rounds")
            c.call("hog", "free")
            later = []
            cleared = wait_event(stream, lambda e: later.append(e) or e.msg_type == "budget.cleared")
            assert _data(cleared)["rss"] < 150 * MIB
            assert [e.msg_type for e in later] == ["budget.cleared"]
        assert c.status("hog")["services"][0]["replicas"][0]["last_exit"] is None


def test_admission_refuses_a_service_that_does_not_fit_and_starts_nothing(short_tmp: str) -> None:
    config = f"""
[kernel]
memory_pool = "1GiB"
[services.big]
{MEMHOG}
replicas = 2
memory = "600MiB"
[services.small]
{MEMHOG}
autostart = false
memory = "300MiB"
"""
    with start_kernel(config, short_tmp) as k, Client(runtime_dir=k.runtime_dir) as c:
        # 2 x 600 MiB does not fit a 1 GiB pool: big never starts; nothing of it is spawned.
        status = c.status()
        big = next(s for s in status["services"] if s["name"] == "big")
        assert big["state"] == "stopped"
        assert all(r["pid"] is None and r["incarnation"] == 0 for r in big["replicas"])
        assert "not enough host memory" in big["replicas"][0]["detail"]
        pool = status["kernel"]["resources"]["memory"]["pool"]
        assert pool["capacity"] == 1024 * MIB and pool["used"] == 0
        with pytest.raises(RemoteError) as refused:
            c.start("big")
        assert refused.value.code.value == "bad_state"
        assert "needs 1.17 GiB" in refused.value.reason and "1 GiB pool" in refused.value.reason
        # The other service fits, starts, and then holds its reservation.
        c.start("small")
        pool = c.status()["kernel"]["resources"]["memory"]["pool"]
        assert pool["used"] == 300 * MIB
        assert pool["holders"] == [{"service": "small", "replica": 0, "bytes": 300 * MIB}]
        # Scaling big down to one replica makes it fit next to small.
        c.scale("big", 1, wait=False)
        c.start("big")
        c.wait_ready("big", timeout=CEILING)
        assert c.status()["kernel"]["resources"]["memory"]["pool"]["used"] == 900 * MIB


def test_scale_up_beyond_the_pool_is_refused_and_leaves_the_running_replicas_alone(short_tmp: str) -> None:
    config = f"""
[kernel]
memory_pool = "1GiB"
[services.w]
{MEMHOG}
memory = "400MiB"
"""
    with start_kernel(config, short_tmp) as k, Client(runtime_dir=k.runtime_dir) as c:
        c.wait_ready("w", timeout=CEILING)
        before = c.status("w")["services"][0]
        with pytest.raises(RemoteError) as refused:
            c.scale("w", 3)
        assert refused.value.code.value == "bad_state"
        assert "3 replicas of w" in refused.value.reason
        after = c.status("w")["services"][0]
        assert after["desired_replicas"] == 1 and len(after["replicas"]) == 1
        assert after["replicas"][0]["pid"] == before["replicas"][0]["pid"]
        assert c.status()["kernel"]["resources"]["memory"]["pool"]["used"] == 400 * MIB
        # Two fit; stopping gives everything back.
        c.scale("w", 2)
        assert c.status()["kernel"]["resources"]["memory"]["pool"]["used"] == 800 * MIB
        c.stop("w")
        assert c.status()["kernel"]["resources"]["memory"]["pool"]["used"] == 0


def test_status_reports_usage_and_why_cgroups_are_not_used(short_tmp: str) -> None:
    config = f"""
[services.w]
{MEMHOG}
"""
    with start_kernel(config, short_tmp) as k, Client(runtime_dir=k.runtime_dir) as c:
        c.wait_ready("w", timeout=CEILING)
        pid = c.call("w", "rss")["pid"]
        first = sampling_rounds(c)
        until(lambda: sampling_rounds(c) >= first + 2, "two sampling rounds")
        replica = c.status("w")["services"][0]["replicas"][0]
        assert replica["usage"]["pid"] == pid
        assert replica["usage"]["rss"] > 10 * MIB and replica["usage"]["threads"] >= 1
        kernel = c.status()["kernel"]
        cgroups = kernel["resources"]["cgroups"]
        assert cgroups["available"] is False and cgroups["reason"]  # cgroup v1 on this machine
        assert kernel["thread_pool_size"] >= 1
        assert kernel["resources"]["memory"]["sampling"] is True
