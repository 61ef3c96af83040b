"""``mkctl models`` and ``mkctl infer``: the model loader and the inferencer by hand.

::

    mkctl models ls                                            # every loaded version, its state and size
    mkctl models load NAME [--version N] [--weights KEY|PATH] [--arch A] [--config JSON] [--no-wait]
    mkctl models unload NAME [--version N]                     # every version without --version
    mkctl models default NAME VERSION
    mkctl infer [--service inferencer] INPUT... [--json-input] [--deadline-ms MS]

``--weights`` is a store key (default ``models/NAME``) or a safetensors file; a file that exists
here is passed to the loader as an absolute path. ``infer`` sends every INPUT at once (they are
batched together) and prints one result per input, in order: strings as they are, anything else
as JSON. ``--json-input`` reads each INPUT as a JSON value (e.g. a list of numbers).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from typing import Any

from protocols.errors import ErrorCode, MicrokernelError

from microkernel.cli_format import dump_json, render_table
from microkernel.cli_types import int_at_least, json_object, positive_float, sub_actions
from microkernel.client import Client
from microkernel.units import format_size

__all__ = ["register"]

EXIT_OK = 0
_VERSION = int_at_least(1)
LOAD_TIMEOUT = 600.0  # a large model from the store takes a while; the loader keeps going regardless
INFER_TIMEOUT = 60.0
DEFAULT_TIMEOUT = 10.0


def register(command: Callable[..., argparse.ArgumentParser]) -> dict[str, Callable[[Client, argparse.Namespace], int]]:
    """Add ``models`` and ``infer``; return {command_name: handler}."""
    models = command("models", "load, list, unload model versions and pick each model's default (the loader)")
    action = sub_actions(models, "models_action", service="loader", role="loader")

    action("ls", "list loaded model versions (state, size, device, default)")
    p = action("load", "load a model version (waits until it is ready unless --no-wait)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--version", type=_VERSION, metavar="N",
                   help="the version (default: the stored version of models/NAME, else the next free one)")
    p.add_argument("--weights", metavar="KEY|PATH", help="a store key (default models/NAME) or a safetensors file")
    p.add_argument("--arch", metavar="ARCH", help="architecture name or module:attr (default: recorded with the weights)")
    p.add_argument("--config", type=json_object, metavar="JSON", help="model config overrides, a JSON object")
    p.add_argument("--no-wait", dest="wait", action="store_false", help="return once the load has started")
    p = action("unload", "unload a model version (every version without --version) and free its memory")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--version", type=_VERSION, metavar="N")
    p = action("default", "make VERSION the default version of NAME")
    p.add_argument("name", metavar="NAME")
    p.add_argument("version", type=_VERSION, metavar="VERSION")

    infer = command("infer", "run inputs through a model served by an inferencer (batched together)")
    infer.add_argument("inputs", nargs="+", metavar="INPUT", help="one input each (a string, or JSON with --json-input)")
    infer.add_argument("--service", default="inferencer", metavar="NAME", help="the inferencer service (default: inferencer)")
    infer.add_argument("--json-input", action="store_true", help="parse each INPUT as a JSON value")
    infer.add_argument("--deadline-ms", type=positive_float, metavar="MS", help="give up on inputs not started within MS")
    return {"models": _cmd_models, "infer": _cmd_infer}


# --- handlers ----------------------------------------------------------------------------------


def _cmd_models(client: Client, args: argparse.Namespace) -> int:
    action = args.models_action
    if action == "ls":
        rows = client.call(args.service, "list", timeout=args.timeout or DEFAULT_TIMEOUT)
        print(dump_json(rows) if args.json else models_table(rows))
    elif action == "load":
        weights = args.weights
        if weights is not None and os.path.exists(weights):
            weights = os.path.abspath(weights)  # the loader runs elsewhere: a path relative to here means nothing there
        reply = client.call(args.service, "load", name=args.name, version=args.version, weights=weights, arch=args.arch,
                            config=args.config, wait=args.wait, timeout=args.timeout or LOAD_TIMEOUT)
        print(dump_json(reply) if args.json else load_line(reply))
    elif action == "unload":
        reply = client.call(args.service, "unload", name=args.name, version=args.version,
                            timeout=args.timeout or DEFAULT_TIMEOUT)
        versions = ", ".join(f"{u['name']} v{u['version']}" for u in reply["unloaded"])
        print(dump_json(reply) if args.json else f"unloaded {versions} ({format_size(int(reply['freed_bytes']))} freed)")
    else:
        reply = client.call(args.service, "set_default", name=args.name, version=args.version,
                            timeout=args.timeout or DEFAULT_TIMEOUT)
        print(dump_json(reply) if args.json else f"{reply['name']}: default version {reply['version']}")
    return EXIT_OK


def _cmd_infer(client: Client, args: argparse.Namespace) -> int:
    inputs: list[Any] = list(args.inputs)
    if args.json_input:
        try:
            inputs = [json.loads(text) for text in inputs]
        except json.JSONDecodeError as exc:
            raise MicrokernelError(ErrorCode.INVALID_FIELD, f"an INPUT is not valid JSON ({exc.msg}): use --json-input "
                                   "only with JSON inputs") from None
    call_args: dict[str, Any] = {"inputs": inputs}
    if args.deadline_ms is not None:
        call_args["deadline_ms"] = args.deadline_ms
    results = client.call_args(args.service, "infer_many", call_args, timeout=args.timeout or INFER_TIMEOUT)
    if args.json:
        print(dump_json([{"input": x, "result": y} for x, y in zip(inputs, results)]))
    else:
        for y in results:
            print(result_text(y))
    return EXIT_OK


# --- output (pure functions) ---------------------------------------------------------------------


def models_table(rows: list[dict[str, Any]]) -> str:
    """NAME VERSION DEFAULT STATE ARCH SIZE PARAMS DEVICE SOURCE, one row per loaded version."""
    if not rows:
        return "no models loaded"
    table = [[r.get("name"), r.get("version"), "*" if r.get("default") else "", r.get("state"), r.get("arch"),
              format_size(int(r.get("bytes") or 0)), r.get("params"), r.get("device"),
              r.get("source", "") + (f" ({r['error']})" if r.get("error") else "")] for r in rows]
    return render_table(["NAME", "VERSION", "DEFAULT", "STATE", "ARCH", "SIZE", "PARAMS", "DEVICE", "SOURCE"], table)


def load_line(reply: dict[str, Any]) -> str:
    """One line about a load: what, where, how big, in which state."""
    return (f"{reply['name']} v{reply['version']}: {reply.get('state', 'ready')} ({reply.get('arch')}, "
            f"{format_size(int(reply.get('bytes') or 0))}, {reply.get('params')} params, {reply.get('device')})")


def result_text(result: Any) -> str:
    """A result as one line: a string as it is, anything else as compact JSON."""
    if isinstance(result, str):
        return result
    return dump_json(result, indent=None)
