"""The handler contract: one function per control request type.

A handler is ``handler(kernel, envelope) -> reply | None | Awaitable[reply | None]``. Returning
``None`` means no reply (one-way messages such as heartbeats). Synchronous handlers answer
inline on the loop (cheap queries); coroutines run as tasks so slow commands on one service
never block commands on another. Exceptions are turned into error replies in exactly one place,
``microkernel.bus.control``. Registration is explicit: ``microkernel.handlers`` imports every
handler module by name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Handler = Callable[[Any, Any], Any]

HANDLERS: dict[type, Handler] = {}


def handles(message_cls: type) -> Callable[[Handler], Handler]:
    """Register the decorated function as the handler of ``message_cls``."""

    def register(fn: Handler) -> Handler:
        if message_cls in HANDLERS:
            raise ValueError(f"two handlers for {message_cls.__name__}")
        HANDLERS[message_cls] = fn
        return fn

    return register
