"""Replica output capture and ``mkctl logs`` end to end: a real daemon, real replicas, real files.

Every wait is on a kernel event, a reply, a line read from a process, or a process exit, with a
generous ceiling.
"""

from __future__ import annotations

import json
import queue
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from microkernel.client import Client
from protocols.errors import ErrorCode, MicrokernelError
from tests.integration.conftest import REPO_ROOT, kernel_env, start_kernel
from tests.integration.test_supervisor import CEILING, is_event, wait_event

PY = json.dumps(sys.executable)

TALK = r"""
import os, sys
print("hello out", flush=True)
print("hello err", file=sys.stderr, flush=True)
print("x" * 100_000, flush=True)
sys.stdout.buffer.write(b"binary \xff\xfe garbage\n")
sys.stdout.write("bye without newline")
"""

COUNTER = r"""
import os, signal
inc = os.environ["MK_INCARNATION"]
for i in range(int(os.environ.get("LINES", "200"))):
    print(f"inc {inc} line {i:04d}", flush=True)
signal.pause()  # stay up, printing nothing more, until the kernel stops or kills it
"""


def command_service(name: str, script: str, extra: str = "") -> str:
    return f"""
[services.{name}]
command = [{PY}, "-c", {json.dumps(script)}]
ready = "spawn"
{extra}
"""


def mkctl(runtime_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "microkernel.cli", "--runtime-dir", str(runtime_dir), *args],
                          cwd=REPO_ROOT, env=kernel_env(), capture_output=True, text=True, timeout=CEILING)


