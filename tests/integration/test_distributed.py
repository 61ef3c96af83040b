"""A distributed service's replicas get ranks, a world size and one stable rendezvous from the kernel.

Every wait is on a kernel event, with a generous ceiling.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest

from microkernel.client import Client
from tests.integration.conftest import start_kernel
from tests.integration.test_supervisor import CEILING, is_event, wait_event

RANKED = """
[services.ranks]
entry = "tests.fixtures.echo:Echo"
replicas = 2
distributed = { backend = "gloo" }
backoff = { initial = "0s" }

[services.plain]
entry = "tests.fixtures.echo:Echo"
"""
NAMES = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MK_RANK", "MK_WORLD_SIZE",
         "MK_DIST_BACKEND", "MK_REPLICA"]


def ranks_of(c: Client, service: str, world: int) -> dict[int, dict[str, Any]]:
    """The environment of every replica of ``service``, by replica index (calls until all answered)."""
    seen: dict[int, dict[str, Any]] = {}
    # Load-balanced calls reach a replica only once the client's connection to it is up (on a busy
    # machine that can take longer than many calls to the first one): call until all answered.
    deadline = time.monotonic() + CEILING
    while time.monotonic() < deadline:
        reply = c.call(service, "origin", names=NAMES)
        seen[int(reply["env"]["MK_REPLICA"])] = reply
        if len(seen) == world:
            return seen
    pytest.fail(f"only replicas {sorted(seen)} of {world} answered within {CEILING:g}s")


def test_replicas_are_ranks_of_one_group_with_a_stable_rendezvous(short_tmp: str) -> None:
    with start_kernel(RANKED, short_tmp) as k, Client(runtime_dir=k.runtime_dir, timeout=CEILING) as c:
        c.wait_ready("ranks", timeout=CEILING)
        ranks = ranks_of(c, "ranks", 2)
        envs = {i: r["env"] for i, r in ranks.items()}
        assert [envs[i]["RANK"] for i in (0, 1)] == ["0", "1"]
        assert {e["WORLD_SIZE"] for e in envs.values()} == {"2"}
        assert {e["MK_DIST_BACKEND"] for e in envs.values()} == {"gloo"}
        assert {e["MASTER_ADDR"] for e in envs.values()} == {"127.0.0.1"}
        ports = {e["MASTER_PORT"] for e in envs.values()}
        assert len(ports) == 1 and 0 < int(next(iter(ports))) < 65536

        # A restarted rank rejoins the same rendezvous, with its own rank.
        with c.events("service.*") as stream:
            os.kill(ranks[1]["pid"], signal.SIGKILL)
            wait_event(stream, is_event("service.ready", "ranks", replica=1, incarnation=2))
        with Client(runtime_dir=k.runtime_dir, timeout=CEILING) as fresh:  # a fresh route: both endpoints
            again = ranks_of(fresh, "ranks", 2)
        assert again[1]["pid"] != ranks[1]["pid"]
        assert again[1]["env"]["RANK"] == "1" and again[1]["env"]["MASTER_PORT"] in ports

        # A service that is not distributed gets none of it.
        plain = c.call("plain", "origin", names=NAMES)["env"]
        assert all(plain[n] is None for n in NAMES if n != "MK_REPLICA")


def test_scaling_restarts_every_rank_with_the_new_world_size(short_tmp: str) -> None:
    with start_kernel(RANKED, short_tmp) as k, Client(runtime_dir=k.runtime_dir, timeout=CEILING) as c:
        c.wait_ready("ranks", timeout=CEILING)
        before = ranks_of(c, "ranks", 2)
        c.scale("ranks", 3, timeout=CEILING)
        with Client(runtime_dir=k.runtime_dir, timeout=CEILING) as fresh:  # a fresh route: all endpoints
            after = ranks_of(fresh, "ranks", 3)
        assert {r["env"]["WORLD_SIZE"] for r in after.values()} == {"3"}
        assert sorted(r["env"]["RANK"] for r in after.values()) == ["0", "1", "2"]
        # Ranks 0 and 1 were restarted, not kept with a stale world size.
        assert all(after[i]["pid"] != before[i]["pid"] for i in (0, 1))
        assert {r["env"]["MASTER_PORT"] for r in after.values()} == {before[0]["env"]["MASTER_PORT"]}
