"""``mkctl store``: put, get and manage the store service's artifacts and tensors by hand.

::

    mkctl store put KEY FILE [--meta JSON] [--tensors|--bytes]   # chunked: any size
    mkctl store get KEY [--version N] [-o FILE]                  # chunked, sha256-verified
    mkctl store stat KEY [--version N]
    mkctl store ls [PREFIX]
    mkctl store rm KEY [--version N]
    mkctl store snapshot DIR
    mkctl store restore DIR

Transfers go through the chunked steps of ``protocols.store`` (the same code services use), so
files larger than one message work. A ``.safetensors`` FILE is stored as tensors (``--bytes``
overrides); ``get`` of tensors writes the safetensors file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from protocols.errors import ErrorCode, MicrokernelError
from protocols.store import FileSource, download, run, upload

from microkernel.cli_format import dump_json, render_table
from microkernel.cli_types import int_at_least, json_object, sub_actions
from microkernel.client import Client

EXIT_OK = 0
_VERSION = int_at_least(1)
TRANSFER_TIMEOUT = 60.0  # per chunk
BACKUP_TIMEOUT = 600.0  # a snapshot copies (and verifies) every blob
DEFAULT_TIMEOUT = 10.0


def register(command: Callable[..., argparse.ArgumentParser]) -> dict[str, Callable[[Client, argparse.Namespace], int]]:
    """Add ``mkctl store …``; return ``{"store": handler}``."""
    parser = command("store", "put, get and manage artifacts and tensors in the store service")
    action = sub_actions(parser, "store_action", service="store", role="store")

    p = action("put", "store FILE as the next version of KEY (any size: sent in chunks)")
    p.add_argument("key", metavar="KEY")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--meta", type=json_object, metavar="JSON", help="a JSON object stored with the version")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--tensors", dest="kind", action="store_const", const="tensors",
                      help="FILE is a safetensors file (the default for *.safetensors)")
    kind.add_argument("--bytes", dest="kind", action="store_const", const="bytes", help="store FILE as plain bytes")
    p = action("get", "write a version of KEY to FILE (or stdout), verified against its sha256")
    p.add_argument("key", metavar="KEY")
    p.add_argument("--version", type=_VERSION, metavar="N", help="the version (default: the latest)")
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    p = action("stat", "show a version of KEY: size, digest, kind, meta, every version")
    p.add_argument("key", metavar="KEY")
    p.add_argument("--version", type=_VERSION, metavar="N", help="the version (default: the latest)")
    p = action("ls", "list keys (starting with PREFIX)")
    p.add_argument("prefix", nargs="?", default="", metavar="PREFIX")
    p = action("rm", "delete KEY (every version, or just --version N)")
    p.add_argument("key", metavar="KEY")
    p.add_argument("--version", type=_VERSION, metavar="N", help="delete only this version")
    p = action("snapshot", "write a consistent copy of the whole store to DIR (new or empty, on the store's host)")
    p.add_argument("directory", metavar="DIR")
    p = action("restore", "replace the whole store by the snapshot in DIR")
    p.add_argument("directory", metavar="DIR")
    return {"store": _cmd_store}


def _caller(client: Client, args: argparse.Namespace, default_timeout: float) -> Callable[[str, dict[str, Any]], Any]:
    timeout = getattr(args, "timeout", None) or default_timeout
    service = getattr(args, "service", "store")
    return lambda method, call_args: client.call_args(service, method, call_args, timeout=timeout)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _print(args: argparse.Namespace, reply: Any, human: str) -> int:
    print(dump_json(reply) if getattr(args, "json", False) else human)
    return EXIT_OK


def _cmd_store(client: Client, args: argparse.Namespace) -> int:
    return _ACTIONS[args.store_action](client, args)


def _put(client: Client, args: argparse.Namespace) -> int:
    kind = args.kind or ("tensors" if args.file.endswith(".safetensors") else "bytes")
    try:
        source = FileSource(args.file)
    except OSError as exc:
        raise MicrokernelError(ErrorCode.INVALID_FIELD, f"cannot read {args.file}: {exc.strerror}") from None
    with source:
        reply = run(upload(args.key, source, meta=args.meta, kind=kind), _caller(client, args, TRANSFER_TIMEOUT))
    return _print(args, reply, f"stored {reply['key']} version {reply['version']} ({reply['kind']}, "
                               f"{_size(reply['size'])}, sha256 {reply['digest']})")


def _get(client: Client, args: argparse.Namespace) -> int:
    call = _caller(client, args, TRANSFER_TIMEOUT)
    if args.output in (None, "-"):
        if getattr(args, "json", False) and args.output is None:
            return _print(args, call("stat", {"key": args.key, "version": args.version}), "")
        out = sys.stdout.buffer
        info = run(download(args.key, out, version=args.version), call)
        out.flush()
        if getattr(args, "json", False):
            print(dump_json(info), file=sys.stderr)
        return EXIT_OK
    target = Path(args.output)
    part = target.with_name(target.name + ".part")
    try:
        f = open(part, "wb")  # complete and verified, or not there at all
    except OSError as exc:
        raise MicrokernelError(ErrorCode.INVALID_FIELD, f"cannot write {part}: {exc.strerror}") from None
    try:
        with f:
            info = run(download(args.key, f, version=args.version), call)
        os.replace(part, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
    return _print(args, {**info, "path": str(target)},
                  f"wrote {info['key']} version {info['version']} ({info['kind']}, {_size(info['size'])}) to {target}")


def _stat(client: Client, args: argparse.Namespace) -> int:
    reply = _caller(client, args, DEFAULT_TIMEOUT)("stat", {"key": args.key, "version": args.version})
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(reply["created_ns"] / 1e9)) if "created_ns" in reply else "-"
    lines = [
        f"key:      {reply['key']}",
        f"version:  {reply['version']} (versions: {', '.join(map(str, reply['versions']))})",
        f"kind:     {reply['kind']}",
        f"size:     {_size(reply['size'])} ({reply['size']} bytes)",
        f"sha256:   {reply['digest']}",
        f"created:  {created}",
        f"meta:     {json.dumps(reply['meta'])}",
    ]
    return _print(args, reply, "\n".join(lines))


def _ls(client: Client, args: argparse.Namespace) -> int:
    rows = _caller(client, args, DEFAULT_TIMEOUT)("list", {"prefix": args.prefix})
    table = render_table(["KEY", "LATEST", "VERSIONS", "SIZE"],
                         [[r["key"], r["latest"], len(r["versions"]), _size(r["size"])] for r in rows])
    return _print(args, rows, table if rows else f"no keys{' starting with ' + repr(args.prefix) if args.prefix else ''}")


def _rm(client: Client, args: argparse.Namespace) -> int:
    reply = _caller(client, args, DEFAULT_TIMEOUT)("delete", {"key": args.key, "version": args.version})
    n = reply["deleted"]
    return _print(args, reply, f"deleted {n} version{'s' if n != 1 else ''} of {args.key}")


def _snapshot(client: Client, args: argparse.Namespace) -> int:
    directory = os.path.abspath(args.directory)
    reply = _caller(client, args, BACKUP_TIMEOUT)("snapshot", {"directory": directory})
    return _print(args, reply, f"snapshot of {reply['objects']} versions of {reply['keys']} keys "
                               f"({reply['blobs']} blobs, {_size(reply['bytes'])}) written to {directory}")


def _restore(client: Client, args: argparse.Namespace) -> int:
    directory = os.path.abspath(args.directory)
    reply = _caller(client, args, BACKUP_TIMEOUT)("restore", {"directory": directory})
    return _print(args, reply, f"restored {reply['objects']} versions of {reply['keys']} keys "
                               f"({reply['blobs']} blobs, {_size(reply['bytes'])}) from {directory}")


_ACTIONS: dict[str, Callable[[Client, argparse.Namespace], int]] = {
    "put": _put, "get": _get, "stat": _stat, "ls": _ls, "rm": _rm, "snapshot": _snapshot, "restore": _restore,
}
