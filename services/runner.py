"""The child entry point: ``python -m services.runner ENTRY``.

``ENTRY`` (or ``$MK_ENTRY``) is ``package.module:Class`` or the name of an entry point in the
``microkernel.services`` group. The runner reads the ``MK_*`` environment the kernel set, ties
its life to the kernel's, configures logging and runs one replica on one event loop.

Before any of the service's code runs (after its module is imported, before ``setup``), the
runner applies the replica's resource budgets to torch when the module imported it: the CPU
budget with ``torch.set_num_threads`` and the GPU lease's memory fractions with
``torch.cuda.set_per_process_memory_fraction`` (see :func:`apply_resource_limits`).

Exit status: 0 after a graceful stop, 1 when setup (or teardown) failed, 2 when the entry or
the environment is unusable (the reason is printed on stderr).

``python -m services.runner --standby`` is the kernel's warm standby: it imports everything a
replica needs except the service's own module, then blocks reading one JSON line on stdin —
``{"entry", "env", "cwd"}`` — applies the environment and the working directory, and continues
exactly like ``python -m services.runner ENTRY`` started with them. End of file without a line
(the kernel stopping or discarding the standby) exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import importlib
import os
import signal
import sys
import traceback
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

from services.base import Service
from services.environment import EnvironmentProblem, ReplicaEnvironment, cpu_threads, gpu_lease
from services.logs import configure

ENTRY_POINT_GROUP = "microkernel.services"
EXIT_USAGE = 2
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class EntryError(Exception):
    """The service entry cannot be resolved to a ``Service`` subclass."""


def resolve_entry(entry: str) -> type[Service]:
    """``module:Class`` (``Class`` may be dotted) or an entry-point name -> the Service subclass."""
    if ":" in entry:
        module_name, _, qualname = entry.partition(":")
        if not module_name or not qualname:
            raise EntryError(f"entry {entry!r} must look like 'package.module:Class'")
        obj = _attribute(_import(module_name, entry), qualname, entry)
    else:
        import importlib.metadata  # only for entry-point names: it costs ~25 ms of every start

        matches = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP, name=entry)
        if not matches:
            known = sorted(ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
            raise EntryError(
                f"entry {entry!r} is neither 'package.module:Class' nor an entry point in group "
                f"{ENTRY_POINT_GROUP!r} (known entry points: {', '.join(known) or 'none'})"
            )
        ep = next(iter(matches))
        try:
            obj = ep.load()
        except Exception as exc:
            raise EntryError(f"loading entry point {entry!r} ({ep.value}) failed:\n{_format(exc)}") from None
    if not (isinstance(obj, type) and issubclass(obj, Service)):
        raise EntryError(f"entry {entry!r} resolves to {obj!r}, which is not a subclass of services.base.Service")
    return obj


def _import(module_name: str, entry: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise EntryError(f"entry {entry!r}: no module named {exc.name!r} (is it on PYTHONPATH?)") from None
        raise EntryError(f"entry {entry!r}: importing {module_name!r} failed:\n{_format(exc)}") from None
    except Exception as exc:  # the module itself is broken: show where
        raise EntryError(f"entry {entry!r}: importing {module_name!r} failed:\n{_format(exc)}") from None


def _attribute(module: Any, qualname: str, entry: str) -> Any:
    obj = module
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise EntryError(f"entry {entry!r}: module {module.__name__!r} has no attribute {qualname!r}") from None
    return obj


def _format(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)).rstrip()


def tie_to_kernel(kernel_pid: int | None) -> bool:
    """Die with the kernel: (re)arm PDEATHSIG and check the kernel is still there.

    The kernel arms PDEATHSIG between fork and exec already; arming it again here also covers a
    runner started through a wrapper. Returns False when the kernel is already gone.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the process group kill still applies
        pass
    if kernel_pid is None or os.getppid() == kernel_pid:
        return True
    # Reparented: our parent died before PDEATHSIG was armed. Unless the kernel started us through
    # an intermediate process (a wrapper command) and is still alive, there is nobody to serve.
    try:
        os.kill(kernel_pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def apply_resource_limits(
    environ: Mapping[str, str] = os.environ, modules: MutableMapping[str, Any] = sys.modules
) -> list[str]:
    """Apply the replica's CPU and GPU budgets to torch, if (and only if) torch is already imported.

    Never imports torch itself (that costs seconds and a CUDA-capable import must stay the
    service's choice); a service that imports torch later can call this again. Returns what was
    applied, for the log. Errors are reported, not raised: a budget torch cannot take must not
    keep the service from starting (the kernel still enforces it from outside).
    """
    torch = modules.get("torch")
    if torch is None:
        return []
    applied: list[str] = []
    threads = cpu_threads(environ)
    if threads is not None:
        try:
            torch.set_num_threads(threads)
            applied.append(f"torch.set_num_threads({threads})")
        except Exception as exc:  # a torch build without the call, or a bad value
            applied.append(f"torch.set_num_threads({threads}) failed: {exc}")
    try:
        lease = gpu_lease(environ)
    except ValueError as exc:
        return [*applied, f"GPU lease not applied: {exc}"]
    if lease is None or not lease.fractions:
        return applied
    try:
        cuda = torch.cuda.is_available()
    except Exception as exc:
        return [*applied, f"GPU lease not applied: torch.cuda.is_available() failed: {exc}"]
    if not cuda:
        return [*applied, "GPU lease not applied: torch sees no CUDA device"]
    for index, fraction in enumerate(lease.fractions):
        try:
            torch.cuda.set_per_process_memory_fraction(fraction, index)
            applied.append(f"torch.cuda.set_per_process_memory_fraction({fraction}, {index})")
        except Exception as exc:
            applied.append(f"torch.cuda.set_per_process_memory_fraction({fraction}, {index}) failed: {exc}")
    return applied


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run_replica(service_cls: type[Service], env: ReplicaEnvironment) -> int:
    """Configure logging and run one replica to completion; returns the exit status."""
    from services.replica import ReplicaRuntime  # imported here: keeps `--help` and entry errors fast

    log = configure(env.service, env.replica, env.log_level)
    for step in apply_resource_limits():
        log.info("resource budget: %s", step)
    runtime = ReplicaRuntime(service_cls, env, log)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(runtime.run())


def _fail(message: str) -> int:
    print(f"services.runner: error: {message}", file=sys.stderr, flush=True)
    return EXIT_USAGE


def wait_for_assignment(stream: Any = None) -> str | None:
    """Standby: read the assignment line, apply env and cwd; returns the entry (None at EOF)."""
    import json

    import services.replica  # noqa: F401  (the point of a standby: imported before it is needed)

    ready_fd = os.environ.get("MK_STANDBY_READY_FD")
    if ready_fd is not None:  # tell the kernel the imports are done
        try:
            os.write(int(ready_fd), b"r")
            os.close(int(ready_fd))
        except (OSError, ValueError):
            pass
    stream = stream if stream is not None else sys.stdin.buffer
    line = stream.readline()
    if not line.strip():
        return None
    try:
        assignment = json.loads(line)
        entry, env, cwd = assignment["entry"], assignment["env"], assignment["cwd"]
        if not (isinstance(entry, str) and isinstance(env, dict) and isinstance(cwd, str)):
            raise TypeError("entry, env and cwd must be a string, a map and a string")
    except (ValueError, KeyError, TypeError) as exc:
        raise EntryError(f"unusable standby assignment: {exc}") from None
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in env.items()})
    os.chdir(cwd)
    # What `python -m` started in ``cwd`` would have: the directory first on sys.path.
    if sys.path and sys.path[0] != cwd:
        sys.path[0] = os.getcwd()
    with open(os.devnull, "rb") as devnull:  # like every other replica: nothing on stdin
        os.dup2(devnull.fileno(), 0)
    return entry


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m services.runner",
        description="Run one replica of a microkernel service (started by the kernel with MK_* set).",
    )
    parser.add_argument("entry", nargs="?", help="'package.module:Class' or an entry-point name "
                        f"in group {ENTRY_POINT_GROUP!r} (default: $MK_ENTRY)")
    parser.add_argument("--standby", action="store_true",
                        help="wait for the entry, environment and cwd as one JSON line on stdin (kernel use)")
    args = parser.parse_args(argv)
    if args.standby:
        try:
            assigned = wait_for_assignment()
        except EntryError as exc:
            return _fail(str(exc))
        if assigned is None:
            return 0
        args.entry = assigned
    entry = args.entry or os.environ.get("MK_ENTRY")
    if not entry:
        return _fail("no service entry: pass ENTRY ('package.module:Class' or an entry-point name) or set MK_ENTRY")
    try:
        env = ReplicaEnvironment.from_environ(os.environ)
    except EnvironmentProblem as exc:
        return _fail("; ".join(exc.problems) + " (this runner is normally started by the microkernel daemon)")
    # Before importing the service's module, which may take seconds (torch).
    if not tie_to_kernel(env.kernel_pid):
        print(f"services.runner: the kernel (pid {env.kernel_pid}) is gone; exiting", file=sys.stderr, flush=True)
        return 1
    try:
        service_cls = resolve_entry(entry)
    except EntryError as exc:
        return _fail(str(exc))
    return run_replica(service_cls, env)


if __name__ == "__main__":
    sys.exit(main())
