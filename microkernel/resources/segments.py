"""Shared-memory segments left behind by replicas: the kernel unlinks them when their owner dies.

Services put large tensors in POSIX shared memory (``protocols.shm``), named after the kernel and
the owning process (the kernel's pid is its replicas' ``MK_KERNEL_PID``: this process's pid). A
dead process cannot unlink its own segments, so the kernel does it: for the replica that exited,
and at start and stop for any segment whose owner is gone (descendants of replicas, replicas of a
kernel that was killed). Receivers that already mapped a segment keep their mapping: unlinking only
removes the name. These run in the kernel's thread pool.
"""

from __future__ import annotations

import logging
import os

from protocols import shm

log = logging.getLogger("microkernel.resources")


def reap_replica(pid: int) -> int:
    """Unlink the segments of this kernel's replica ``pid`` and of any other dead owner; returns the count."""
    try:
        count = shm.sweep(kernel_pid=os.getpid(), owner_pid=pid) + shm.sweep_orphans()
    except OSError as exc:
        log.warning("could not clean up the shared memory of pid %d: %s", pid, exc)
        return 0
    if count:
        log.info("unlinked %d shared-memory segment(s) left by pid %d and other exited processes", count, pid)
    return count


def reap_all(*, own: bool = False) -> int:
    """At start: segments of dead owners; at stop (``own``): also every one of this kernel."""
    try:
        count = shm.sweep_orphans()
        if own:
            count += shm.sweep(kernel_pid=os.getpid())
    except OSError as exc:
        log.warning("could not clean up shared memory: %s", exc)
        return 0
    if count:
        log.info("unlinked %d leftover shared-memory segment(s)", count)
    return count

