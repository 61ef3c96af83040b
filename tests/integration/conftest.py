"""Integration fixtures: a real microkerneld in a subprocess.

``kernel`` starts ``python -m microkernel --config FILE --runtime-dir DIR`` with the TOML text of
the ``kernel_config`` fixture (no services by default; override it in a module, or parametrize
``kernel_config`` directly) and yields ``KernelHandle(runtime_dir, proc)`` once the daemon has
logged "microkernel ready" (its sockets are bound). It always terminates the daemon: SIGTERM,
then SIGKILL of its process group after a ceiling. The daemon's output (and its services',
which inherit it) is collected and printed to stderr at teardown, so pytest shows it for failed
tests (printing from the reader thread as it arrives would leak between pytest's capture phases).

``start_kernel`` is the same as a context manager, for tests that need several kernels or a
config computed at run time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, NamedTuple

import pytest

from protocols.endpoints import ENDPOINT_ENV, RUNTIME_DIR_ENV, KernelEndpoints

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_LINE = "microkernel ready"
READY_CEILING = 20.0  # seconds; a ceiling, the fixture returns as soon as the line appears
STOP_CEILING = 30.0


class KernelHandle(NamedTuple):
    """A running daemon: its runtime directory and its process."""

    runtime_dir: Path
    proc: subprocess.Popen[bytes]

    @property
    def endpoints(self) -> KernelEndpoints:
        """The kernel's control and event endpoints."""
        return KernelEndpoints.in_runtime_dir(self.runtime_dir)


def kernel_env() -> dict[str, str]:
    """The environment for the daemon and for ``mkctl`` subprocesses: the repo importable
    (fixture services live in ``tests.fixtures``), no ambient endpoint overrides."""
    env = dict(os.environ)
    env.pop(ENDPOINT_ENV, None)
    env.pop(RUNTIME_DIR_ENV, None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _collect_output(stream: IO[bytes], lines: list[str], ready: threading.Event) -> None:
    """Keep the daemon's output lines and spot its readiness line."""
    for raw in iter(stream.readline, b""):
        lines.append(raw.decode("utf-8", "replace"))
        if not ready.is_set() and READY_LINE.encode() in raw:
            ready.set()
    stream.close()
    ready.set()  # EOF: the daemon is gone; the waiter checks proc.poll()


def terminate(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL of the daemon's process group after a ceiling."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_CEILING)
    except subprocess.TimeoutExpired:
        # The daemon ignored SIGTERM: kill its whole group (services die with it via PDEATHSIG).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_CEILING)


@contextlib.contextmanager
def start_kernel(config_text: str, workdir: str | os.PathLike[str], *, extra_args: tuple[str, ...] = ()) -> Iterator[KernelHandle]:
    """Run a daemon with ``config_text`` (TOML) in ``workdir`` (keep it short: ipc paths)."""
    workdir = Path(workdir)
    config = workdir / "kernel.toml"
    config.write_text(config_text)
    runtime_dir = workdir / "rt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "microkernel", "--config", str(config), "--runtime-dir", str(runtime_dir), *extra_args],
        cwd=REPO_ROOT,
        env=kernel_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: a last-resort killpg hits nothing else
    )
    ready = threading.Event()
    output: list[str] = []
    assert proc.stdout is not None
    reader = threading.Thread(target=_collect_output, args=(proc.stdout, output, ready), name="microkerneld-output", daemon=True)
    reader.start()
    try:
        if not ready.wait(READY_CEILING):
            pytest.fail(f"microkerneld did not log {READY_LINE!r} within {READY_CEILING:g}s", pytrace=False)
        if proc.poll() is not None:
            pytest.fail(f"microkerneld exited with code {proc.returncode} before it was ready (output below)", pytrace=False)
        yield KernelHandle(runtime_dir, proc)
    finally:
        terminate(proc)
        reader.join(timeout=STOP_CEILING)
        sys.stderr.write(f"--- microkerneld output (exit code {proc.returncode}) ---\n" + "".join(output))


@pytest.fixture
def kernel_config() -> str:
    """The TOML the ``kernel`` fixture runs; override per module or parametrize it."""
    return ""


@pytest.fixture
def kernel(kernel_config: str, short_tmp: str) -> Iterator[KernelHandle]:
    """A running microkerneld configured with ``kernel_config``."""
    with start_kernel(kernel_config, short_tmp) as handle:
        yield handle
