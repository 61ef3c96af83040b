"""Suite-wide fixtures: every test must clean up the processes it starts.

The pytest process becomes a child subreaper, so orphaned grandchildren re-parent to it instead of to
init and stay visible as descendants; ``no_leftover_processes`` then fails any test that leaves one
behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator

import psutil
import pytest

_PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>

# A ceiling, not a sleep: the fixture returns as soon as every new descendant is gone.
_LEFTOVER_CEILING = 10.0


def pytest_configure(config: pytest.Config) -> None:
    """Make this process a child subreaper before any test starts a process."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER) failed: {os.strerror(err)}")


def _descendants() -> dict[int, psutil.Process]:
    return {p.pid: p for p in psutil.Process().children(recursive=True)}


def _describe(p: psutil.Process) -> str:
    try:
        return f"pid {p.pid}: {' '.join(p.cmdline()) or p.name()}"
    except psutil.Error:
        return f"pid {p.pid}: (gone)"


def _is_alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _reap_new_zombies(before: set[int]) -> None:
    """Reap our own zombie children that the test created.

    Only specific, new pids: a blanket ``waitpid(-1)`` could steal the exit status of a process owned
    by a longer-lived fixture (a Popen, or an asyncio child watcher of a loop still running in another
    thread). The test's own loop is closed by now.
    """
    for child in psutil.Process().children():
        if child.pid in before:
            continue
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                continue
            os.waitpid(child.pid, os.WNOHANG)
        except (psutil.NoSuchProcess, ChildProcessError):
            continue


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Fail the test if a process it started is still alive shortly after it ends.

    Leftovers are SIGKILLed (so one leak does not cascade into the next test) and listed.
    """
    before = set(_descendants())
    yield
    new = [p for pid, p in _descendants().items() if pid not in before]
    # wait_procs reaps those that are our children (orphans re-parented to us included).
    _, alive = psutil.wait_procs(new, timeout=_LEFTOVER_CEILING)
    leftovers = [p for p in alive if _is_alive(p)]
    described = [_describe(p) for p in leftovers]
    for p in leftovers:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(leftovers, timeout=_LEFTOVER_CEILING)
    _reap_new_zombies(before)
    if described:
        pytest.fail("test left processes running:\n  " + "\n  ".join(described), pytrace=False)


@pytest.fixture
def short_tmp() -> Iterator[str]:
    """A short temporary directory under /tmp (ipc:// socket paths must stay under ~100 chars)."""
    path = tempfile.mkdtemp(prefix="mk-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
