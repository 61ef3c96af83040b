"""The daemon's own logs: JSON or text, to a file that SIGUSR1 reopens (logrotate's move-then-signal)."""

from __future__ import annotations

import json
import logging
import re
import signal
import sys
import time
from pathlib import Path

from microkernel.client import Client
from microkernel.logsetup import JsonFormatter
from tests.integration.sd_notify import CEILING, run_daemon

SERVICE = '[services.w]\nentry = "tests.fixtures.echo:Echo"\n'
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")


def json_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def wait_for_file(c: Client, path: Path) -> None:
    """Until ``path`` exists: each round trip gives the daemon's loop a turn (no sleeping)."""
    deadline = time.monotonic() + CEILING
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {CEILING:g}s"
        c.ping()


def test_json_log_file_and_reopen_after_rotation(short_tmp: str) -> None:
    log_file = Path(short_tmp) / "kernel.log"
    config = f'[kernel]\nlog_format = "json"\nlog_file = "{log_file}"\n\n{SERVICE}'
    with run_daemon(short_tmp, config) as d, Client(runtime_dir=d.runtime_dir) as c:
        entries = json_lines(log_file)
        assert all(set(e) >= {"ts", "level", "logger", "msg"} for e in entries)
        assert any(e["logger"] == "microkernel.kernel" and str(e["msg"]).startswith("microkernel ready")
                   for e in entries)
        assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(e["ts"])) for e in entries)
        # The daemon's lines went to the file, not to its stderr (the service's own lines still do).
        assert "microkernel ready" not in d.output.read_text()

        rotated = log_file.with_suffix(".log.1")
        log_file.rename(rotated)
        d.proc.send_signal(signal.SIGUSR1)
        wait_for_file(c, log_file)
        c.stop("w")  # logs the replica's exit
        c.start("w")
        new = json_lines(log_file)
        assert any(e["msg"] == f"reopened the log file {log_file}" for e in new)
        assert any(str(e["msg"]).startswith("w[0] (pid") and "exited: stopped" in str(e["msg"]) for e in new)
        assert not any("exited: stopped" in str(e["msg"]) for e in json_lines(rotated))
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(timeout=CEILING) == 0
    assert json_lines(log_file)[-1]["msg"] == "microkernel stopped"


def test_command_line_overrides_the_configured_format_and_file(short_tmp: str) -> None:
    configured = Path(short_tmp) / "configured.log"
    chosen = Path(short_tmp) / "chosen.log"
    config = f'[kernel]\nlog_format = "json"\nlog_file = "{configured}"\n\n{SERVICE}'
    with run_daemon(short_tmp, config, "--log-format", "text", "--log-file", str(chosen)) as d:
        assert not configured.exists()
        lines = chosen.read_text().splitlines()
        assert lines and all(TEXT_LINE.match(line) for line in lines)
        # A reload keeps the command line's choice over the file's.
        with Client(runtime_dir=d.runtime_dir) as c:
            assert c.reload()["warnings"] == []
        assert not configured.exists()


def test_sigusr1_without_a_log_file_is_harmless(short_tmp: str) -> None:
    with run_daemon(short_tmp, SERVICE) as d, Client(runtime_dir=d.runtime_dir) as c:
        d.proc.send_signal(signal.SIGUSR1)
        assert c.ping()["pid"] == d.proc.pid
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(timeout=CEILING) == 0
    assert "SIGUSR1: logging to stderr, no log file to reopen" in d.output.read_text()


def test_json_lines_carry_the_exception() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("microkernel.x", logging.ERROR, __file__, 1, "failed: %s", ("it",), sys.exc_info())
    entry = json.loads(JsonFormatter().format(record))
    assert entry["level"] == "error" and entry["logger"] == "microkernel.x" and entry["msg"] == "failed: it"
    assert "ValueError: boom" in entry["exc"]
