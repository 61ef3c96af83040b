"""Starting and killing supervised children without leaving orphans behind.

Every child is started by :func:`spawn` in its own session, so it leads a fresh process group whose
id equals its pid; :func:`kill_tree` signals that group plus any descendant that left it (``setsid``,
``setpgid``), waits a grace period, then SIGKILLs whatever is left and waits until it is gone.

Two mechanisms make children die with the daemon even when the daemon gets ``kill -9``:

* ``PR_SET_PDEATHSIG(SIGKILL)`` is set in the child between fork and exec, so the kernel kills the
  child when its parent dies. Linux ties this to the *thread* that forked, not the process: spawning
  happens on the event-loop thread (both asyncio and uvloop fork synchronously inside
  ``loop.subprocess_exec``), so :func:`spawn` must be awaited on a loop whose thread lives as long as
  the daemon — normally the main thread. PDEATHSIG is not inherited by grandchildren, and it is cleared
  when the child execs a set-uid/set-gid binary.
* Grandchildren are covered by :mod:`microkernel.sentinel`, a small helper process that SIGKILLs every
  tracked process group once the daemon's end of its pipe closes.

Both uvloop (0.23) and the default asyncio loop honour ``preexec_fn``: uvloop runs it from a
``pthread_atfork`` child handler right after libuv forks (libuv then calls ``setsid`` and execs), and
CPython runs it in ``_posixsubprocess`` after ``setsid``. The function only makes a few syscalls, so it
stays safe in a daemon that has executor threads. No exec wrapper is needed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import IO, Any, cast

import psutil

__all__ = ["Child", "SpawnError", "kill_tree", "process_tree", "signal_tree", "spawn"]

_log = logging.getLogger("microkernel.supervisor.process")

# <linux/prctl.h>
_PR_SET_PDEATHSIG = 1

# How long to wait for processes to vanish after SIGKILL before saying so in the log. SIGKILL only
# fails to take effect promptly for tasks in uninterruptible sleep (stuck I/O, a wedged driver).
_AFTER_KILL_CEILING = 10.0

# Rounds of "snapshot, SIGKILL" in kill_tree: a descendant outside the group may fork between the
# snapshot and the kill; each round catches what the previous one missed.
_KILL_ROUNDS = 5

# kill_tree's snapshots and signals (a few milliseconds of /proc reading each) run on threads of their
# own, not on the loop's default executor: there they would queue behind whatever else it runs
# (resource sampling, log reads, other stops waiting out their grace), and a hung replica's SIGKILL
# with them. Only these short jobs run here; the waits for processes to vanish use the default one.
_SIGNAL_THREADS = 4
_signaller = concurrent.futures.ThreadPoolExecutor(max_workers=_SIGNAL_THREADS, thread_name_prefix="mk-signal")

# asyncio's default StreamReader limit (asyncio.streams._DEFAULT_LIMIT).
_STREAM_LIMIT = 2**16

_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int

Redirect = int | IO[Any] | None
"""What ``stdin``/``stdout``/``stderr`` of :func:`spawn` accept: a file descriptor, a file object,
``None`` (inherit), or ``asyncio.subprocess.PIPE``/``DEVNULL``/``STDOUT``."""


class _ChildProtocol(asyncio.subprocess.SubprocessStreamProtocol):
    """The stock stream protocol, plus a future resolved as soon as the process exits."""

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=limit, loop=loop)
        self.exited: asyncio.Future[int] = loop.create_future()
        # The base class drops its transport reference once pipes and process are all closed.
        self._child_transport: asyncio.SubprocessTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transport does not subclass asyncio.SubprocessTransport, hence no isinstance check.
        self._child_transport = cast(asyncio.SubprocessTransport, transport)
        super().connection_made(transport)

    def process_exited(self) -> None:
        super().process_exited()
        assert self._child_transport is not None
        returncode = self._child_transport.get_returncode()
        if returncode is not None and not self.exited.done():
            self.exited.set_result(returncode)


class Child(asyncio.subprocess.Process):
    """An ``asyncio.subprocess.Process`` whose :meth:`wait` returns when the process exits.

    On the default asyncio loop (CPython 3.11-3.13 at least; gh-119710), ``Process.wait()`` also waits
    for the child's stdout/stderr pipes to close — which never happens while a grandchild that inherited them
    lives on. uvloop does not have that problem; this class makes both loops behave the same.
    """

    def __init__(
        self, transport: asyncio.SubprocessTransport, protocol: _ChildProtocol,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(transport, protocol, loop)
        self._exited = protocol.exited

    async def wait(self) -> int:
        """Wait for the process to exit and return its returncode (negative: killed by that signal)."""
        # shield: a cancelled waiter must not cancel the shared future.
        return await asyncio.shield(self._exited)


class SpawnError(OSError):
    """A child could not be started: its program is missing, not executable, or ``cwd`` is bad.

    ``errno`` and ``strerror`` come from the operating system; ``filename`` is ``argv[0]``.
    """

    @property
    def program(self) -> str:
        """The program (``argv[0]``) that failed to start."""
        return str(self.filename)


def _child_setup_for(
    parent_pid: int, ignored: tuple[int, ...], cpus: frozenset[int] | None = None, cgroup_procs: str | None = None
) -> Callable[[], None]:
    """Build the ``preexec_fn`` run in the forked child, before exec.

    Everything it needs is computed in the parent so the child only makes syscalls.
    """
    join = b"0"  # written to cgroup.procs, "0" means the writing process

    def child_setup() -> None:
        if _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}")
        # The parent may have died between fork and prctl; PDEATHSIG would then never fire.
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGKILL)
        # A daemon started from a script with `&` or under nohup ignores SIGINT/SIGHUP, and ignored
        # dispositions survive exec; children must still be stoppable gracefully. Handlers are reset
        # by exec anyway, so only SIG_IGN needs undoing. The mask is also inherited across exec.
        for signum in ignored:
            signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        # Resource placement before exec, so nothing the child starts can escape it: threads and
        # processes inherit the affinity, and children are born in their parent's cgroup.
        if cpus is not None:
            os.sched_setaffinity(0, cpus)
        if cgroup_procs is not None:
            fd = os.open(cgroup_procs, os.O_WRONLY)
            try:
                os.write(fd, join)
            finally:
                os.close(fd)

    return child_setup


def _ignored_signals() -> tuple[int, ...]:
    """The signals this process ignores (as far as Python knows), minus the unblockable ones."""
    ignored: list[int] = []
    for signum in signal.valid_signals():
        if signum in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            if signal.getsignal(signum) == signal.SIG_IGN:
                ignored.append(signum)
        except (ValueError, OSError):
            continue
    return tuple(ignored)


async def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: str | None = None,
    stdin: Redirect = asyncio.subprocess.DEVNULL,
    stdout: Redirect = None,
    stderr: Redirect = None,
    pass_fds: Sequence[int] = (),
    cpus: Iterable[int] | None = None,
    cgroup: str | os.PathLike[str] | None = None,
) -> Child:
    """Start ``argv`` as a supervised child that cannot outlive this process.

    The child runs in a new session (so its pgid is its pid and :func:`kill_tree` can signal the whole
    group) with ``PR_SET_PDEATHSIG(SIGKILL)``. ``env`` is the child's complete environment. Must be
    awaited on a loop running in a long-lived thread (see the module docstring). ``cpus`` sets the
    child's CPU affinity and ``cgroup`` (a cgroup v2 directory) the cgroup it joins, both before exec.

    Raises:
        SpawnError: the program could not be executed (``errno`` tells why).
        ValueError: ``argv`` is empty.
    """
    if not argv:
        raise ValueError("spawn: argv must not be empty")
    program = argv[0]
    loop = asyncio.get_running_loop()
    try:
        # What asyncio.create_subprocess_exec does, with our protocol and Process class (see Child).
        transport, protocol = await loop.subprocess_exec(
            lambda: _ChildProtocol(_STREAM_LIMIT, loop),
            *argv,
            env=dict(env),
            cwd=cwd,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            pass_fds=tuple(pass_fds),
            start_new_session=True,
            preexec_fn=_child_setup_for(
                os.getpid(),
                _ignored_signals(),
                frozenset(cpus) if cpus is not None else None,
                os.path.join(cgroup, "cgroup.procs") if cgroup is not None else None,
            ),
        )
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if cwd is not None and isinstance(exc, FileNotFoundError) and not os.path.isdir(cwd):
            reason = f"{reason} (cwd {cwd!r})"
        raise SpawnError(exc.errno, f"cannot start process: {reason}", program) from exc
    except subprocess.SubprocessError as exc:
        # Only the preexec_fn (prctl) failing gets here.
        cause = exc.__cause__
        errno_ = cause.errno if isinstance(cause, OSError) else None
        reason = f"child setup failed: {cause or exc}"
        raise SpawnError(errno_, f"cannot start process: {reason}", program) from exc
    return Child(transport, protocol, loop)


def process_tree(pid: int) -> list[psutil.Process]:
    """Return the process ``pid`` followed by all its descendants; empty if it is gone.

    Descendants are found through parent links, so processes that left the group are included, but a
    grandchild whose parent already exited has been re-parented and is not. Blocking (reads /proc).
    """
    try:
        root = psutil.Process(pid)
        descendants = root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [root, *descendants]


def signal_tree(pid: int, pgid: int, sig: int) -> None:
    """Best-effort: send ``sig`` to process group ``pgid`` and to descendants of ``pid`` outside it.

    For SIGSTOP/SIGCONT and the like on a live child. Processes that vanished are ignored. Blocking
    (reads /proc): call it through ``loop.run_in_executor`` from the event loop.
    """
    _signal_all(pgid, process_tree(pid), sig)


async def kill_tree(
    proc: asyncio.subprocess.Process, *, grace: float, sig: int = signal.SIGTERM
) -> int:
    """Stop ``proc`` and its whole process tree; return its returncode.

    ``proc`` should come from :func:`spawn`: it must lead its own process group, and a plain asyncio
    ``Process`` on the default loop may not report its exit while a descendant holds its pipes open.

    Sends ``sig`` (and SIGCONT, so stopped processes can act on it) to the child's process group and to
    every descendant that left the group, waits up to ``grace`` seconds for the child and then its
    descendants to exit, then SIGKILLs the group and all survivors (re-scanning for new ones) and waits
    until they are gone. ``grace <= 0`` or ``sig == SIGKILL`` kills at once.

    Idempotent and safe on a child that already exited: its leftover group members are still killed.
    Zombies count as gone (they hold no memory, files or devices any more). If cancelled, SIGKILLs what
    it knows of before re-raising. The tree is scanned before it is signalled (a dead child's escaped
    descendants could no longer be found), on threads kept for that (see ``_signaller``).
    """
    loop = asyncio.get_running_loop()
    known: dict[int, psutil.Process] = {}
    try:
        if grace > 0 and sig != signal.SIGKILL:
            deadline = loop.time() + grace
            # SIGCONT too, as systemd does: a stopped process would not act on SIGTERM until resumed.
            sigs = (sig,) if sig == signal.SIGCONT else (sig, signal.SIGCONT)
            known = await loop.run_in_executor(_signaller, _scan_and_signal, proc, known, sigs)
            if proc.returncode is None:
                try:
                    async with asyncio.timeout_at(deadline):
                        await proc.wait()
                except TimeoutError:
                    pass
            remaining = deadline - loop.time()
            if proc.returncode is not None and known and remaining > 0:
                # The child may exit before its own workers finish shutting down; they share its grace.
                await loop.run_in_executor(None, _wait_dead, list(known.values()), remaining)
        await _kill_rounds(proc, known)
    except asyncio.CancelledError:
        _signal_all(_group_if_ours(proc), known.values(), signal.SIGKILL)
        raise

    try:
        async with asyncio.timeout(_AFTER_KILL_CEILING):
            returncode = await proc.wait()
    except TimeoutError:
        _log.warning("pid %d survived SIGKILL for %.0f s (uninterruptible sleep?); still waiting",
                     proc.pid, _AFTER_KILL_CEILING)
        returncode = await proc.wait()
    if known:
        stuck = await loop.run_in_executor(None, _wait_dead, list(known.values()), _AFTER_KILL_CEILING)
        if stuck:
            _log.warning("descendants of pid %d survived SIGKILL for %.0f s: %s",
                         proc.pid, _AFTER_KILL_CEILING, sorted(p.pid for p in stuck))
    return returncode


async def _kill_rounds(proc: asyncio.subprocess.Process, known: dict[int, psutil.Process]) -> None:
    """SIGKILL the group and every known or newly found descendant until a scan finds nothing new.

    ``known`` is updated in place so the caller can wait for everything that was killed.
    """
    loop = asyncio.get_running_loop()
    for _ in range(_KILL_ROUNDS):
        before = set(known)
        known.update(await loop.run_in_executor(_signaller, _scan_and_signal, proc, known, (signal.SIGKILL,)))
        if set(known) == before:
            return
    _log.warning("pid %d: descendants kept appearing during %d kill rounds", proc.pid, _KILL_ROUNDS)


def _group_if_ours(proc: asyncio.subprocess.Process) -> int | None:
    """The child's pgid if signalling it cannot hit a stranger, else ``None``.

    While the child is unreaped its pid (= pgid) cannot be reused. Once reaped, Linux still will not
    reuse the number while any process is in that group; so if a process with that pid exists, it is a
    newcomer and the old group is empty.
    """
    if proc.returncode is None:
        return proc.pid
    return None if psutil.pid_exists(proc.pid) else proc.pid


def _snapshot(
    proc: asyncio.subprocess.Process, known: Mapping[int, psutil.Process]
) -> dict[int, psutil.Process]:
    """Return ``known`` plus the child's descendants, its group's members and the descendants of
    ``known`` survivors (the child itself excluded). Blocking; runs in the executor.

    One pass over /proc. Objects already in ``known`` are kept: psutil anchors a process's identity at
    construction, which is what protects later signals from reused pids.
    """
    group = _group_if_ours(proc)
    roots = {pid for pid, p in known.items() if _is_running(p)}
    if proc.returncode is None:
        roots.add(proc.pid)  # unreaped, so the pid is still the child's
    children: dict[int, list[int]] = {}
    wanted: set[int] = set()
    for pid, ppid, pgrp in _proc_table():
        children.setdefault(ppid, []).append(pid)
        if pgrp == group:
            wanted.add(pid)  # includes members re-parented after their parent died
    stack = list(roots)
    while stack:
        for pid in children.get(stack.pop(), ()):
            if pid not in wanted:
                wanted.add(pid)
                stack.append(pid)
    found: dict[int, psutil.Process] = dict(known)
    for pid in wanted - found.keys() - {proc.pid}:
        try:
            found[pid] = psutil.Process(pid)
        except psutil.NoSuchProcess:
            continue
    return found


def _proc_table() -> Iterator[tuple[int, int, int]]:
    """Yield ``(pid, ppid, pgid)`` for every process, from /proc/<pid>/stat."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
            # The command name is in parentheses and may itself contain spaces and parentheses.
            fields = stat[stat.rindex(b")") + 2 :].split()
            yield int(name), int(fields[1]), int(fields[2])
        except (OSError, ValueError, IndexError):
            continue  # exited while we looked


