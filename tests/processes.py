"""Process assertions shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterable

import psutil


def assert_all_gone(pids: Iterable[int], timeout: float) -> None:
    """Wait (ceiling ``timeout``) for ``pids`` to be gone; zombies count as gone, and ours get reaped.

    psutil.wait_procs retries waitpid each round, so it copes with processes that become our children
    (pytest is a subreaper) while it waits.
    """
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    still = []
    for p in alive:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                still.append(p.pid)
        except psutil.NoSuchProcess:
            continue
    assert not still, f"still alive: {still}"
