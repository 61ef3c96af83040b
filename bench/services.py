"""Bench-only services (supervised by the kernel like any plug-in).

* ``Publisher`` — ``burst(n, size)`` publishes ``n`` events ``bench.tick`` through the kernel's
  event proxy from inside one RPC handler (``Service.publish`` in a loop).
* ``Idle`` — does nothing: heartbeats only. ``bench/scale.py`` starts hundreds of them.
* ``Pong`` — like the echo fixture's ``echo`` but without importing numpy, to show how much of a
  restart is the service's own imports.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from services.base import Service, rpc


class Publisher(Service):
    """Publishes bursts of ~``size``-byte events."""

    @rpc
    async def burst(self, n: int, size: int = 80, topic: str = "bench.tick", chunk: int = 1000) -> int:
        """Publish ``n`` events; yields to the loop every ``chunk`` events so heartbeats keep flowing."""
        data = "x" * size
        publish = self.publish
        for start in range(0, n, chunk):
            for i in range(start, min(n, start + chunk)):
                publish(topic, {"seq": i, "data": data})
            await asyncio.sleep(0)
        return n


class Idle(Service):
    """A minimal idle service: no setup, no handlers beyond a trivial one."""

    @rpc
    def ping(self) -> int:
        return os.getpid()


class Pong(Service):
    """``echo(text)`` without numpy in the process."""

    @rpc
    def echo(self, text: str) -> dict[str, Any]:
        return {"text": text, "service": self.name, "replica": self.replica,
                "incarnation": self.incarnation, "pid": os.getpid()}
