"""``mkctl``: control a running microkerneld from the shell.

Exit codes: 0 ok; 1 the request failed (the kernel or the service answered with an error, or
timed out); 2 usage error; 3 the kernel is not running or cannot be reached. Expected errors
are one line on stderr (``mkctl: error: <code>: <reason>``), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from protocols.endpoints import ENDPOINT_ENV
from protocols.errors import MicrokernelError

from microkernel.cli_format import (
    brief_table,
    dump_json,
    event_line,
    event_record,
    kernel_line,
    list_table,
    lookup_text,
    ping_line,
    service_detail,
    status_table,
)
from microkernel import cli_keys, cli_logs, cli_models, cli_store, cli_train
from microkernel.cli_resources import leases_text, resources_line, top_table
from microkernel.cli_types import int_at_least, json_object, positive_float
from microkernel.client import Client, KernelUnavailable, resolve_endpoint
from microkernel.security.keys import CLIENT_KEY_ENV, SERVER_KEY_ENV

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_UNAVAILABLE", "EXIT_USAGE", "build_parser", "main", "parse_args"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130

# Global options may come before or after the subcommand; SUPPRESS keeps a later (sub-parser)
# pass from overwriting a value given earlier, and these defaults fill in what nobody gave.
_GLOBAL_DEFAULTS: dict[str, Any] = {"endpoint": None, "runtime_dir": None, "timeout": None, "json": False,
                                     "client_key": None, "server_key": None}

_CALL_EPILOG = """\
The result is printed as JSON. numpy arrays become (nested) lists. Binary data (bytes,
buffers) is summarised as {"$bytes": N}; with --json it is included losslessly as
{"$bytes": N, "$base64": "..."}.

example: mkctl call echo echo '{"text": "hi"}'
"""


def _global_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection and output")
    group.add_argument("--endpoint", default=argparse.SUPPRESS, metavar="URL",
                       help=f"the kernel's control endpoint (default: ${ENDPOINT_ENV}, else the control socket in the runtime dir)")
    group.add_argument("--runtime-dir", default=argparse.SUPPRESS, metavar="DIR",
                       help="the kernel's runtime directory (its control socket is DIR/control.sock)")
    group.add_argument("--timeout", type=positive_float, default=argparse.SUPPRESS, metavar="SECONDS",
                       help="request timeout (default 10 s; 120 s for start/stop/restart/scale/reload)")
    group.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                       help="machine-readable output: one JSON document (events: one JSON object per line)")
    group.add_argument("--client-key", default=argparse.SUPPRESS, metavar="FILE",
                       help=f"tcp + CURVE: this client's secret key file NAME.key_secret (default: ${CLIENT_KEY_ENV})")
    group.add_argument("--server-key", default=argparse.SUPPRESS, metavar="FILE",
                       help=f"tcp + CURVE: the kernel's public key file (default: ${SERVER_KEY_ENV})")
    return common


def build_parser() -> argparse.ArgumentParser:
    """The ``mkctl`` argument parser (subcommand in ``args.command``)."""
    common = _global_options()
    parser = argparse.ArgumentParser(
        prog="mkctl",
        description="Control a running microkerneld: services, calls, events.",
        epilog="exit codes: 0 ok, 1 request failed, 2 usage error, 3 kernel not running/unreachable",
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str, **kwargs: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, parents=[common], **kwargs)

    p = command("status", "show the kernel and its services (one service in detail if NAME is given)")
    p.add_argument("name", nargs="?", metavar="NAME")
    p.add_argument("--brief", action="store_true",
                   help="states only: name, state, ready/desired, restarts (a small reply for health checks and polling)")
    command("list", "list the configured services")
    for name, text in (("start", "start a service"), ("restart", "restart a service")):
        p = command(name, f"{text} (waits until it is ready unless --no-wait)")
        p.add_argument("name", metavar="NAME")
        p.add_argument("--no-wait", dest="wait", action="store_false", help="return once the request is accepted")
    p = command("stop", "stop every replica of a service (SIGTERM, SIGKILL after its grace)")
    p.add_argument("name", metavar="NAME")
    p = command("scale", "change the number of replicas of a service")
    p.add_argument("name", metavar="NAME")
    p.add_argument("replicas", type=int_at_least(0), metavar="N")
    p.add_argument("--no-wait", dest="wait", action="store_false", help="return once the request is accepted")
    p = command("call", "call a method of a service over the direct data plane",
                epilog=_CALL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("service", metavar="SERVICE")
    p.add_argument("method", metavar="METHOD")
    p.add_argument("args", nargs="?", type=json_object, default={}, metavar="JSON_ARGS",
                   help="a JSON object of keyword arguments (default {})")
    p = command("events", "follow the event stream (Ctrl-C to stop)")
    p.add_argument("patterns", nargs="*", metavar="PATTERN", help="topic globs, e.g. 'service.*' (default: all)")
    p.add_argument("--since", type=int_at_least(0), metavar="SEQ",
                   help="first replay kernel events with seq >= SEQ still in the kernel's history")
    p.add_argument("-n", "--count", type=int_at_least(1), metavar="N", help="exit after N events")
    p = command("lookup", "show where a service's data plane is served")
    p.add_argument("name", metavar="NAME")
    p = command("top", "a live view of every replica: CPU, memory vs budget, threads, GPU memory vs lease "
                       "(--json: one snapshot)")
    p.add_argument("-i", "--interval", type=positive_float, default=1.0, metavar="SECONDS",
                   help="refresh period (default 1 s)")
    p.add_argument("-n", "--count", type=int_at_least(1), metavar="N", help="exit after N refreshes")
    command("leases", "show the GPU devices, their leases, holders, free memory and waiting requests")
    for extension in _EXTENSIONS:  # the built-in services' commands (store, models, infer, train)
        COMMANDS.update(extension.register(command))
    command("ping", "check that the kernel answers")
    command("reload", "re-read the kernel's configuration file and apply the difference "
                      "(start new, stop removed, restart changed, scale changed replicas)")
    command("shutdown", "stop every service and the kernel")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (raises SystemExit(2) on usage errors, like argparse)."""
    args = build_parser().parse_args(argv)
    for key, value in _GLOBAL_DEFAULTS.items():
        if not hasattr(args, key):
            setattr(args, key, value)
    return args


