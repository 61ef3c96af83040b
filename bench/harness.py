"""Shared pieces of the benchmarks: a daemon in a short temp dir, statistics, JSON output.

Everything here waits on messages, pipes or process exits; nothing sleeps to wait for readiness.
Progress goes to stderr; the one JSON result line goes to stdout (``emit``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python bench/rpc.py` puts bench/ first, not the repo root
    sys.path.insert(0, str(REPO))

PYTHON = sys.executable
READY_LINE = "microkernel ready"

# ~100 bytes of msgpack: {"text": <91 chars>} packs to 1 + 5 + 2 + 91 = 99 bytes.
PAYLOAD_TEXT = "x" * 91


def log(*parts: Any) -> None:
    print("[bench]", *parts, file=sys.stderr, flush=True)


def emit(result: Mapping[str, Any]) -> None:
    """The one line on stdout."""
    sys.stdout.write(json.dumps(result, sort_keys=False) + "\n")
    sys.stdout.flush()


def exit_cleanly_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so ``finally`` blocks stop the daemons we started."""

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def short_tmp(prefix: str = "mk-") -> str:
    """A short directory under /tmp (ipc paths are limited to ~107 bytes)."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def with_bytecode_cache(env: dict[str, str], tmp: str) -> dict[str, str]:
    """``env`` with a bytecode cache in ``tmp`` for the daemon and every process it starts.

    An installed package has its bytecode compiled at install time; a source checkout run with
    ``PYTHONDONTWRITEBYTECODE=1`` (as some sandboxes set) would instead compile every module of
    ours again in every replica at every start, and the restart figure would measure the compiler.
    The cache lives in the benchmark's temporary directory and goes away with it.
    """
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = os.path.join(tmp, "pycache")
    return env


# --- statistics --------------------------------------------------------------------------------


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile of ``samples`` (q in 0..100)."""
    if not samples:
        return float("nan")
    s = sorted(samples)
    k = max(0, min(len(s) - 1, int(round(q / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


def summary_us(samples_ns: list[int]) -> dict[str, float]:
    us = [x / 1000.0 for x in samples_ns]
    return {
        "p50": round(percentile(us, 50), 1),
        "p90": round(percentile(us, 90), 1),
        "p99": round(percentile(us, 99), 1),
        "mean": round(statistics.fmean(us), 1),
    }


def ratio(a: float, b: float, digits: int = 2) -> float:
    return round(a / b, digits) if b else float("nan")


# --- TOML config -------------------------------------------------------------------------------


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot render {v!r} as TOML")


def render_config(kernel: Mapping[str, Any], services: Mapping[str, Mapping[str, Any]]) -> str:
    lines = ["[kernel]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in kernel.items()]
    for name, spec in services.items():
        lines.append("")
        lines.append(f"[services.{name}]")
        config = spec.get("config")
        lines += [f"{k} = {_toml_value(v)}" for k, v in spec.items() if k != "config"]
        if config:
            lines.append(f"[services.{name}.config]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in config.items()]
    return "\n".join(lines) + "\n"


# --- the daemon --------------------------------------------------------------------------------


class Daemon:
    """``python -m microkernel --config FILE`` in a fresh short runtime dir; a context manager.

    ``start()`` returns once the daemon logged "microkernel ready" (its sockets are bound).
    The daemon's stderr (and its children's) goes to ``<tmp>/daemon.log`` through a reader
    thread, so a chatty child can never block on a full pipe.
    """

    def __init__(
        self,
        services: Mapping[str, Mapping[str, Any]],
        *,
        kernel: Mapping[str, Any] | None = None,
        log_level: str = "info",
        ready_timeout: float = 30.0,
    ) -> None:
        self.tmp = short_tmp()
        self.runtime_dir = os.path.join(self.tmp, "r")
        settings = {"runtime_dir": self.runtime_dir, "log_level": log_level, "heartbeat_interval": "1s"}
        settings.update(kernel or {})
        self.config_path = os.path.join(self.tmp, "kernel.toml")
        with open(self.config_path, "w") as f:
            f.write(render_config(settings, services))
        self.log_path = os.path.join(self.tmp, "daemon.log")
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None
        self.control = f"ipc://{self.runtime_dir}/control.sock"
        self.events = f"ipc://{self.runtime_dir}/events.sock"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        with open(self.log_path, "wb") as out:
            for line in self.proc.stderr:
                out.write(line)
                out.flush()
                if not self._ready.is_set() and READY_LINE.encode() in line:
                    self._ready.set()
        self._ready.set()  # EOF: the daemon died; start() checks returncode

    def start(self) -> "Daemon":
        env = with_bytecode_cache(dict(os.environ), self.tmp)
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.pop("NOTIFY_SOCKET", None)
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "microkernel", "--config", self.config_path],
            cwd=str(REPO),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: the tear-down can kill the whole tree
        )
        self._reader = threading.Thread(target=self._pump, name="daemon-log", daemon=True)
        self._reader.start()
        if not self._ready.wait(self.ready_timeout) or self.proc.poll() is not None:
            tail = self.log_tail()
            self.stop()
            raise RuntimeError(f"the daemon did not become ready:\n{tail}")
        return self

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return b"".join(f.readlines()[-lines:]).decode("utf-8", "replace")
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (orderly shutdown of every service), SIGKILL of the group after ``timeout``."""
        proc = self.proc
        code = None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"daemon {proc.pid} did not stop within {timeout:g}s: killing its process group")
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # stragglers in the daemon's session, if any
            except ProcessLookupError:
                pass
            if code is None:
                code = proc.wait()
            if self._reader is not None:
                self._reader.join(5)
        shutil.rmtree(self.tmp, ignore_errors=True)
        return code

    def __enter__(self) -> "Daemon":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- helper subprocesses -----------------------------------------------------------------------


class Helper:
    """A helper process (``python bench/raw.py serve ...``) that prints one line when ready."""

    def __init__(self, args: Iterable[str]) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen(
            [PYTHON, *args], cwd=str(REPO), env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # blocks until the helper has bound its socket
        if not line:
            self.proc.wait()
            raise RuntimeError(f"helper {list(args)} exited with {self.proc.returncode} before it was ready")
        self.ready_line = line.decode().strip()

    def read_line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().decode().strip()

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()  # helpers exit when their stdin closes
            except OSError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "Helper":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def now_ns() -> int:
    return time.perf_counter_ns()
