"""Clients find restarted replicas at once: a cached route that lost its peers is looked up again.

Every wait is on a kernel event, with a generous ceiling.
"""

from __future__ import annotations

import asyncio
import os
import signal

import uvloop

from microkernel.client import AsyncClient, Client
from tests.integration.conftest import start_kernel
from tests.integration.test_supervisor import CEILING, is_event, wait_event

ECHO = """
[services.echo]
entry = "tests.fixtures.echo:Echo"
backoff = { initial = "0s" }
"""

# A call right after a restart must not wait out its timeout on the dead replica's endpoint:
# the client's cached route finds no connected peer and is looked up again. The calls' short
# timeout is what would expire if it did not (the restart itself is awaited on events first).
SHORT = 5.0


def test_a_cached_route_to_a_restarted_replica_is_refreshed_not_waited_out(short_tmp: str) -> None:
    with start_kernel(ECHO, short_tmp) as k, Client(runtime_dir=k.runtime_dir, timeout=CEILING) as c:
        c.wait_ready("echo", timeout=CEILING)
        before = c.call("echo", "origin", names=[])["pid"]  # caches the route
        with c.events("service.*") as stream:
            os.kill(before, signal.SIGKILL)
            wait_event(stream, is_event("service.ready", "echo", incarnation=2))
        assert c.call("echo", "origin", names=[], timeout=SHORT)["pid"] != before


def test_call_many_refreshes_a_stale_route_before_its_first_request(short_tmp: str) -> None:
    with start_kernel(ECHO, short_tmp) as k, Client(runtime_dir=k.runtime_dir, timeout=CEILING) as c:
        c.wait_ready("echo", timeout=CEILING)
        before = next(c.call_many("echo", "origin", [{"names": []}]))["pid"]  # caches the route
        with c.events("service.*") as stream:
            os.kill(before, signal.SIGKILL)
            wait_event(stream, is_event("service.ready", "echo", incarnation=2))
        pids = {r["pid"] for r in c.call_many("echo", "origin", [{"names": []}] * 20, window=4, timeout=SHORT)}
        assert len(pids) == 1 and before not in pids


def test_the_async_client_refreshes_a_stale_route_too(short_tmp: str) -> None:
    with start_kernel(ECHO, short_tmp) as k, Client(runtime_dir=k.runtime_dir, timeout=CEILING) as c:
        c.wait_ready("echo", timeout=CEILING)

        async def scenario() -> tuple[int, int]:
            async with AsyncClient(runtime_dir=k.runtime_dir, timeout=CEILING) as ac:
                before = (await ac.call("echo", "origin", names=[]))["pid"]
                with c.events("service.*") as stream:
                    os.kill(before, signal.SIGKILL)
                    await asyncio.to_thread(wait_event, stream, is_event("service.ready", "echo", incarnation=2))
                after = (await ac.call("echo", "origin", names=[], timeout=SHORT))["pid"]
                return before, after

        before, after = _run(scenario())
        assert after != before


def _run(coro):
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)