def test_output_is_captured_line_aware_into_a_private_file_and_shown_by_mkctl_logs(short_tmp: str) -> None:
    config = "[logs]\nbackups = 2\n" + command_service("talk", TALK, 'restart = "temporary"')
    with start_kernel(config, short_tmp) as k, Client(runtime_dir=k.runtime_dir, timeout=CEILING) as c:
        with c.events("service.exited", since_seq=0) as stream:
            wait_event(stream, is_event("service.exited", "talk"))
        logs_dir = k.runtime_dir / "logs"
        assert stat.S_IMODE(logs_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE((logs_dir / "talk.log").stat().st_mode) == 0o600

        shown = mkctl(k.runtime_dir, "logs", "talk", "-n", "20")
        assert shown.returncode == 0, shown.stderr
        records = [line.split(" ", 3) for line in shown.stdout.splitlines()]
        assert all(r[1] == "0" and r[2] in ("out", "err") for r in records)
        texts = [(r[2], r[3] if len(r) > 3 else "") for r in records]
        assert ("out", "hello out") in texts and ("err", "hello err") in texts
        # The 100,000-byte line is cut into records of at most 64 KiB; nothing is lost.
        xs = [t for s, t in texts if set(t) == {"x"}]
        assert [len(t) for t in xs] == [65536, 100_000 - 65536]
        assert ("out", "binary \ufffd\ufffd garbage") in texts
        assert texts[-1] == ("out", "bye without newline")  # the partial last line, flushed at exit

        assert mkctl(k.runtime_dir, "logs", "talk", "-n", "1").stdout.endswith("0 out bye without newline\n")
        missing = mkctl(k.runtime_dir, "logs", "nope")
        assert missing.returncode == 1
        assert "unknown_service" in missing.stderr and "talk" in missing.stderr
        for bad in (dict(lines=-1), dict(lines=10**6), dict(replica=-2), dict(wait_s=-1.0),
                    dict(cursor={"dev": "x", "ino": 1, "offset": 0}), dict(cursor={"offset": -5})):
            with pytest.raises(MicrokernelError) as info:
                c.logs("talk", **bad)
            assert info.value.code is ErrorCode.INVALID_FIELD, bad
        assert c.logs("talk", 2, replica=1)["lines"] == []  # a replica that never wrote


def test_a_grandchild_holding_the_pipes_does_not_hide_the_exit(short_tmp: str) -> None:
    script = "sleep 1000 & echo started; exit 3"
    config = f"""
[services.shell]
command = ["sh", "-c", {json.dumps(script)}]
ready = "spawn"
restart = "temporary"
"""
    with start_kernel(config, short_tmp) as k, Client(runtime_dir=k.runtime_dir, timeout=CEILING) as c:
        with c.events("service.exited", since_seq=0) as stream:
            env = wait_event(stream, is_event("service.exited", "shell"))
        assert env.message.reason["code"] == 3
        assert [line.split(" ", 3)[1:] for line in c.logs("shell")["lines"]] == [["0", "out", "started"]]


def _read_lines(stream, into: queue.Queue[str | None]) -> None:
    for line in iter(stream.readline, ""):
        into.put(line.rstrip("\n"))
    into.put(None)


def _next_matching(lines: queue.Queue[str | None], prefix: str) -> str:
    while True:
        line = lines.get(timeout=CEILING)
        assert line is not None, "mkctl logs -f ended"
        if line.split(" ", 3)[-1].startswith(prefix):
            return line


def test_follow_sees_every_new_record_across_restarts_and_rotation(short_tmp: str) -> None:
    # 8 KiB files: each incarnation's 200 records (about 9 KiB) rotate the file at least once.
    config = "[logs]\nmax_bytes = \"8KiB\"\nbackups = 3\n" + command_service("count", COUNTER)
    with start_kernel(config, short_tmp) as k, Client(runtime_dir=k.runtime_dir, timeout=CEILING) as c:
        follower = subprocess.Popen(
            [sys.executable, "-m", "microkernel.cli", "--runtime-dir", str(k.runtime_dir), "logs", "count", "-f", "-n", "5"],
            cwd=REPO_ROOT, env=kernel_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_read_lines, args=(follower.stdout, lines), daemon=True).start()
        try:
            _next_matching(lines, "inc 1 line 0199")  # the first incarnation printed everything
            c.restart("count")
            first = _next_matching(lines, "inc 2 ")
            seen = [first]
            while not seen[-1].endswith("inc 2 line 0199"):
                line = lines.get(timeout=CEILING)
                assert line is not None, "mkctl logs -f ended"
                seen.append(line)
            assert [line.rsplit(" ", 1)[1] for line in seen] == [f"{i:04d}" for i in range(200)]
            assert (k.runtime_dir / "logs" / "count.log.1").exists()  # it did rotate meanwhile
        finally:
            follower.send_signal(signal.SIGINT)
            assert follower.wait(timeout=CEILING) == 0, follower.stderr.read() if follower.stderr else ""


def test_a_warm_standby_logs_into_the_service_it_becomes(short_tmp: str) -> None:
    config = """
[services.echo]
entry = "tests.fixtures.echo:Echo"
"""
    with start_kernel(config, short_tmp) as k, Client(runtime_dir=k.runtime_dir, timeout=CEILING) as c:
        c.wait_ready("echo", timeout=CEILING)
        with c.events("standby.ready", since_seq=0) as stream:  # until the runner waiting now is ready
            while wait_event(stream, is_event("standby.ready")).message.pid != c.status()["kernel"]["standby"]["pid"]:
                pass
        taken = c.status()["kernel"]["standby"]["taken"]
        first = c.logs("echo", 100)
        c.restart("echo")  # the waiting standby becomes incarnation 2
        assert c.status()["kernel"]["standby"]["taken"] == taken + 1
        # Follow with the cursor (long poll) until the new incarnation's set-up line is in.
        cursor, new = first["cursor"], []
        deadline = time.monotonic() + CEILING
        while not any("echo setup done" in line for line in new):
            assert time.monotonic() < deadline, f"no set-up line from incarnation 2 in {new}"
            reply = c.logs("echo", cursor=cursor, wait_s=5.0)
            new += reply["lines"]
            cursor = reply["cursor"]
        setup = [line for line in new if "echo setup done" in line]
        assert [line.split(" ", 3)[1:3] for line in setup] == [["0", "err"]]
        assert not any(line.split(" ", 3)[1] == "-" for line in new)


def test_a_waiting_follow_request_is_answered_when_records_are_written(short_tmp: str) -> None:
    config = command_service("count", COUNTER, 'env = { LINES = "3" }')
    with start_kernel(config, short_tmp) as k, Client(runtime_dir=k.runtime_dir, timeout=CEILING) as c:
        with c.events("service.ready", since_seq=0) as stream:
            wait_event(stream, is_event("service.ready", "count"))
        # The first incarnation's lines may still be arriving ("ready" is its spawn): follow until
        # its last one is there, so that what the waiting request gets next is the restart's.
        reply = c.logs("count", 1000)
        seen = [line.split(" ", 3)[3] for line in reply["lines"]]
        cursor = reply["cursor"]
        while "inc 1 line 0002" not in seen:
            reply = c.logs("count", cursor=cursor, wait_s=CEILING)
            assert reply["lines"], f"the first incarnation's last line did not come within {CEILING}s: {seen}"
            seen += [line.split(" ", 3)[3] for line in reply["lines"]]
            cursor = reply["cursor"]
        answers: queue.Queue[dict] = queue.Queue()

        def follow() -> None:
            with Client(runtime_dir=k.runtime_dir, timeout=CEILING) as other:
                answers.put(other.logs("count", cursor=cursor, wait_s=25.0))

        waiter = threading.Thread(target=follow, daemon=True)
        waiter.start()
        c.restart("count")
        # The kernel holds the request (wait_s 25 s) and must answer it with the new records as
        # they are written; an unwoken wait would end in an empty reply.
        reply = answers.get(timeout=CEILING)
        waiter.join(timeout=CEILING)
        assert reply["lines"] and reply["lines"][0].split(" ", 3)[3] == "inc 2 line 0000"
