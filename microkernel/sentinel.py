"""The orphan guard: a tiny process that outlives a killed daemon just long enough to clean up.

PDEATHSIG (see :mod:`microkernel.supervisor.process`) kills the daemon's direct children when the
daemon dies, but not grandchildren. The sentinel closes that gap: the daemon tells it, over the
sentinel's stdin, which process groups it started (``+<pgid>``) and which it has finished with
(``-<pgid>``). When stdin reaches end-of-file — the daemon closed it, exited, or was ``kill -9``-ed, the
kernel closes the pipe either way — the sentinel SIGKILLs every group still tracked, unlinks the
shared-memory segments named after the daemon (``mk.<daemon pid>.*``) and exits 0.

Descendants that left their group (``setsid``) are caught by an environment marker: the daemon puts
:attr:`Sentinel.marker_env` into every child's environment, children pass it on to theirs, and on
end-of-file the sentinel also SIGKILLs every process whose initial environment carries that exact
marker (read from ``/proc/<pid>/environ``; a process that scrubs its environment escapes this).

Process side: ``python -m microkernel.sentinel [--marker TOKEN]`` (:func:`main`). It imports only ``os``,
``signal`` and ``sys`` at top level so it starts in a few milliseconds under ``python -I -S``; the
daemon-side :class:`Sentinel` imports asyncio and logging lazily for the same reason.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncio
    import logging

__all__ = ["MARKER_VAR", "Sentinel", "main"]

MARKER_VAR = "MICROKERNEL_SENTINEL"
"""Environment variable carrying the per-sentinel marker token (see :attr:`Sentinel.marker_env`)."""

# Bounds the marker sweep: each pass SIGKILLs what forked during the previous one.
_SWEEP_PASSES = 5

# Where POSIX shared memory lives (protocols.shm.SHM_DIR; not imported: the sentinel starts bare).
SHM_DIR = "/dev/shm"

# How long close() waits for the sentinel to finish its clean-up before killing it.
_CLOSE_CEILING = 10.0


# --------------------------------------------------------------------------------------------------
# Process side


def main(argv: list[str] | None = None) -> int:
    """Run the sentinel: track groups from stdin, kill the tracked ones on end-of-file, exit 0."""
    args = sys.argv[1:] if argv is None else argv
    marker = args[1] if len(args) == 2 and args[0] == "--marker" else None
    if args and marker is None:
        print(f"usage: {sys.argv[0]} [--marker TOKEN]", file=sys.stderr)
        return 2

    try:
        os.setsid()  # a no-op failure if the daemon already started us in a new session
    except OSError:
        pass
    # Terminal signals and a service manager's SIGTERM must not kill us before the daemon's children
    # are dead; we exit on our own once stdin closes.
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    try:
        os.chdir("/")  # do not keep the daemon's working directory busy
    except OSError:
        pass

    groups: set[int] = set()
    own_group = os.getpgrp()
    kernel = os.getppid()  # the daemon started us; after its death we are someone else's child
    stdin = sys.stdin.buffer if sys.stdin is not None else None
    while stdin is not None:
        try:
            line = stdin.readline()
        except OSError:
            break
        if not line:
            break
        _apply(line, groups, own_group)

    for pgid in sorted(groups):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        except OSError as exc:
            print(f"microkernel.sentinel: cannot kill group {pgid}: {exc}", file=sys.stderr)
    if marker:
        _sweep(f"{MARKER_VAR}={marker}".encode())
    _unlink_segments(kernel)
    return 0


def _unlink_segments(kernel: int) -> None:
    """Unlink the shared-memory segments of the daemon's processes (``mk.<kernel pid>.*``, see
    :mod:`protocols.shm`): they are all dead now, and memory in /dev/shm outlives its users."""
    prefix = f"mk.{kernel}."
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return
    for name in names:
        if name.startswith(prefix):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
            except OSError:
                pass  # gone already, or unlinked by the daemon itself on a clean stop


def _apply(line: bytes, groups: set[int], own_group: int) -> None:
    """Apply one ``+<pgid>`` / ``-<pgid>`` command; complain about anything else and carry on."""
    text = line.strip()
    try:
        op, pgid = text[:1], int(text[1:])
    except ValueError:
        op, pgid = b"", 0
    # Group 0 means "my own group" to killpg and 1 is init's: never valid targets.
    if op not in (b"+", b"-") or pgid <= 1 or pgid == own_group:
        print(f"microkernel.sentinel: ignoring bad command {text!r}", file=sys.stderr)
    elif op == b"+":
        groups.add(pgid)
    else:
        groups.discard(pgid)


def _sweep(entry: bytes) -> None:
    """SIGKILL every process whose initial environment contains exactly ``entry``."""
    me = os.getpid()
    for _ in range(_SWEEP_PASSES):
        killed = 0
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) == me:
                continue
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    environ = f.read()
            except OSError:
                continue  # gone, or not ours to read
            if entry in environ.split(b"\0"):
                try:
                    os.kill(int(name), signal.SIGKILL)
                    killed += 1
                except OSError:
                    pass
        # Killed processes turn into zombies, whose environ reads empty, so this converges.
        if not killed:
            return


# --------------------------------------------------------------------------------------------------
# Daemon side


def _logger() -> logging.Logger:
    import logging

    return logging.getLogger("microkernel.sentinel")


class Sentinel:
    """Daemon-side handle on the sentinel process.

    Usage: ``await start()`` once at daemon start (before spawning children), ``track(pgid)`` right
    after each spawn, ``untrack(pgid)`` once that child's tree is dead, ``await close()`` at shutdown.
    Put :attr:`marker_env` into every child's environment to also cover descendants that leave their
    group. ``track``/``untrack`` never block and never raise; if the sentinel has died they log a
    warning, keep the bookkeeping, and the next ``await start()`` restarts it and replays the tracked
    groups.

    The sentinel is deliberately not started with PDEATHSIG and runs in its own session: it must
    survive the daemon.
    """

    def __init__(self) -> None:
        import asyncio

        self._proc: asyncio.subprocess.Process | None = None
        self._start_lock = asyncio.Lock()  # two concurrent start() calls must not start two sentinels
        self._tracked: set[int] = set()
        self._marker = os.urandom(16).hex()
        self._warned = False

    @property
    def marker_env(self) -> dict[str, str]:
        """Environment entries to merge into every child's environment (see the module docstring)."""
        return {MARKER_VAR: self._marker}

    @property
    def pid(self) -> int | None:
        """The sentinel's pid, or ``None`` before :meth:`start` / after :meth:`close`."""
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        """Whether the sentinel process is alive as far as the event loop knows."""
        return self._proc is not None and self._proc.returncode is None

    @property
    def tracked(self) -> frozenset[int]:
        """The process groups currently tracked."""
        return frozenset(self._tracked)

    async def start(self) -> None:
        """Start the sentinel, or restart it if it died; a no-op while it runs.

        On (re)start every group tracked so far is sent to the new process.

        Raises:
            OSError: the Python interpreter could not be started.
        """
        async with self._start_lock:
            if not self.running:
                await self._start()

    async def _start(self) -> None:
        import asyncio

        if self._proc is not None:
            returncode = await self._proc.wait()  # immediate: its exit is already known
            _logger().warning("restarting the sentinel (previous one exited with %s)", returncode)
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-I",  # isolated: ignore PYTHON* variables and the user's site-packages
            "-S",  # no site import: starts faster, needs the stdlib only
            os.path.abspath(__file__),
            "--marker",
            self._marker,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        self._warned = False
        for pgid in sorted(self._tracked):
            self._send(b"+%d\n" % pgid)
        _logger().debug("sentinel started, pid %d", self._proc.pid)

    def track(self, pgid: int) -> None:
        """Have the sentinel SIGKILL process group ``pgid`` if the daemon dies. Never blocks or raises."""
        if pgid <= 1:
            _logger().error("refusing to track process group %d", pgid)
            return
        self._tracked.add(pgid)
        self._send(b"+%d\n" % pgid)

    def untrack(self, pgid: int) -> None:
        """Stop guarding ``pgid`` (its tree is dead). Never blocks or raises.

        Call it promptly after the group is gone: a stale entry could hit a recycled group id.
        """
        self._tracked.discard(pgid)
        self._send(b"-%d\n" % pgid)

    async def wait_exited(self) -> int:
        """Wait until the current sentinel process exits and return its returncode.

        For a watcher task that restarts it (``await wait_exited()`` then ``await start()``). Raises
        ``RuntimeError`` if it is not started.
        """
        proc = self._proc
        if proc is None:
            raise RuntimeError("sentinel is not started")
        return await proc.wait()

    async def close(self) -> None:
        """Close the sentinel's stdin and wait for it to exit.

        The sentinel then kills every group still tracked and every marked process — on a clean shutdown
        there are none left. Idempotent.
        """
        import asyncio

        proc, self._proc = self._proc, None
        self._tracked.clear()
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
            try:
                await proc.stdin.wait_closed()
            except (OSError, RuntimeError):
                pass  # it died already; nothing was lost that close() would have done
        try:
            async with asyncio.timeout(_CLOSE_CEILING):
                await proc.wait()
        except TimeoutError:
            _logger().warning("sentinel pid %d did not exit %.0f s after close; killing it",
                              proc.pid, _CLOSE_CEILING)
            try:
                proc.kill()
            except ProcessLookupError:
                pass
            await proc.wait()

    def _send(self, line: bytes) -> None:
        """Write ``line`` to the sentinel without blocking (the transport buffers any excess)."""
        proc = self._proc
        if proc is None:
            return  # not started yet: start() replays the tracked set
        stdin = proc.stdin
        if proc.returncode is not None or stdin is None or stdin.is_closing():
            self._warn_down(None)
            return
        try:
            stdin.write(line)
        except (OSError, RuntimeError) as exc:
            self._warn_down(exc)

    def _warn_down(self, exc: BaseException | None) -> None:
        if self._warned:
            return
        self._warned = True
        rc = None if self._proc is None else self._proc.returncode
        _logger().warning(
            "sentinel is not running (returncode %s%s); %d process groups are unguarded until "
            "Sentinel.start() restarts it", rc, f", {exc}" if exc else "", len(self._tracked))


if __name__ == "__main__":
    sys.exit(main())
