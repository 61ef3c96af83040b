"""A stand-in for systemd's notification socket, and a daemon started the way systemd starts it.

``NotifyListener`` binds a real ``AF_UNIX`` datagram socket; ``run_daemon`` starts microkerneld
with ``NOTIFY_SOCKET`` pointing at it and returns once the daemon sent ``READY=1`` (the event,
not its log output: a daemon that logs to a file or in JSON is waited for the same way).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.integration.conftest import REPO_ROOT, kernel_env, terminate

CEILING = 30.0  # seconds; every wait returns as soon as its datagram arrives


class NotifyListener:
    """Receives sd_notify datagrams; each is returned as a ``{KEY: VALUE}`` dict."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.path = str(Path(directory) / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.received: list[dict[str, str]] = []
        self.sender: subprocess.Popen[bytes] | None = None
        """The daemon, once started: waiting stops early (and fails) if it exits."""

    def next(self, ceiling: float = CEILING) -> dict[str, str]:
        deadline = time.monotonic() + ceiling
        while True:
            # Short receive timeouts only to notice a daemon that died; the datagram ends the wait.
            self.sock.settimeout(max(0.01, min(1.0, deadline - time.monotonic())))
            try:
                data = self.sock.recv(65536)
                break
            except TimeoutError:
                if self.sender is not None and self.sender.poll() is not None:
                    pytest.fail(f"microkerneld exited ({self.sender.returncode}) while waiting for sd_notify "
                                f"(so far: {self.received})", pytrace=False)
                if time.monotonic() >= deadline:
                    pytest.fail(f"no sd_notify datagram within {ceiling:g}s (so far: {self.received})", pytrace=False)
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
        self.received.append(fields)
        return fields

    def wait_for(self, key: str, ceiling: float = CEILING) -> dict[str, str]:
        """The next datagram that sets ``key`` (earlier ones are kept in ``received``)."""
        deadline = time.monotonic() + ceiling
        while True:
            fields = self.next(max(0.01, deadline - time.monotonic()))
            if key in fields:
                return fields

    def close(self) -> None:
        self.sock.close()


class Daemon(NamedTuple):
    """A microkerneld run under a notification socket."""

    proc: subprocess.Popen[bytes]
    runtime_dir: Path
    config: Path | None
    notify: NotifyListener
    output: Path


@contextlib.contextmanager
def run_daemon(workdir: str | os.PathLike[str], config_text: str | None, *args: str,
               env: dict[str, str] | None = None) -> Iterator[Daemon]:
    """Start microkerneld in ``workdir`` (``config_text`` None: without --config); yields after READY=1."""
    workdir = Path(workdir)
    notify = NotifyListener(workdir)
    config = None
    argv = [sys.executable, "-m", "microkernel", "--runtime-dir", str(workdir / "rt")]
    if config_text is not None:
        config = workdir / "kernel.toml"
        config.write_text(config_text)
        argv += ["--config", str(config)]
    output = workdir / "daemon.out"
    with open(output, "wb") as out:
        proc = subprocess.Popen([*argv, *args], cwd=REPO_ROOT, env={**kernel_env(), "NOTIFY_SOCKET": notify.path, **(env or {})},
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    notify.sender = proc
    try:
        notify.wait_for("READY")
        yield Daemon(proc, workdir / "rt", config, notify, output)
    finally:
        terminate(proc)
        notify.close()
        sys.stderr.write(f"--- microkerneld output (exit code {proc.returncode}) ---\n"
                         + output.read_text(errors="replace"))
