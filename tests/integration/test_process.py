"""No orphans, ever: spawn / kill_tree / PDEATHSIG / sentinel against real processes.

Every async test runs on both uvloop and the default asyncio loop. Waits are on process exit or pipe
output, with generous timeouts as ceilings only.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import selectors
import signal
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

import psutil
import pytest

from tests import processes
import uvloop

from microkernel.sentinel import Sentinel
from microkernel.supervisor.process import SpawnError, kill_tree, process_tree, signal_tree, spawn

T = TypeVar("T")

CEILING = 10.0
REPO_ROOT = Path(__file__).resolve().parents[2]

LOOP_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}

# A grandchild: optionally escapes the group with setsid and/or ignores SIGTERM, reports its process
# group once that is done, then blocks until killed.
GRANDCHILD = textwrap.dedent(
    """
    import os, signal, sys
    if "escape" in sys.argv[1:]:
        os.setsid()
    if "stubborn" in sys.argv[1:]:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(os.getpgrp(), flush=True)
    while True:
        signal.pause()
    """
)

# A child that exits 0 on SIGTERM, after reporting that its handler is in place.
POLITE_CHILD = textwrap.dedent(
    """
    import signal, sys
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("[]", flush=True)
    while True:
        signal.pause()
    """
)

# A child with two grandchildren, one of which escapes the group. Prints one JSON line once every
# grandchild is set up, then blocks. argv: [stubborn] [no-escape]
FAMILY = textwrap.dedent(
    """
    import json, os, signal, subprocess, sys
    flags = sys.argv[1:]
    extra = ["stubborn"] if "stubborn" in flags else []
    if "stubborn" in flags:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    grandchildren = []
    for mode in ("stay", "stay" if "no-escape" in flags else "escape"):
        p = subprocess.Popen([sys.executable, "-c", GRANDCHILD, mode, *extra], stdout=subprocess.PIPE)
        grandchildren.append({"pid": p.pid, "pgrp": int(p.stdout.readline())})
    print(json.dumps({"pid": os.getpid(), "pgrp": os.getpgrp(), "grandchildren": grandchildren}),
          flush=True)
    while True:
        signal.pause()
    """
).replace("GRANDCHILD", repr(GRANDCHILD))

# A stand-in for the daemon: spawns FAMILY through spawn() (optionally guarded by a Sentinel), prints
# the family's pids, then blocks until kill -9. argv: <loop> <plain|sentinel> <family source>
FAKE_DAEMON = textwrap.dedent(
    """
    import asyncio, json, os, sys
    import uvloop
    from microkernel.sentinel import Sentinel
    from microkernel.supervisor.process import spawn

    async def main(mode: str, family: str) -> None:
        env = dict(os.environ)
        sentinel = None
        if mode == "sentinel":
            sentinel = Sentinel()
            await sentinel.start()
            env.update(sentinel.marker_env)
        proc = await spawn([sys.executable, "-c", family, "no-escape" if mode == "plain" else "escape"],
                           env=env, stdout=asyncio.subprocess.PIPE)
        if sentinel is not None:
            sentinel.track(proc.pid)
        info = json.loads(await proc.stdout.readline())
        info["sentinel"] = None if sentinel is None else sentinel.pid
        print(json.dumps(info), flush=True)
        await asyncio.Event().wait()

    factory = uvloop.new_event_loop if sys.argv[1] == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main(sys.argv[2], sys.argv[3]))
    """
)


# --------------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(params=sorted(LOOP_FACTORIES))
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, T]], T]:
    """Run a coroutine to completion on a fresh loop of the parametrized kind, with a ceiling."""

    def run_(coro: Coroutine[Any, Any, T]) -> T:
        async def bounded() -> T:
            async with asyncio.timeout(4 * CEILING):
                return await coro

        with asyncio.Runner(loop_factory=LOOP_FACTORIES[request.param]) as runner:
            return runner.run(bounded())

    return run_


@pytest.fixture(params=sorted(LOOP_FACTORIES))
def loop_name(request: pytest.FixtureRequest) -> str:
    """The loop the fake daemon runs on."""
    return str(request.param)


def child_env() -> dict[str, str]:
    return dict(os.environ)


async def read_json(proc: asyncio.subprocess.Process) -> Any:
    assert proc.stdout is not None
    async with asyncio.timeout(CEILING):
        line = await proc.stdout.readline()
    assert line, "child exited before reporting"
    return json.loads(line)


async def spawn_python(source: str, *args: str) -> asyncio.subprocess.Process:
    return await spawn([sys.executable, "-c", source, *args], env=child_env(),
                       stdout=asyncio.subprocess.PIPE)


def family_pids(info: dict[str, Any]) -> list[int]:
    return [info["pid"], *(g["pid"] for g in info["grandchildren"])]


def assert_all_gone(pids: Iterable[int]) -> None:
    """Wait (ceiling CEILING) for ``pids`` to be gone."""
    processes.assert_all_gone(pids, CEILING)


def read_line(stream: IO[bytes] | None, timeout: float = CEILING) -> bytes:
    """One line from a blocking pipe, with a ceiling (the child may die without writing)."""
    assert stream is not None
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        assert sel.select(timeout), "no output before the ceiling"
    return stream.readline()


StartDaemon = Callable[[str], tuple[subprocess.Popen[bytes], dict[str, Any]]]


@pytest.fixture
def fake_daemon(short_tmp: str, loop_name: str) -> Iterator[StartDaemon]:
    """Start FAKE_DAEMON in a given mode; returns (popen, the info it printed). Killed at teardown."""
    script = Path(short_tmp, "fake_daemon.py")
    script.write_text(FAKE_DAEMON)
    started: list[subprocess.Popen[bytes]] = []

    def start(mode: str) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        popen = subprocess.Popen([sys.executable, str(script), loop_name, mode, FAMILY],
                                 stdout=subprocess.PIPE, env=env, cwd=short_tmp)
        started.append(popen)
        line = read_line(popen.stdout)
        assert line, f"fake daemon exited early with {popen.poll()}"
        return popen, json.loads(line)

    yield start
    for popen in started:
        if popen.poll() is None:
            popen.kill()
        popen.wait(CEILING)
        assert popen.stdout is not None
        popen.stdout.close()


# --------------------------------------------------------------------------------------------------
# spawn


def test_spawn_starts_child_in_its_own_session(run: Callable[[Awaitable[Any]], Any]) -> None:
    async def scenario() -> tuple[int, list[int]]:
        proc = await spawn_python(
            "import os, json; print(json.dumps([os.getpid(), os.getpgrp(), os.getsid(0)]))")
        ids = await read_json(proc)
        return await proc.wait(), ids

    returncode, (pid, pgrp, sid) = run(scenario())
    assert returncode == 0
    assert pid == pgrp == sid


def test_spawn_resets_ignored_signals(run: Callable[[Awaitable[Any]], Any]) -> None:
    """A daemon started under nohup or with `&` ignores signals; its children must not inherit that."""
    source = textwrap.dedent(
        """
        import json
        fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
        print(json.dumps([int(fields["SigIgn"], 16), int(fields["SigBlk"], 16)]))
        """
    )

    async def scenario() -> list[int]:
        proc = await spawn_python(source)
        masks: list[int] = await read_json(proc)
        await proc.wait()
        return masks

    previous = signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    try:
        ignored, blocked = run(scenario())
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert not ignored & (1 << (signal.SIGUSR2 - 1))
    assert blocked == 0


def test_spawn_nonexistent_program_raises_spawn_error(run: Callable[[Awaitable[Any]], Any]) -> None:
    with pytest.raises(SpawnError) as caught:
        run(spawn(["/nonexistent/mk-no-such-program"], env=child_env()))
    assert caught.value.errno == errno.ENOENT
    assert caught.value.program == "/nonexistent/mk-no-such-program"
    assert "/nonexistent/mk-no-such-program" in str(caught.value)
    assert isinstance(caught.value, OSError)


def test_spawn_non_executable_raises_spawn_error(
    run: Callable[[Awaitable[Any]], Any], short_tmp: str
) -> None:
    script = Path(short_tmp, "not-executable")
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    with pytest.raises(SpawnError) as caught:
        run(spawn([str(script)], env=child_env()))
    assert caught.value.errno == errno.EACCES


def test_spawn_bad_cwd_raises_spawn_error(run: Callable[[Awaitable[Any]], Any]) -> None:
    with pytest.raises(SpawnError) as caught:
        run(spawn([sys.executable, "-c", "pass"], env=child_env(), cwd="/nonexistent/mk-cwd"))
    assert caught.value.errno == errno.ENOENT


# --------------------------------------------------------------------------------------------------
# kill_tree


@pytest.mark.parametrize("stubborn", [False, True], ids=["polite", "stubborn"])
def test_kill_tree_kills_child_and_all_grandchildren(
    run: Callable[[Awaitable[Any]], Any], stubborn: bool
) -> None:
    async def scenario() -> tuple[int, dict[str, Any]]:
        proc = await spawn_python(FAMILY, *(["stubborn"] if stubborn else []))
        info = await read_json(proc)
        tree = {p.pid for p in process_tree(proc.pid)}
        assert set(family_pids(info)) <= tree
        return await kill_tree(proc, grace=0.5 if stubborn else CEILING), info

    returncode, info = run(scenario())
    stay, escaped = info["grandchildren"]
    assert stay["pgrp"] == info["pid"]
    assert escaped["pgrp"] == escaped["pid"] != info["pid"]  # really left the group
    assert returncode == (-signal.SIGKILL if stubborn else -signal.SIGTERM)
    assert_all_gone(family_pids(info))


def test_kill_tree_sigkills_child_that_ignores_sigterm(run: Callable[[Awaitable[Any]], Any]) -> None:
    source = textwrap.dedent(
        """
        import signal
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("[]", flush=True)
        while True:
            signal.pause()
        """
    )

    async def scenario() -> int:
        proc = await spawn_python(source)
        await read_json(proc)
        return await kill_tree(proc, grace=0.3)

    assert run(scenario()) == -signal.SIGKILL


def test_kill_tree_lets_child_exit_cleanly_within_grace(run: Callable[[Awaitable[Any]], Any]) -> None:

    async def scenario() -> int:
        proc = await spawn_python(POLITE_CHILD)
        await read_json(proc)
        return await kill_tree(proc, grace=CEILING)

    assert run(scenario()) == 0


def test_kill_tree_grace_zero_kills_at_once(run: Callable[[Awaitable[Any]], Any]) -> None:

    async def scenario() -> int:
        proc = await spawn_python(POLITE_CHILD)
        await read_json(proc)
        return await kill_tree(proc, grace=0)

    assert run(scenario()) == -signal.SIGKILL


@pytest.mark.parametrize("grace, expected", [(0, -signal.SIGKILL), (CEILING, 0)])
def test_kill_tree_signals_a_stopped_child_while_the_thread_pool_is_busy(
    run: Callable[[Awaitable[Any]], Any], grace: float, expected: int,
) -> None:
    """A hung (SIGSTOPped) child is killed, or resumed and terminated, while every thread of the
    loop's default executor is blocked: the signals to its group must not queue behind sampling or
    other stops waiting out their grace (a hung replica was once killed seconds late that way)."""

    async def scenario() -> int:
        loop = asyncio.get_running_loop()
        pool = ThreadPoolExecutor(max_workers=2)
        loop.set_default_executor(pool)
        proc = await spawn_python(POLITE_CHILD)
        await read_json(proc)
        os.kill(proc.pid, signal.SIGSTOP)
        release = threading.Event()
        busy = [loop.run_in_executor(None, release.wait) for _ in range(2)]
        kill = asyncio.ensure_future(kill_tree(proc, grace=grace))
        try:
            async with asyncio.timeout(CEILING):
                returncode = await proc.wait()  # gone while the pool is still blocked
        finally:
            release.set()
            await asyncio.gather(*busy)
        assert await kill == returncode
        return returncode

    assert run(scenario()) == expected


def test_kill_tree_after_child_exited_kills_leftover_group_and_is_idempotent(
    run: Callable[[Awaitable[Any]], Any],
) -> None:
    """A crashed service's workers outlive it in its group; kill_tree still finds and kills them."""
    source = textwrap.dedent(
        """
        import json, os, subprocess, sys
        p = subprocess.Popen([sys.executable, "-c", "import signal\\nwhile True: signal.pause()"])
        print(json.dumps(p.pid), flush=True)
        os._exit(3)
        """
    )

    async def scenario() -> tuple[int, int, int]:
        proc = await spawn_python(source)
        orphan = await read_json(proc)
        assert await proc.wait() == 3
        first = await kill_tree(proc, grace=CEILING)
        second = await kill_tree(proc, grace=CEILING)
        return first, second, orphan

    first, second, orphan = run(scenario())
    assert first == second == 3
    assert_all_gone([orphan])