# --- commands: each prints its output and returns an exit code ----------------------------------


def _emit(args: argparse.Namespace, reply: Any, human: str) -> int:
    print(dump_json(reply, binary="base64") if args.json else human)
    return EXIT_OK


def _cmd_status(client: Client, args: argparse.Namespace) -> int:
    reply = client.status(args.name, brief=args.brief)
    if args.json:
        return _emit(args, reply, "")
    if args.brief:
        return _emit(args, reply, kernel_line(reply["kernel"]) + "\n\n" + brief_table(reply["services"]))
    if args.name is not None:
        matching = [s for s in reply["services"] if s.get("name") == args.name]
        return _emit(args, reply, "\n\n".join(service_detail(s) for s in matching) or f"{args.name}: no status")
    head = kernel_line(reply["kernel"]) + "\n" + resources_line(reply["kernel"])
    return _emit(args, reply, head + "\n\n" + status_table(reply["services"]))


def _cmd_list(client: Client, args: argparse.Namespace) -> int:
    services = client.list()
    return _emit(args, services, list_table(services))


def _cmd_start(client: Client, args: argparse.Namespace) -> int:
    reply = client.start(args.name, args.wait, timeout=args.timeout)
    return _emit(args, reply, f"{reply['service']}: {reply['state']}")


def _cmd_stop(client: Client, args: argparse.Namespace) -> int:
    reply = client.stop(args.name, timeout=args.timeout)
    return _emit(args, reply, f"{reply['service']}: {reply['state']}")


def _cmd_restart(client: Client, args: argparse.Namespace) -> int:
    reply = client.restart(args.name, args.wait, timeout=args.timeout)
    return _emit(args, reply, f"{reply['service']}: {reply['state']}")


def _cmd_scale(client: Client, args: argparse.Namespace) -> int:
    reply = client.scale(args.name, args.replicas, args.wait, timeout=args.timeout)
    return _emit(args, reply, f"{reply['service']}: {reply['previous']} -> {reply['replicas']} replicas")


def _cmd_call(client: Client, args: argparse.Namespace) -> int:
    result = client.call_args(args.service, args.method, args.args, timeout=args.timeout)
    print(dump_json(result, binary="base64" if args.json else "summary"))
    return EXIT_OK


def _cmd_events(client: Client, args: argparse.Namespace) -> int:
    seen = 0
    with client.events(*args.patterns, since_seq=args.since) as stream:
        if not args.json:
            # On stderr, so stdout stays pure event lines; it also tells scripts the
            # subscription is live (anything published from now on will be shown).
            shown = " ".join(args.patterns) or "all"
            print(f"mkctl: following {shown} events at {stream.endpoint} (Ctrl-C to stop)", file=sys.stderr, flush=True)
        for env in stream:
            if args.json:
                print(json.dumps(event_record(env), ensure_ascii=False), flush=True)
            else:
                print(event_line(env), flush=True)
            seen += 1
            if args.count is not None and seen >= args.count:
                break
    return EXIT_OK


