"""Argument types and sub-action parsers shared by ``mkctl`` and its service commands.

``cli.py`` and the modules that add commands for the built-in services (``cli_store``,
``cli_models``, ``cli_train``) parse values the same way and accept the global options after a
sub-action too (``mkctl store ls --json``); this module is that one way.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

__all__ = ["int_at_least", "json_object", "positive_float", "sub_actions"]


def positive_float(text: str) -> float:
    """A number > 0 (timeouts, intervals)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An integer type for argparse that is at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its error messages
    return parse


def json_object(text: str) -> dict[str, Any]:
    """A JSON object (keyword arguments, metadata, config overrides)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc.msg} at column {exc.colno}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {type(value).__name__}")
    return value


def sub_actions(parser: argparse.ArgumentParser, dest: str, *, service: str,
                role: str) -> Callable[[str, str], argparse.ArgumentParser]:
    """Sub-actions of ``parser`` (chosen one in ``args.<dest>``); returns ``action(name, help)``.

    Every action accepts the global connection/output options again, so they may follow it, and
    ``--service`` naming the ``role`` service to talk to (default ``service``).
    """
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a value given before the action is not overwritten by a default after it.
    common.add_argument("--endpoint", default=argparse.SUPPRESS, metavar="URL", help=argparse.SUPPRESS)
    common.add_argument("--runtime-dir", default=argparse.SUPPRESS, metavar="DIR", help=argparse.SUPPRESS)
    common.add_argument("--timeout", type=positive_float, default=argparse.SUPPRESS, metavar="SECONDS",
                        help=argparse.SUPPRESS)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output (JSON)")
    common.add_argument("--service", default=service, metavar="NAME", help=f"the {role} service's name (default: {service})")
    actions = parser.add_subparsers(dest=dest, metavar="ACTION", required=True)

    def action(name: str, text: str) -> argparse.ArgumentParser:
        return actions.add_parser(name, help=text, description=text, parents=[common])

    return action
