"""The host pressure guard in a real daemon: when host RAM in use crosses the threshold, the
lowest-priority replica is killed (reason ``budget``) — not the one that grew.

The threshold is set just above what the host uses when the test starts; a high-priority hog then
allocates well past it. Every wait is on kernel events, with a generous ceiling.
"""

from __future__ import annotations

import threading
from pathlib import Path

import psutil
import pytest

from microkernel.client import Client
from protocols.errors import MicrokernelError
from tests.integration.conftest import start_kernel
from tests.integration.test_supervisor import CEILING, _data, is_event, wait_event

MIB = 1 << 20
MARGIN = 768 * MIB  # room above today's usage for the daemon, its replicas and other noise
HOG = 2 * MARGIN  # what the hog allocates: far past the threshold


def config(threshold: float) -> str:
    return f"""
[kernel]
memory_pressure = {threshold:.6f}
memory_sample_interval = "100ms"
memory_pool = "100%"

[services.grower]
entry = "tests.fixtures.memhog:MemHog"
priority = 10
restart = "temporary"

[services.bystander]
entry = "tests.fixtures.echo:Echo"
priority = 0
restart = "temporary"
"""


def test_the_lowest_priority_replica_is_the_victim_and_exits_with_reason_budget(short_tmp: str) -> None:
    vm = psutil.virtual_memory()
    if vm.available < HOG + 2 * MARGIN:
        pytest.skip(f"needs {(HOG + 2 * MARGIN) // MIB} MiB of available RAM, the host has {vm.available // MIB} MiB")
    threshold = (vm.total - vm.available + MARGIN) / vm.total
    with start_kernel(config(threshold), short_tmp) as k, Client(runtime_dir=k.runtime_dir, timeout=CEILING) as c:
        c.wait_ready("grower", timeout=CEILING)
        c.wait_ready("bystander", timeout=CEILING)
        with c.events("memory.pressure", "service.exited") as stream:
            # The hog may be killed in turn (pressure stays high once the bystander is gone), so its
            # call may never be answered: it is made from a thread of its own and not waited for.
            grow = threading.Thread(target=_hog, args=(k.runtime_dir,), daemon=True)
            grow.start()
            decision = _data(wait_event(stream, lambda e: e.msg_type == "memory.pressure"))
            assert decision["service"] == "bystander" and decision["priority"] == 0
            assert decision["candidates"] == 2 and decision["used_fraction"] > decision["threshold_fraction"]
            exited = _data(wait_event(stream, is_event("service.exited", "bystander")))
            assert exited["reason"]["kind"] == "budget" and exited["pid"] == decision["pid"]
            grow.join(CEILING)
            assert not grow.is_alive()


def _hog(runtime_dir: Path) -> None:
    with Client(runtime_dir=runtime_dir, timeout=CEILING) as c:
        try:
            # The outcome does not matter (the events do): a short timeout, not a wait for a dead peer.
            c.call("grower", "hog", mib=HOG // MIB, timeout=5.0)
        except MicrokernelError:  # killed by the guard before it could answer, or still allocating
            pass
