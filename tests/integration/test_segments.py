"""The kernel unlinks the shared-memory segments of a replica that exits, whatever the reason.

Every wait is on a kernel event, with a generous ceiling.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from microkernel.client import Client
from tests.integration.conftest import start_kernel
from tests.integration.test_supervisor import CEILING, is_event, wait_event

ECHO = """
[services.echo]
entry = "tests.fixtures.echo:Echo"
backoff = { initial = "0s" }
"""
SHM = Path("/dev/shm")


def test_segments_of_a_killed_replica_are_gone_when_its_exit_is_reported(short_tmp: str) -> None:
    with start_kernel(ECHO, short_tmp) as k, Client(runtime_dir=k.runtime_dir, timeout=CEILING) as c:
        c.wait_ready("echo", timeout=CEILING)
        pid = c.call("echo", "origin", names=[])["pid"]
        names = [c.call("echo", "make_segment", size=1 << 20) for _ in range(2)]
        assert all((SHM / n).exists() for n in names)
        assert all(n.startswith(f"mk.{k.proc.pid}.{pid}.") for n in names)
        with c.events("service.*") as stream:
            os.kill(pid, signal.SIGKILL)
            wait_event(stream, is_event("service.exited", "echo", pid=pid))
        assert not any((SHM / n).exists() for n in names)

        # ... and at shutdown, those of the running replicas too.
        c.wait_ready("echo", timeout=CEILING)
        name = c.call("echo", "make_segment", size=4096)
        assert (SHM / name).exists()
        c.shutdown()
        assert k.proc.wait(timeout=CEILING) == 0
        assert not (SHM / name).exists()
