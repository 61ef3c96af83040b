"""``mkctl keygen``, ``mkctl add`` and ``mkctl remove``: CURVE key pairs and services added at run time.

``keygen`` works offline (no kernel needed): it writes ``NAME.key`` (public: give it to the other
side) and ``NAME.key_secret`` (secret, mode 0600) in the ``zmq.auth`` certificate format.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from microkernel.cli_format import dump_json
from microkernel.cli_types import int_at_least, json_object
from microkernel.client import Client
from microkernel.security.keys import KeyFileError, write_key_pair

EXIT_OK = 0
EXIT_FAILED = 1

_KEYGEN_EPILOG = """\
examples:
  mkctl keygen --dir /etc/microkernel --name server      # the kernel's pair (security.server_secret_key)
  mkctl keygen --dir ~/.config/microkernel --name alice  # a client's pair; copy alice.key to the kernel's
                                                         # authorized_keys directory
"""

_ADD_EPILOG = """\
An operator may add an entry the kernel already runs for another service, or an entry point of the
'microkernel.services' group (e.g. greeter, store); a --command, any other module:Class, and the
options python, env and cwd need the admin role.

examples:
  mkctl add greeter2 --entry greeter --replicas 2
  mkctl add web --command python -m http.server 8000
  mkctl add echo2 --entry services.examples.echo:Echo --options '{"restart": "transient"}'
"""


def register(command: Callable[..., argparse.ArgumentParser]) -> dict[str, Callable[[Client, argparse.Namespace], int]]:
    """Add the subcommands to mkctl's parser; returns the ones that talk to a kernel."""
    p = command("keygen", "create a CURVE key pair (NAME.key public, NAME.key_secret secret, mode 0600)",
                epilog=_KEYGEN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=".", metavar="DIR", help="where to write the files (default: the current directory)")
    p.add_argument("--name", default="client", metavar="NAME",
                   help="file name without suffix; for a client it is the key's name in security.roles (default: client)")
    p.add_argument("--force", action="store_true", help="replace existing files")
    p = command("add", "add a service at run time (validated like the configuration file)",
                epilog=_ADD_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", metavar="NAME")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--entry", metavar="ENTRY", help="an entry-point name or module:Class")
    what.add_argument("--command", dest="argv", nargs=argparse.REMAINDER, metavar="ARG",
                      help="a command line (everything after --command; needs admin)")
    p.add_argument("--replicas", type=int_at_least(0), default=1, metavar="N", help="replica count (default 1)")
    p.add_argument("--config", type=json_object, default={}, metavar="JSON", help="the service's settings, a JSON object")
    p.add_argument("--options", type=json_object, default={}, metavar="JSON",
                   help="other service keys as in the config file, a JSON object")
    p = command("remove", "stop a service and forget it")
    p.add_argument("name", metavar="NAME")
    return {"add": _cmd_add, "remove": _cmd_remove}


def keygen(args: argparse.Namespace) -> int:
    """``mkctl keygen``: needs no kernel."""
    try:
        public, secret = write_key_pair(args.dir, args.name, force=args.force)
    except (KeyFileError, OSError) as exc:
        print(f"mkctl: keygen: {getattr(exc, 'reason', None) or exc}", file=sys.stderr)
        return EXIT_FAILED
    if getattr(args, "json", False):
        print(dump_json({"public": str(public), "secret": str(secret)}))
    else:
        print(f"public key: {public}  (give this file to the other side)")
        print(f"secret key: {secret}  (mode 0600; keep it private)")
    return EXIT_OK


OFFLINE: dict[str, Callable[[argparse.Namespace], int]] = {"keygen": keygen}
"""Commands that run without connecting to a kernel."""


def _cmd_add(client: Client, args: argparse.Namespace) -> int:
    if args.argv is not None and not args.argv:
        print("mkctl: add: --command needs the command line after it", file=sys.stderr)
        return 2
    reply = client.add_service(args.name, entry=args.entry, command=args.argv, replicas=args.replicas,
                               config=args.config, options=args.options)
    return _emit(args, reply, f"{reply['name']}: added ({reply['state']})")


def _cmd_remove(client: Client, args: argparse.Namespace) -> int:
    reply = client.remove_service(args.name)
    return _emit(args, reply, f"{reply['name']}: removed")


def _emit(args: argparse.Namespace, reply: Any, human: str) -> int:
    print(dump_json(reply) if args.json else human)
    return EXIT_OK
