"""The ``[limits]`` table: how much one client may ask of the kernel's control socket.

.. code-block:: toml

    [limits]
    rate_per_s = 2000              # requests per second per client identity (0: no rate limit)
    burst = 4000                   # requests a client may send at once after being idle
    max_clients = 10000            # client identities remembered (least recently seen forgotten)
    rejections_per_s = 100         # rate_limited replies per client per second, then silent drops
    max_inflight_per_client = 64   # async requests of one client running at once (0: no limit)
    max_inflight = 1024            # async requests of all clients running at once (0: no limit)
    max_queue = 1000               # ZeroMQ high-water marks of the control socket, per peer

The message-size limit is ``[kernel] max_message_size``; the runtime side of these settings is
:mod:`microkernel.bus.limits`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from microkernel.config_reader import Table

__all__ = ["LIMITS_KEYS", "LimitSettings", "parse_limits"]

LIMITS_KEYS: Final = (
    "rate_per_s", "burst", "max_clients", "rejections_per_s", "max_inflight_per_client", "max_inflight",
    "max_queue",
)  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitSettings:
    """The ``[limits]`` table. The defaults are far above what mkctl, clients and services send."""

    rate_per_s: float = 2000.0
    """Sustained control requests per second per client identity; 0 turns the rate limit off."""
    burst: int = 4000
    """Bucket size: requests a client may send in one burst after being idle."""
    max_clients: int = 10_000
    """Rate-limit buckets kept; past it the least recently seen client's bucket is forgotten."""
    rejections_per_s: int = 100
    """``rate_limited`` replies per client per second; further rejected requests are dropped unanswered."""
    max_inflight_per_client: int = 64
    """Asynchronous requests (start, stop, scale, queued leases …) one client may have running; 0: no limit."""
    max_inflight: int = 1024
    """Asynchronous requests of all clients running at once; 0: no limit."""
    max_queue: int = 1000
    """ZeroMQ send and receive high-water marks of the control socket, in messages per peer."""


def parse_limits(table: Table | None) -> LimitSettings:
    """Validate ``[limits]``; an absent table gives the defaults."""
    defaults = LimitSettings()
    if table is None:
        return defaults
    table.check_keys(LIMITS_KEYS)
    rate = table.number("rate_per_s", defaults.rate_per_s, minimum=0.0)
    burst = table.integer("burst", defaults.burst, minimum=1)
    return LimitSettings(
        rate_per_s=rate,
        burst=burst,
        max_clients=table.integer("max_clients", defaults.max_clients, minimum=1),
        rejections_per_s=table.integer("rejections_per_s", defaults.rejections_per_s, minimum=0),
        max_inflight_per_client=table.integer("max_inflight_per_client", defaults.max_inflight_per_client, minimum=0),
        max_inflight=table.integer("max_inflight", defaults.max_inflight, minimum=0),
        max_queue=table.integer("max_queue", defaults.max_queue, minimum=1),
    )
