"""The trivial worker every supervisor in ``bench/peers.py`` runs: it announces itself, then sleeps.

Usage (as circus and supervisord start it)::

    python bench/peers_workers/worker.py NOTIFY_SOCKET TAG [--hog LIMIT_BYTES]

At start it sends one datagram ``up TAG PID T_NS`` to the benchmark's unix datagram socket
(``T_NS`` = ``time.monotonic_ns()``, one clock for every process on the host), then blocks in
``signal.pause()``. With ``--hog``, ``SIGUSR1`` makes it allocate (and touch) memory until its own
RSS is above ``LIMIT_BYTES``; it sends ``cross TAG PID T_NS`` just before the step that crosses,
allocates a little more so it stays clearly above, and sleeps again until its supervisor kills it.

Only the standard library is imported, so the worker costs every supervisor the same interpreter
start; our own services (``bench/peers_workers/services.py``) reuse ``announce`` and ``grow_past``.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from collections.abc import Callable

CHUNK = 1024 * 1024  # allocation step: the crossing is stamped within one 1 MiB step of it
OVERSHOOT_CHUNKS = 16  # stay 16 MiB above the limit, so no sampler can see us just under it
_PAGE = os.sysconf("SC_PAGE_SIZE")

# What grow_past allocated: kept alive until the process dies.
_hoard: list[bytes] = []


def announce(path: str, kind: str, tag: str, t_ns: int | None = None) -> None:
    """Send ``KIND TAG PID T_NS`` to the benchmark's datagram socket; never raises."""
    stamp = time.monotonic_ns() if t_ns is None else t_ns
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(f"{kind} {tag} {os.getpid()} {stamp}".encode(), path)
    except OSError:
        pass  # the benchmark is gone: nobody to tell


def rss_bytes() -> int:
    """This process's resident set size, from ``/proc/self/statm`` (no psutil in the worker)."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE


def grow_past(limit: int, on_cross: Callable[[int], None]) -> None:
    """Allocate touched memory past ``limit`` bytes of RSS; ``on_cross(monotonic_ns)`` at the crossing.

    ``on_cross`` runs just *before* the step that takes RSS over the limit: a supervisor may kill
    the process at any moment after the crossing, and the benchmark must have heard of it by then.
    The stamp is therefore at most one 1 MiB step early (a fraction of a millisecond).
    """
    announced = False
    while True:
        rss = rss_bytes()
        if rss > limit:
            break
        if not announced and rss + CHUNK > limit:
            on_cross(time.monotonic_ns())
            announced = True
        _hoard.append(b"\x01" * CHUNK)  # a filled bytes object: every page is touched
    if not announced:  # a step grew RSS by more than a step (allocator overhead): still tell
        on_cross(time.monotonic_ns())
    for _ in range(OVERSHOOT_CHUNKS):
        _hoard.append(b"\x01" * CHUNK)


def main(argv: list[str]) -> int:
    path, tag = argv[0], argv[1]
    limit = int(argv[argv.index("--hog") + 1]) if "--hog" in argv else None
    if limit is not None:

        def on_usr1(signum: int, frame: object) -> None:
            grow_past(limit, lambda t_ns: announce(path, "cross", tag, t_ns))

        signal.signal(signal.SIGUSR1, on_usr1)
    announce(path, "up", tag)
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
