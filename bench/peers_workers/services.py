"""Our side of the peers benchmark: the same trivial worker, written as services of the SDK.

* ``NotifyPong`` — ``bench.services:Pong`` that also sends the worker's ``up`` datagram
  (``worker.announce``) from ``setup()``, so crash → "running again" can be measured with the very
  signal the peers' worker sends, next to crash → ``service.ready``.
* ``Hog`` — announces itself the same way; on ``SIGUSR1`` it allocates past
  ``config["limit"]`` bytes with ``worker.grow_past`` and sends the ``cross`` datagram.

Config keys (``[services.<name>.config]``): ``notify`` (the benchmark's datagram socket), ``tag``,
and for ``Hog`` ``limit`` (bytes).
"""

from __future__ import annotations

import asyncio
import signal

from bench.peers_workers.worker import announce, grow_past
from bench.services import Pong
from services.base import Service


class NotifyPong(Pong):
    """``Pong`` that tells the benchmark when its process is running its code again."""

    async def setup(self) -> None:
        announce(self.config["notify"], "up", self.config["tag"])


class Hog(Service):
    """Sleeps until ``SIGUSR1``, then grows its RSS past ``config["limit"]`` and stays there."""

    async def setup(self) -> None:
        path, tag, limit = self.config["notify"], self.config["tag"], int(self.config["limit"])

        def on_usr1() -> None:
            # On the loop, like the plain worker's handler in its main thread: the allocation takes a
            # few tens of ms, far below the heartbeat liveness.
            grow_past(limit, lambda t_ns: announce(path, "cross", tag, t_ns))

        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, on_usr1)
        announce(path, "up", tag)
