"""``logs_request``: the tail of a service's log, or what was appended after a cursor (long poll).

The files are read in the kernel's thread pool (bounded reads, see :mod:`microkernel.logs.tail`);
a follower with nothing new waits on the log file's write signal — the capture wakes it when it
flushes a batch — never on a polling loop.
"""

from __future__ import annotations

import asyncio
import time

from protocols import messages as m
from protocols.errors import ErrorCode, MicrokernelError
from microkernel.handlers.deadline import wait_until
from microkernel.handlers.registry import handles
from microkernel.logs.tail import Cursor, read_after, read_tail

MAX_LINES = 10_000
MAX_WAIT_S = 30.0


@handles(m.LogsRequest)
def logs(kernel, env):
    req = env.message
    if not isinstance(req.service, str):
        raise MicrokernelError(ErrorCode.INVALID_FIELD, f"service must be a string, got {type(req.service).__name__}")
    kernel.supervisor.service(req.service)  # UNKNOWN_SERVICE names the configured ones
    if isinstance(req.lines, bool) or not isinstance(req.lines, int) or not 0 <= req.lines <= MAX_LINES:
        raise MicrokernelError(ErrorCode.INVALID_FIELD, f"lines must be an integer in 0..{MAX_LINES}, got {req.lines!r}")
    if req.replica is not None and (isinstance(req.replica, bool) or not isinstance(req.replica, int) or req.replica < 0):
        raise MicrokernelError(ErrorCode.INVALID_FIELD, f"replica must be an integer >= 0 or nil, got {req.replica!r}")
    if isinstance(req.wait_s, bool) or not isinstance(req.wait_s, (int, float)) or not req.wait_s >= 0:
        raise MicrokernelError(ErrorCode.INVALID_FIELD, f"wait_s must be a number >= 0, got {req.wait_s!r}")
    cursor = None
    if req.cursor is not None:
        try:
            cursor = Cursor.from_wire(req.cursor)
        except ValueError as exc:
            raise MicrokernelError(ErrorCode.INVALID_FIELD, str(exc)) from None
    # Hold a follower no longer than its caller waits for the reply.
    until = min(time.monotonic() + min(float(req.wait_s), MAX_WAIT_S), wait_until(env, True))  # type: ignore[type-var]
    return _answer(kernel, req, cursor, until)


async def _answer(kernel, req: m.LogsRequest, cursor: Cursor | None, until: float) -> m.LogsReply:
    logs = kernel.logs
    path = logs.path_of(req.service)
    backups = logs.settings.backups
    loop = asyncio.get_running_loop()
    if cursor is None:
        lines, after = await loop.run_in_executor(
            None, lambda: read_tail(path, backups=backups, lines=req.lines, replica=req.replica))
        return m.LogsReply(service=req.service, lines=lines, cursor=after.to_wire(), path=str(path))
    file = logs.file(req.service)
    while True:
        # Taken before reading: a batch flushed while the read runs still wakes us.
        batch = file.next_batch()
        lines, after = await loop.run_in_executor(
            None, lambda: read_after(path, cursor, backups=backups, replica=req.replica))
        if lines or time.monotonic() >= until:
            return m.LogsReply(service=req.service, lines=lines, cursor=after.to_wire(), path=str(path))
        progressed, cursor = after != cursor, after
        # Progress without records (other replicas' lines): read on at once, no waiting.
        if not progressed and not await file.wait_written(until - time.monotonic(), batch):
            return m.LogsReply(service=req.service, lines=[], cursor=after.to_wire(), path=str(path))
