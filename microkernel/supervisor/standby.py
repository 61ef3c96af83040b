"""The warm standby: one pre-started service runner, waiting for the replica it will become.

Most of a Python replica's start is not the service's own work: the interpreter starts, then imports
asyncio, ZeroMQ, msgpack and the SDK (a few hundred milliseconds on a small machine). The kernel
keeps one runner that has already done that (``python -m services.runner --standby``), a normal
supervised child (own session, ``PDEATHSIG``), blocked reading its stdin. To start a replica the
supervisor hands it the replica's assignment — entry, complete environment, working directory — as
one JSON line; the runner applies it and continues exactly like a freshly started one (it imports
the service's module only then). A new standby is started in the background right away.

Only what the runner can still apply after start-up is handed over that way, so a standby is used
only when it is *equivalent* to a fresh process: same interpreter, and the same value of every
environment variable read at interpreter start or library load time (``PYTHON*``, ``LD_*``,
``MALLOC_*``) and of the orphan-guard marker (which must be in the initial environment). Anything
else gets a cold spawn, as does every ``command`` service.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

from microkernel.logs import ServiceLogs
from microkernel.logs.capture import OutputCapture
from microkernel.supervisor.process import Child, SpawnError, kill_tree, spawn

log = logging.getLogger("microkernel.standby")

STANDBY_FLAG = "--standby"
READY_FD_ENV = "MK_STANDBY_READY_FD"

# Variables read when the interpreter starts or a shared library loads: changing them afterwards
# has no effect, so a standby started with other values is not equivalent to a fresh process.
_STARTUP_PREFIXES = ("PYTHON", "LD_", "MALLOC_")


def startup_environment(env: Mapping[str, str], extra_keys: tuple[str, ...] = ()) -> dict[str, str]:
    """The part of ``env`` that must match between a standby and the replica it becomes."""
    return {k: v for k, v in env.items() if k.startswith(_STARTUP_PREFIXES) or k in extra_keys}


class Standby:
    """Keeps at most one pre-started runner per kernel and hands it to the next eligible replica.

    ``base_env`` is the environment the standby starts with (the kernel's, plus what every child
    gets at exec time: the sentinel marker, the entries' ``PYTHONPATH``). Hooks: ``on_spawned(pid)``
    for every standby process (the kernel registers it with the orphan guard), ``on_ready(pid)``
    once it has finished its imports, ``on_gone(pid)`` when one that was never handed out is gone.

    With ``logs`` set, a standby's stdout/stderr are captured from its start; the supervisor points
    them at the right service file when it takes the standby (``ServiceLogs.assign``).
    """

    logs: ServiceLogs | None = None

    def __init__(self, python: str, *, cwd: str | None = None, pinned_keys: tuple[str, ...] = ()) -> None:
        self.python = python
        self.cwd = cwd
        self.pinned_keys = pinned_keys
        self.enabled = True
        self.taken = 0
        self.cold = 0
        self._proc: Child | None = None
        self._env: dict[str, str] = {}
        self._starting: asyncio.Task[None] | None = None
        self._retired: set[asyncio.Task[None]] = set()
        self._failures = 0
        self.warm = False
        self._outputs: dict[int, OutputCapture] = {}  # pid -> its output pipes, until handed out or reaped

    @property
    def pid(self) -> int | None:
        """The waiting runner's pid, if one is ready."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    def prepare(self, base_env: Mapping[str, str]) -> None:
        """Start a standby in the background if none is running or starting.

        A waiting standby started with another ``base_env`` (the orphan guard was restarted with a
        new marker) is replaced.
        """
        if not self.enabled or (self._starting is not None and not self._starting.done()):
            return
        if self._proc is not None:
            if self._proc.returncode is None and self._env == dict(base_env):
                return
            self._discard()
        self._starting = asyncio.ensure_future(self._start(dict(base_env)))

    async def _start(self, env: dict[str, str]) -> None:
        # The runner writes one byte on this pipe once its imports are done (then a take is nearly free).
        ready_r, ready_w = os.pipe()
        env[READY_FD_ENV] = str(ready_w)
        output = None
        try:
            output = self.logs.open() if self.logs is not None else None
            proc = await spawn([self.python, "-m", "services.runner", STANDBY_FLAG], env=env, cwd=self.cwd,
                               stdin=asyncio.subprocess.PIPE, pass_fds=(ready_w,),
                               stdout=None if output is None else output.stdout,
                               stderr=None if output is None else output.stderr)
        except (SpawnError, OSError) as exc:
            os.close(ready_r)
            if output is not None:
                output.close()
            self._failures += 1
            log.warning("could not start a standby runner (%s); replicas start cold", exc)
            if self._failures >= 3:
                self.enabled = False
            return
        finally:
            os.close(ready_w)
        del env[READY_FD_ENV]
        if output is not None and self.logs is not None:
            self._outputs[proc.pid] = self.logs.adopt(proc.pid, output)
        self._failures = 0
        self._proc, self._env, self.warm = proc, env, False
        self.on_spawned(proc.pid)
        loop = asyncio.get_running_loop()
        loop.add_reader(ready_r, self._on_ready_pipe, loop, ready_r, proc)

    def _on_ready_pipe(self, loop: asyncio.AbstractEventLoop, fd: int, proc: Child) -> None:
        try:
            data = os.read(fd, 1)
        except OSError:
            data = b""
        loop.remove_reader(fd)
        os.close(fd)
        if data and self._proc is proc:
            self.warm = True
            self.on_ready(proc.pid)

    def on_spawned(self, pid: int) -> None:
        """Hook: a standby process was started (the kernel guards it against orphaning)."""

    def on_ready(self, pid: int) -> None:
        """Hook: a standby finished its imports and waits for an assignment."""

    def on_gone(self, pid: int) -> None:
        """Hook: a standby process that was never handed out has exited."""

    def take(
        self, argv: list[str], env: Mapping[str, str], cwd: str | None, *,
        cpus: Iterable[int] | None = None, cgroup: str | os.PathLike[str] | None = None,
    ) -> Child | None:
        """The waiting runner, now running ``argv``'s entry with ``env`` in ``cwd``; None to spawn cold.

        ``argv`` must be a service-runner command line (``python -m services.runner ENTRY``).
        ``cpus`` and ``cgroup`` are the placement ``spawn`` would apply before exec; they are
        applied here before the runner learns its assignment, while it has one thread and no
        children, so everything the replica starts inherits them.
        """
        proc = self._proc
        entry = _entry_of(argv, self.python)
        if proc is None or entry is None or not self.enabled:
            self.cold += 1
            return None
        if proc.returncode is not None or proc.stdin is None or proc.stdin.is_closing():
            self._discard()
            self.cold += 1
            return None
        if startup_environment(env, self.pinned_keys) != startup_environment(self._env, self.pinned_keys):
            self.cold += 1
            return None
        try:
            if cpus is not None:
                os.sched_setaffinity(proc.pid, set(cpus))
            if cgroup is not None:
                with open(os.path.join(cgroup, "cgroup.procs"), "w") as procs:
                    procs.write(str(proc.pid))
        except OSError as exc:
            log.warning("could not place standby %d (%s); starting cold", proc.pid, exc)
            self._discard()
            self.cold += 1
            return None
        assignment = {"entry": entry, "env": dict(env), "cwd": cwd or self.cwd or os.getcwd()}
        line = json.dumps(assignment, separators=(",", ":")).encode() + b"\n"
        self._proc, self.warm = None, False
        try:
            proc.stdin.write(line)
            proc.stdin.close()  # the runner reads one line, then EOF; it re-opens stdin on /dev/null
        except (OSError, RuntimeError) as exc:
            log.debug("standby %d could not take an assignment: %s", proc.pid, exc)
            self._retire(proc)
            self.cold += 1
            return None
        self.taken += 1
        self._outputs.pop(proc.pid, None)  # the supervisor releases it with the replica
        return proc

    def _discard(self) -> None:
        proc, self._proc, self.warm = self._proc, None, False
        if proc is not None:
            self._retire(proc)

    def _retire(self, proc: Child) -> None:
        task = asyncio.ensure_future(self._reap(proc))
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    async def _reap(self, proc: Child) -> None:
        await kill_tree(proc, grace=0)
        if self.logs is not None:
            self.logs.release(proc.pid, self._outputs.pop(proc.pid, None))
        self.on_gone(proc.pid)

    async def close(self) -> None:
        """Stop the standby (and one being started); returns once it is gone."""
        self.enabled = False
        if self._starting is not None and not self._starting.done():
            try:
                await self._starting
            except Exception:  # already logged
                pass
        self._discard()
        if self._retired:
            await asyncio.gather(*self._retired, return_exceptions=True)

    def status_key(self) -> tuple[Any, ...]:
        """What ``summary`` shows, as a tuple (part of the status cache's key: read per request)."""
        return (self.enabled, self.pid, self.warm, self.taken, self.cold)

    def summary(self) -> dict[str, Any]:
        """For the kernel's status: whether a standby waits, and how starts were served."""
        return {"enabled": self.enabled, "pid": self.pid, "warm": self.warm and self.pid is not None,
                "taken": self.taken, "cold": self.cold}


def _entry_of(argv: list[str], python: str) -> str | None:
    if len(argv) == 4 and argv[0] == python and argv[1:3] == ["-m", "services.runner"]:
        return argv[3]
    return None
