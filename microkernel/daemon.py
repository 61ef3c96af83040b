"""``microkerneld``: the daemon's command line."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys

from microkernel import __version__
from microkernel.config import ConfigError, KernelConfig, load_config, parse_config
from microkernel.rundir import RuntimeDirError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _loop_factory():
    try:
        import uvloop
    except ImportError:  # plain asyncio works, just slower
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="microkerneld", description="The microkernel supervisor daemon.")
    parser.add_argument("--config", "-c", help="TOML configuration file (default: no services)")
    parser.add_argument("--runtime-dir", help="override kernel.runtime_dir (sockets, lock, pid file)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="override kernel.log_level")
    parser.add_argument("--check", action="store_true", help="validate the configuration and exit")
    parser.add_argument("--version", action="version", version=f"microkerneld {__version__}")
    return parser


def load(args: argparse.Namespace) -> KernelConfig:
    config = load_config(args.config) if args.config else parse_config("", source="<defaults>")
    overrides = {}
    if args.runtime_dir:
        overrides["runtime_dir"] = args.runtime_dir
    if args.log_level:
        overrides["log_level"] = args.log_level
    if overrides:
        config = dataclasses.replace(config, kernel=dataclasses.replace(config.kernel, **overrides))
    return config


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load(args)
    except ConfigError as exc:
        print(f"microkerneld: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{config.source}: ok ({len(config.services)} services)")
        return 0
    logging.basicConfig(level=config.kernel.log_level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    from microkernel.runtime import Kernel

    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(Kernel(config).run())
    except RuntimeDirError as exc:
        print(f"microkerneld: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