def test_kill_tree_resumes_stopped_tree(run: Callable[[Awaitable[Any]], Any]) -> None:
    """signal_tree(SIGSTOP) freezes the whole family; kill_tree still stops it gracefully."""

    async def scenario() -> tuple[int, dict[str, Any]]:
        proc = await spawn_python(FAMILY)
        info = await read_json(proc)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, signal_tree, proc.pid, proc.pid, signal.SIGSTOP)
        # Wait for the stop to take effect (WNOWAIT: the child stays waitable for asyncio; stop
        # reports are invisible to the loop's own waitpid, which does not ask for WUNTRACED).
        stopped = await loop.run_in_executor(
            None, os.waitid, os.P_PID, proc.pid, os.WSTOPPED | os.WNOWAIT)
        assert stopped is not None and stopped.si_code == os.CLD_STOPPED
        return await kill_tree(proc, grace=CEILING), info

    returncode, info = run(scenario())
    assert returncode == -signal.SIGTERM
    assert_all_gone(family_pids(info))


# --------------------------------------------------------------------------------------------------
# dying daemon


def test_child_dies_with_killed_daemon(fake_daemon: StartDaemon) -> None:
    """PDEATHSIG: kill -9 of the daemon takes its direct child with it."""
    daemon, info = fake_daemon("plain")
    child = psutil.Process(info["pid"])
    grandchildren = [g["pid"] for g in info["grandchildren"]]
    daemon.kill()
    daemon.wait(CEILING)
    assert_all_gone([child.pid])
    # PDEATHSIG does not reach grandchildren (that is the sentinel's job); clean them up here.
    for pid in grandchildren:
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).kill()
    assert_all_gone(grandchildren)


