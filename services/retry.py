"""Calls to another service that ride through its restart.

A service others depend on is away for a few seconds when it restarts (a crash, an upgrade, a
reload, a kill by its memory budget). Its callers then see ``not_ready`` (no ready replica),
``unavailable`` (the replica went away), ``shutting_down`` (it is stopping) or ``timeout`` (a
request lost with a dead replica). :func:`retry_transient` retries exactly those, with a growing
pause, within one time budget; any other error is raised at once::

    from services.retry import retry_transient

    reply = await retry_transient(
        lambda left: self.call("store", "get", key="jobs/a", timeout=left),
        timeout=60.0, what="store get", log=self.log)

``depends_on`` orders starts, nothing more: a dependency that restarts later is the caller's to
wait out (or to fail on, if that is what the caller wants).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from protocols.errors import ErrorCode, MicrokernelError

__all__ = ["TRANSIENT", "retry_transient"]

T = TypeVar("T")

TRANSIENT = frozenset({ErrorCode.NOT_READY, ErrorCode.UNAVAILABLE, ErrorCode.SHUTTING_DOWN, ErrorCode.TIMEOUT})
# Each attempt gets at most this much of what is left, so one request lost with a dead replica does
# not use up the whole budget.
ATTEMPT_S = 20.0
FIRST_PAUSE_S = 0.1
MAX_PAUSE_S = 2.0


async def retry_transient(
    attempt: Callable[[float], Awaitable[T]],
    *,
    timeout: float,
    what: str,
    log: logging.Logger,
    on_retry: Callable[[MicrokernelError, float], Awaitable[None]] | None = None,
    attempt_s: float = ATTEMPT_S,
) -> T:
    """``await attempt(seconds)`` until it returns, retrying transient errors for ``timeout`` in all.

    ``attempt`` gets the seconds the attempt may take (its call's timeout). A transient failure
    (:data:`TRANSIENT`) is logged as a warning naming ``what``, ``on_retry(error, pause)`` is awaited
    (e.g. to report start-up progress), and the next attempt follows a pause doubling from 0.1 s
    to 2 s. Raises the last error once the next attempt would start past ``timeout``, and any
    other error at once.
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    pause = FIRST_PAUSE_S
    while True:
        left = end - loop.time()
        try:
            return await attempt(min(left, attempt_s))
        except MicrokernelError as exc:
            if exc.code not in TRANSIENT or loop.time() + pause >= end:
                raise
            log.warning("%s: %s (%s); retrying in %.1fs", what, exc.code.value, exc.reason, pause)
            if on_retry is not None:
                await on_retry(exc, pause)
        await asyncio.sleep(pause)  # a retry period: the dependency's return is not observable here
        pause = min(pause * 2, MAX_PAUSE_S)