def _scan_and_signal(
    proc: asyncio.subprocess.Process, known: Mapping[int, psutil.Process], sigs: Sequence[int]
) -> dict[int, psutil.Process]:
    """Snapshot the tree (see :func:`_snapshot`) and send it ``sigs`` in order. Runs in the executor."""
    found = _snapshot(proc, known)
    for sig in sigs:
        _signal_all(_group_if_ours(proc), found.values(), sig)
    return found


def _signal_all(pgid: int | None, procs: Iterable[psutil.Process], sig: int) -> None:
    """Signal group ``pgid`` (if not ``None``) and each of ``procs`` that is outside that group.

    Members of the group are not signalled twice: some programs treat a second SIGINT/SIGTERM as
    "force quit".
    """
    if pgid is not None:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
        except PermissionError as exc:
            _log.warning("cannot signal process group %d: %s", pgid, exc)
    for p in procs:
        try:
            if pgid is not None and os.getpgid(p.pid) == pgid:
                continue
            p.send_signal(sig)  # checks the pid was not reused
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
        except psutil.AccessDenied as exc:
            _log.warning("cannot signal pid %d: %s", p.pid, exc)


def _is_running(p: psutil.Process) -> bool:
    try:
        return p.is_running()
    except psutil.Error:
        return False


def _is_dead(p: psutil.Process) -> bool:
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_dead(procs: Sequence[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait up to ``timeout`` s for ``procs`` to die; return those still alive. Runs in the executor.

    Not psutil.wait_procs: that counts zombies as alive, and a descendant's zombie may never be reaped
    by us (its new parent is init or a subreaper). It would also reap our direct children behind
    asyncio's back. The polling interval backs off from 1 ms to 50 ms.
    """
    deadline = time.monotonic() + timeout
    delay = 0.001
    alive = list(procs)
    while True:
        alive = [p for p in alive if not _is_dead(p)]
        remaining = deadline - time.monotonic()
        if not alive or remaining <= 0:
            return alive
        time.sleep(min(delay, remaining))  # executor thread, not the loop
        delay = min(delay * 2, 0.05)