def test_sentinel_kills_whole_family_of_killed_daemon(fake_daemon: StartDaemon) -> None:
    daemon, info = fake_daemon("sentinel")
    sentinel = psutil.Process(info["sentinel"])
    pids = family_pids(info)
    assert info["grandchildren"][1]["pgrp"] != info["pid"]  # one escaped: caught by the env marker
    daemon.kill()
    daemon.wait(CEILING)
    assert_all_gone(pids)
    gone, _ = psutil.wait_procs([sentinel], timeout=CEILING)
    assert gone, "the sentinel did not exit by itself"
    assert getattr(gone[0], "returncode", None) == 0  # set by wait_procs


# --------------------------------------------------------------------------------------------------
# Sentinel (in-process)


def test_sentinel_close_kills_only_still_tracked_groups(run: Callable[[Awaitable[Any]], Any]) -> None:
    source = "import signal\nprint('[]', flush=True)\nwhile True: signal.pause()"

    async def scenario() -> tuple[int, int]:
        sentinel = Sentinel()
        await sentinel.start()
        tracked = await spawn_python(source)
        untracked = await spawn_python(source)
        await read_json(tracked)
        await read_json(untracked)
        sentinel.track(tracked.pid)
        sentinel.track(untracked.pid)
        sentinel.untrack(untracked.pid)
        await sentinel.close()
        tracked_rc = await asyncio.wait_for(tracked.wait(), CEILING)
        assert untracked.returncode is None
        untracked_rc = await kill_tree(untracked, grace=CEILING)
        return tracked_rc, untracked_rc

    assert run(scenario()) == (-signal.SIGKILL, -signal.SIGTERM)


