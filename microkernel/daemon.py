"""``microkerneld``: the daemon's command line."""

from __future__ import annotations

import argparse
import asyncio
import sys

from microkernel import __version__
from microkernel.config import LOG_FORMATS, ConfigError, KernelConfig
from microkernel.logsetup import TEXT_FORMAT, daemon_logging
from microkernel.reload import ConfigSource, log_settings
from microkernel.rundir import RuntimeDirError

LOG_FORMAT = TEXT_FORMAT


def _loop_factory():
    try:
        import uvloop
    except ImportError:  # plain asyncio works, just slower
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="microkerneld", description="The microkernel supervisor daemon.",
                                     epilog="signals: SIGTERM/SIGINT stop (services in reverse dependency order), "
                                            "SIGHUP reloads the configuration file, SIGUSR1 reopens the log file")
    parser.add_argument("--config", "-c", help="TOML configuration file (default: no services); SIGHUP re-reads it")
    parser.add_argument("--runtime-dir", help="override kernel.runtime_dir (sockets, lock, pid file)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="override kernel.log_level")
    parser.add_argument("--log-format", choices=list(LOG_FORMATS), help="override kernel.log_format (text or json lines)")
    parser.add_argument("--log-file", metavar="PATH",
                        help="override kernel.log_file: write the daemon's log there (SIGUSR1 reopens it); '' = stderr")
    parser.add_argument("--check", action="store_true", help="validate the configuration and exit")
    parser.add_argument("--version", action="version", version=f"microkerneld {__version__}")
    return parser


def source_of(args: argparse.Namespace) -> ConfigSource:
    """The configuration file and the command-line overrides (re-applied at every reload)."""
    overrides = {}
    if args.runtime_dir:
        overrides["runtime_dir"] = args.runtime_dir
    for key in ("log_level", "log_format", "log_file"):
        value = getattr(args, key, None)
        if value is not None:
            overrides[key] = value
    return ConfigSource(path=args.config or None, overrides=overrides)


def load(args: argparse.Namespace) -> KernelConfig:
    return source_of(args).load()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    source = source_of(args)
    try:
        config = source.load()
    except ConfigError as exc:
        print(f"microkerneld: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{config.source}: ok ({len(config.services)} services)")
        return 0
    try:
        daemon_logging.apply(log_settings(config))
    except OSError as exc:
        print(f"microkerneld: cannot open the log file {config.kernel.log_file!r}: {exc.strerror or exc}",
              file=sys.stderr)
        return 2
    from microkernel.runtime import Kernel

    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(Kernel(config, source).run())
    except RuntimeDirError as exc:
        print(f"microkerneld: {exc}", file=sys.stderr)
        return 1
    finally:
        daemon_logging.close()


if __name__ == "__main__":
    sys.exit(main())