def _cmd_lookup(client: Client, args: argparse.Namespace) -> int:
    reply = client.lookup(args.name)
    return _emit(args, reply, lookup_text(reply))


# Clear the screen and go home: what `top` does between refreshes on a terminal.
_CLEAR = "\x1b[H\x1b[2J"


def _cmd_top(client: Client, args: argparse.Namespace) -> int:
    if args.json:
        return _emit(args, client.top(), "")
    shown = 0
    clear = sys.stdout.isatty()
    while True:
        table = top_table(client.top())
        stamp = time.strftime("%H:%M:%S")
        print(f"{_CLEAR if clear else ''}mkctl top  {stamp}  every {args.interval:g}s (Ctrl-C to stop)\n\n{table}",
              flush=True)
        shown += 1
        if args.count is not None and shown >= args.count:
            return EXIT_OK
        time.sleep(args.interval)  # the refresh period of a live view
        if not clear:
            print(flush=True)


def _cmd_leases(client: Client, args: argparse.Namespace) -> int:
    view = client.leases()
    return _emit(args, view, leases_text(view))


def _cmd_ping(client: Client, args: argparse.Namespace) -> int:
    started = time.perf_counter()
    reply = client.ping()
    rtt = time.perf_counter() - started
    return _emit(args, {**reply, "rtt_ms": rtt * 1000}, ping_line(reply, rtt))


def _cmd_reload(client: Client, args: argparse.Namespace) -> int:
    reply = client.reload(timeout=args.timeout)
    done = [f"{what} {', '.join(reply.get(what) or [])}" for what in ("started", "stopped", "restarted", "scaled", "updated")
            if reply.get(what)]
    lines = [f"reloaded {reply.get('source', '')}: " + "; ".join([*done, f"{reply.get('unchanged', 0)} unchanged"])]
    lines += [f"warning: {text}" for text in reply.get("warnings") or []]
    return _emit(args, reply, "\n".join(lines))


def _cmd_shutdown(client: Client, args: argparse.Namespace) -> int:
    reply = client.shutdown()
    return _emit(args, reply, f"microkerneld is shutting down ({reply.get('services', 0)} services to stop)")


# Modules adding commands for the built-in services; each has ``register(command) -> {name: handler}``.
_EXTENSIONS = (cli_store, cli_models, cli_train, cli_logs, cli_keys)

COMMANDS: dict[str, Callable[[Client, argparse.Namespace], int]] = {
    "status": _cmd_status,
    "list": _cmd_list,
    "start": _cmd_start,
    "stop": _cmd_stop,
    "restart": _cmd_restart,
    "scale": _cmd_scale,
    "call": _cmd_call,
    "events": _cmd_events,
    "lookup": _cmd_lookup,
    "top": _cmd_top,
    "leases": _cmd_leases,
    "ping": _cmd_ping,
    "reload": _cmd_reload,
    "shutdown": _cmd_shutdown,
}


# --- entry point -------------------------------------------------------------------------------


def _unavailable(exc: KernelUnavailable) -> int:
    print(f"mkctl: cannot reach microkerneld at {exc.endpoint}: {exc.reason}", file=sys.stderr)
    print("mkctl: start it with `microkerneld --config /path/to/kernel.toml`, or point mkctl at a running "
          f"kernel with --runtime-dir / --endpoint (or ${ENDPOINT_ENV})", file=sys.stderr)
    return EXIT_UNAVAILABLE


def _silence_stdout() -> None:
    # The reader went away (`mkctl events | head`): stop writing, and keep the interpreter's
    # final flush from raising BrokenPipeError again.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mkctl``; returns the exit code (see the module docstring)."""
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2): argparse already printed why
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    client: Client | None = None
    try:
        endpoint = resolve_endpoint(args.endpoint, args.runtime_dir)
        if args.command in cli_keys.OFFLINE:  # keygen needs no kernel
            return cli_keys.OFFLINE[args.command](args)
        client = Client(endpoint, timeout=args.timeout or 10.0, name="mkctl", client_key=args.client_key,
                        server_key=args.server_key)
        return COMMANDS[args.command](client, args)
    except KernelUnavailable as exc:
        return _unavailable(exc)
    except MicrokernelError as exc:
        print(f"mkctl: error: {exc.code.value}: {exc.reason}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        # Following events (or top) is ended by Ctrl-C on purpose; anything else was interrupted.
        return EXIT_OK if args.command in ("events", "top", "logs") else EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_OK
    finally:
        if client is not None:
            client.close()


if __name__ == "__main__":
    sys.exit(main())
