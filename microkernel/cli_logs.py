"""``mkctl logs``: show and follow a service's captured stdout/stderr.

.. code-block:: sh

    mkctl logs echo                 # the last 100 records of every replica
    mkctl logs echo -n 20 --replica 1
    mkctl logs echo -f              # then follow (Ctrl-C to stop)

Each record is ``<time> <replica> <out|err> <text>``. Everything goes over the control socket,
so it works wherever ``mkctl status`` does (a remote kernel included).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

from protocols.errors import ErrorCode, MicrokernelError

from microkernel.cli_types import int_at_least
from microkernel.client import Client

__all__ = ["register"]

EXIT_OK = 0
FOLLOW_WAIT_S = 5.0
"""How long the kernel holds one follow request when nothing new is written (a long poll)."""
DEFAULT_LINES = 100


def register(command: Callable[..., argparse.ArgumentParser]) -> dict[str, Callable[[Client, argparse.Namespace], int]]:
    """Add ``mkctl logs``; return ``{"logs": handler}``."""
    p = command("logs", "show a service's captured stdout/stderr (-f: then follow it)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("-n", "--lines", type=int_at_least(0), default=DEFAULT_LINES, metavar="N",
                   help=f"how many of the last records to show first (default {DEFAULT_LINES})")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new records (Ctrl-C to stop)")
    p.add_argument("--replica", type=int_at_least(0), metavar="I", help="only the records of replica I")
    return {"logs": _cmd_logs}


def _print(args: argparse.Namespace, service: str, lines: list[str]) -> None:
    for line in lines:
        if args.json:
            print(json.dumps({"service": service, "record": line}, ensure_ascii=False), flush=True)
        else:
            print(line, flush=True)


def _cmd_logs(client: Client, args: argparse.Namespace) -> int:
    reply = client.logs(args.name, args.lines, replica=args.replica)
    _print(args, args.name, reply["lines"])
    cursor: dict[str, Any] = reply["cursor"]
    while args.follow:
        try:
            reply = client.logs(args.name, 0, replica=args.replica, cursor=cursor, wait_s=FOLLOW_WAIT_S)
        except MicrokernelError as exc:
            if exc.code is not ErrorCode.RATE_LIMITED:
                raise
            # Following is many requests; a kernel with a rate limit says when to come back.
            time.sleep(min(5.0, float(exc.details.get("retry_after_ms", 200)) / 1000))
            continue
        _print(args, args.name, reply["lines"])
        cursor = reply["cursor"]
    return EXIT_OK