def test_sentinel_restarts_and_replays_after_dying(run: Callable[[Awaitable[Any]], Any]) -> None:
    source = "import signal\nprint('[]', flush=True)\nwhile True: signal.pause()"

    async def scenario() -> int:
        sentinel = Sentinel()
        await sentinel.start()
        first = sentinel.pid
        assert first is not None
        child = await spawn_python(source)
        await read_json(child)
        sentinel.track(child.pid)
        os.kill(first, signal.SIGKILL)
        assert await asyncio.wait_for(sentinel.wait_exited(), CEILING) == -signal.SIGKILL
        assert not sentinel.running
        sentinel.track(child.pid)  # must not raise; only warns
        await sentinel.start()
        assert sentinel.running and sentinel.pid != first
        assert sentinel.tracked == {child.pid}
        await sentinel.close()  # the replayed entry makes the new sentinel kill the child
        return await asyncio.wait_for(child.wait(), CEILING)

    assert run(scenario()) == -signal.SIGKILL


def test_sentinel_ignores_terminal_signals() -> None:
    """It must not die of SIGINT/SIGHUP/SIGTERM before cleaning up; it exits on stdin EOF."""
    path = REPO_ROOT / "microkernel" / "sentinel.py"
    # Unbuffered, so that select() on the pipe and readline() agree on what has been read.
    proc = subprocess.Popen([sys.executable, "-I", "-S", str(path)], stdin=subprocess.PIPE,
                            stderr=subprocess.PIPE, bufsize=0)
    try:
        assert proc.stdin is not None
        proc.stdin.write(b"+0\n+1\nbogus\n")  # rejected, with a complaint on stderr
        proc.stdin.flush()
        assert proc.stderr is not None
        assert b"ignoring bad command" in read_line(proc.stderr)
        for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
            proc.send_signal(sig)
        # Signals are delivered before the next stdin read returns, so a reply proves we survived them.
        proc.stdin.write(b"bogus\n")
        proc.stdin.flush()
        read_line(proc.stderr)
        read_line(proc.stderr)
        assert b"ignoring bad command" in read_line(proc.stderr)
        assert proc.poll() is None
        proc.stdin.close()
        assert proc.wait(CEILING) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(CEILING)
        assert proc.stderr is not None
        proc.stderr.close()
