"""The echo service of ``bench/rpc.py``.

``echo(text)`` answers ``{"text": text}``, exactly what the raw servers of ``bench/raw.py`` answer,
so that the RPC figures compare the same work on both sides. The module imports numpy, as a
typical ML service does, so that ``restart_to_ready_numpy_ms_p50`` (this service's restarts)
includes a service's own imports; ``bench.services:Pong`` imports nothing beyond the SDK.
"""

from __future__ import annotations

from typing import Any

import numpy  # noqa: F401 - imported for its import time (see above)

from services.base import Service, rpc


class Echo(Service):
    """``echo(text)`` -> ``{"text": text}``: the raw echo's reply, through the SDK."""

    @rpc
    def echo(self, text: str) -> dict[str, Any]:
        return {"text": text}
