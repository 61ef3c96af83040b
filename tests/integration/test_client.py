"""The Python client and ``mkctl`` against a real microkerneld with real services.

Waits are on replies and events (``wait_ready``, event streams, the daemon's "ready" line), with
timeouts only as ceilings. The tests that need no daemon check that a missing kernel is
reported quickly and clearly.
"""

from __future__ import annotations

import asyncio
import json
import selectors
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import uvloop

from protocols.endpoints import ENDPOINT_ENV
from protocols.errors import CallTimeout, ErrorCode, MicrokernelError, RemoteError

from microkernel.client import AsyncClient, Client, KernelUnavailable, ServiceFailed
from tests.integration.conftest import REPO_ROOT, KernelHandle, kernel_env

CEILING = 30.0
FAST = 1.0  # "quickly": a missing kernel must be reported well within a second

needs_daemon = pytest.mark.skipif(
    not (REPO_ROOT / "microkernel" / "daemon.py").exists(),
    reason="microkernel/daemon.py is not written yet (remove this skip once the daemon lands)",
)

ECHO_CONFIG = """
# Heartbeats are not under test here: be lenient so a loaded CI box never kills a replica.
[kernel]
heartbeat_interval = "1s"
heartbeat_liveness = 10

[services.echo]
entry = "tests.fixtures.echo:Echo"
replicas = 2
restart = "permanent"
stop_timeout = "5s"

# Never announces readiness and exits at once: fails after one restart.
[services.crashy]
command = ["sh", "-c", "exit 3"]
ready = "message"
heartbeat = false
autostart = false
intensity = 1
period = "60s"

[services.crashy.backoff]
initial = "10ms"
max = "10ms"
"""


@pytest.fixture
def kernel_config() -> str:
    return ECHO_CONFIG


def mkctl(handle: KernelHandle | str | Path, *args: str, timeout: float = CEILING) -> subprocess.CompletedProcess[str]:
    """Run ``python -m microkernel.cli --runtime-dir … ARGS`` and capture its output."""
    runtime_dir = handle.runtime_dir if isinstance(handle, KernelHandle) else handle
    return subprocess.run(
        [sys.executable, "-m", "microkernel.cli", "--runtime-dir", str(runtime_dir), *args],
        cwd=REPO_ROOT, env=kernel_env(), capture_output=True, text=True, timeout=timeout,
    )


def run_async(coro):  # noqa: ANN001, ANN201 - a test helper
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def live_pids(entry: dict) -> set[int]:
    return {r["pid"] for r in entry["replicas"] if r.get("pid") and r["state"] == "ready"}


# --- no daemon -----------------------------------------------------------------------------------


def test_client_without_kernel_fails_fast(short_tmp: str) -> None:
    started = time.monotonic()
    with pytest.raises(KernelUnavailable) as info:
        Client(runtime_dir=short_tmp)
    assert time.monotonic() - started < FAST
    assert info.value.code is ErrorCode.UNAVAILABLE
    assert "is microkerneld running?" in info.value.reason
    assert f"{short_tmp}/control.sock" in info.value.reason
    assert info.value.endpoint == f"ipc://{short_tmp}/control.sock"


def test_stale_socket_is_reported_fast(short_tmp: str) -> None:
    # What a crashed kernel leaves behind: a socket file nobody listens on.
    path = f"{short_tmp}/control.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.close()
    started = time.monotonic()
    with pytest.raises(KernelUnavailable, match="nothing listens"):
        Client(runtime_dir=short_tmp)
    assert time.monotonic() - started < FAST


def test_endpoint_from_environment(short_tmp: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENDPOINT_ENV, f"ipc://{short_tmp}/elsewhere.sock")
    with pytest.raises(KernelUnavailable, match="elsewhere.sock"):
        Client()


def test_tcp_kernel_that_never_answers_is_unavailable() -> None:
    # Nothing to stat for tcp: the first request's timeout decides, and says so.
    with Client("tcp://127.0.0.1:9", timeout=0.2) as client:  # port 9 (discard): nobody listens
        with pytest.raises(KernelUnavailable, match="no reply from microkerneld"):
            client.status()


def test_async_client_without_kernel_fails_fast(short_tmp: str) -> None:
    async def main() -> None:
        with pytest.raises(KernelUnavailable, match="no socket at"):
            async with AsyncClient(runtime_dir=short_tmp) as client:
                await client.ping()

    run_async(main())


def test_mkctl_without_kernel_exits_3(short_tmp: str) -> None:
    result = mkctl(short_tmp, "status")
    assert result.returncode == 3, result.stderr
    assert f"{short_tmp}/control.sock" in result.stderr
    assert "microkerneld --config" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_mkctl_usage_error_exits_2(short_tmp: str) -> None:
    result = mkctl(short_tmp, "call", "echo", "echo", "not json")
    assert result.returncode == 2
    assert "JSON_ARGS" in result.stderr and "Traceback" not in result.stderr


# --- the Python client against a kernel ------------------------------------------------------------


@needs_daemon
def test_status_list_lookup_and_calls(kernel: KernelHandle) -> None:
    with Client(runtime_dir=kernel.runtime_dir, name="test") as client:
        entry = client.wait_ready("echo", timeout=CEILING)
        assert entry["ready_replicas"] == entry["desired_replicas"] == 2

        assert client.ping()["pid"] == kernel.proc.pid
        status = client.status()
        assert status["kernel"]["pid"] == kernel.proc.pid
        assert {s["name"] for s in status["services"]} == {"echo", "crashy"}
        only = client.status("echo")["services"]
        assert [s["name"] for s in only] == ["echo"]
        assert len(only[0]["replicas"]) == 2
        # Brief: the same states and counts, nothing per replica.
        brief = client.status(brief=True)
        assert brief["kernel"]["pid"] == kernel.proc.pid
        assert "resources" not in brief["kernel"]
        full_view = {s["name"]: (s["state"], s["ready_replicas"], s["desired_replicas"], s["restarts"])
                     for s in client.status()["services"]}
        assert {s["name"]: (s["state"], s["ready_replicas"], s["desired_replicas"], s["restarts"])
                for s in brief["services"]} == full_view
        assert all(set(s) == {"name", "state", "ready_replicas", "desired_replicas", "restarts"} for s in brief["services"])
        assert [s["name"] for s in client.status("echo", brief=True)["services"]] == ["echo"]
        with pytest.raises(RemoteError) as info:
            client.status("nope", brief=True)
        assert info.value.code is ErrorCode.UNKNOWN_SERVICE

        specs = {s["name"]: s for s in client.list()}
        assert specs["echo"]["entry"] == "tests.fixtures.echo:Echo"
        assert specs["crashy"]["autostart"] is False

        where = client.lookup("echo")
        assert where["ready"] == 2 and len(where["endpoints"]) == 2
        assert "echo" in where["methods"]

        result = client.call("echo", "echo", text="hi")
        assert result["text"] == "hi" and result["service"] == "echo"
        assert result["replica"] in (0, 1)

        with pytest.raises(RemoteError) as info:
            client.call("echo", "no_such_method")
        assert info.value.code is ErrorCode.UNKNOWN_METHOD
        with pytest.raises(RemoteError) as info:
            client.call("nope", "echo", text="x")
        assert info.value.code is ErrorCode.UNKNOWN_SERVICE
        with pytest.raises(RemoteError) as info:
            client.status("nope")
        assert info.value.code is ErrorCode.UNKNOWN_SERVICE


def test_call_many_pipelines_calls_and_yields_results_in_order(kernel: KernelHandle) -> None:
    with Client(runtime_dir=kernel.runtime_dir, name="test") as client:
        client.wait_ready("echo", timeout=CEILING)
        # Both replicas reachable from this client first: the data-plane socket connects with
        # ZMQ_IMMEDIATE, so a replica takes requests only once its connection is up, and until
        # then every request goes to the other one.
        seen: set[int] = set()
        deadline = time.monotonic() + CEILING
        while seen != {0, 1} and time.monotonic() < deadline:
            seen.add(client.call("echo", "echo", text="warm-up")["replica"])
        assert seen == {0, 1}
        texts = [f"t{i}" for i in range(300)]
        consumed: list[str] = []

        def calls():  # noqa: ANN202 - a generator of argument maps
            for t in texts:
                consumed.append(t)
                yield {"text": t}

        results = client.call_many("echo", "echo", calls(), window=8)
        first = next(results)
        assert first["text"] == "t0" and len(consumed) == 8  # read lazily: one window ahead
        rest = list(results)
        assert [r["text"] for r in [first, *rest]] == texts
        assert {r["replica"] for r in rest} == {0, 1}  # spread over both replicas

        # Replies that come out of order (the first sleeps) are still yielded in call order.
        assert list(client.call_many("echo", "sleep", [{"seconds": 0.3}, {"seconds": 0}, {"seconds": 0}])) == [0.3, 0, 0]
        assert list(client.call_many("echo", "echo", [])) == []

        # A failed call raises at its turn, after the earlier results; the client stays usable.
        results = client.call_many("echo", "echo", [{"text": "a"}, {"text": "b"}, {"nope": 1}, {"text": "d"}])
        assert [next(results)["text"], next(results)["text"]] == ["a", "b"]
        with pytest.raises(RemoteError) as info:
            next(results)
        assert info.value.code is ErrorCode.INVALID_FIELD
        assert client.call("echo", "echo", text="after")["text"] == "after"  # "d"'s reply is skipped

        # Past its timeout: the client gives up, or the replica answers deadline_exceeded first.
        with pytest.raises(MicrokernelError) as info:
            list(client.call_many("echo", "sleep", [{"seconds": 0}, {"seconds": 5}], timeout=0.5))
        assert info.value.code in (ErrorCode.TIMEOUT, ErrorCode.DEADLINE_EXCEEDED)
        with pytest.raises(RemoteError) as info:
            list(client.call_many("nope", "echo", [{"text": "x"}]))
        assert info.value.code is ErrorCode.UNKNOWN_SERVICE
        with pytest.raises(ValueError):
            client.call_many("echo", "echo", [{"text": "x"}], window=0)


@needs_daemon
def test_one_client_per_thread(kernel: KernelHandle) -> None:
    with Client(runtime_dir=kernel.runtime_dir) as client:
        client.wait_ready("echo", timeout=CEILING)

    def worker(n: int) -> list[str]:
        with Client(runtime_dir=kernel.runtime_dir, name=f"thread-{n}") as own:
            own.status()
            return [own.call("echo", "echo", text=f"{n}-{i}")["text"] for i in range(20)]

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(worker, range(4)))
    assert results == [[f"{n}-{i}" for i in range(20)] for n in range(4)]


@needs_daemon
def test_lifecycle_scale_stop_start_restart(kernel: KernelHandle) -> None:
    with Client(runtime_dir=kernel.runtime_dir) as client:
        before = live_pids(client.wait_ready("echo", timeout=CEILING))

        assert client.scale("echo", 3) == {"service": "echo", "replicas": 3, "previous": 2}
        entry = client.wait_ready("echo", timeout=CEILING)
        assert entry["ready_replicas"] == 3
        assert before <= live_pids(entry)  # scaling up leaves the running replicas alone

        assert client.scale("echo", 1)["previous"] == 3
        assert client.wait_ready("echo", timeout=CEILING)["desired_replicas"] == 1

        assert client.stop("echo")["state"] == "stopped"
        stopped = client.status("echo")["services"][0]
        assert stopped["state"] == "stopped" and stopped["ready_replicas"] == 0
        with pytest.raises(RemoteError) as info:
            client.call("echo", "echo", text="x")
        assert info.value.code is ErrorCode.NOT_READY

        assert client.start("echo")["state"] == "ready"
        first = live_pids(client.wait_ready("echo", timeout=CEILING))
        assert client.restart("echo")["state"] == "ready"
        second = live_pids(client.wait_ready("echo", timeout=CEILING))
        assert first and second and not first & second  # every replica is a new process
        assert client.call("echo", "echo", text="back")["text"] == "back"


@needs_daemon
def test_wait_ready_after_start_without_wait(kernel: KernelHandle) -> None:
    with Client(runtime_dir=kernel.runtime_dir) as client:
        client.wait_ready("echo", timeout=CEILING)
        client.stop("echo")
        assert client.start("echo", wait=False)["service"] == "echo"
        entry = client.wait_ready("echo", timeout=CEILING)
        assert entry["ready_replicas"] == entry["desired_replicas"] == 2


@needs_daemon
def test_wait_ready_reports_failure_and_timeout(kernel: KernelHandle) -> None:
    with Client(runtime_dir=kernel.runtime_dir) as client:
        client.start("crashy", wait=False)
        with pytest.raises(ServiceFailed) as info:
            client.wait_ready("crashy", timeout=CEILING)
        assert "crashy" in str(info.value) and "exit(3)" in str(info.value)

        client.stop("echo")
        started = time.monotonic()
        with pytest.raises(CallTimeout, match="not ready within 0.3s"):
            client.wait_ready("echo", timeout=0.3)  # a stopped service never gets ready by itself
        assert time.monotonic() - started < CEILING


@needs_daemon
def test_events_live_then_replay_without_duplicates(kernel: KernelHandle) -> None:
    with Client(runtime_dir=kernel.runtime_dir) as client:
        client.wait_ready("echo", timeout=CEILING)
        with client.events("service.*") as live:
            client.restart("echo", wait=False)
            seen = []
            ready = 0
            while ready < 2:
                env = live.next_event(CEILING)
                assert env is not None, f"no service.ready within {CEILING}s; saw {[e.topic for e in seen]}"
                seen.append(env)
                ready += env.topic == "service.ready" and env.message.service == "echo"
        topics = [e.topic for e in seen]
        assert "service.exited" in topics and topics.index("service.exited") < topics.index("service.ready")
        exited = next(e for e in seen if e.topic == "service.exited")
        assert exited.message.reason["kind"] == "stopped"
        seqs = [e.message.seq for e in seen]
        assert seqs == sorted(set(seqs))

        # Replay from the first of those: the history first, then live, each seq exactly once.
        with client.events("service.*", since_seq=seqs[0]) as replay:
            client.restart("echo", wait=False)
            replayed = []
            ready_after_restart = 0
            while ready_after_restart < 2:
                env = replay.next_event(CEILING)
                assert env is not None
                replayed.append(env)
                if env.message.seq > seqs[-1] and env.topic == "service.ready":
                    ready_after_restart += 1
        replayed_seqs = [e.message.seq for e in replayed]
        assert replayed_seqs == sorted(set(replayed_seqs)), "duplicate or out-of-order events"
        assert replayed_seqs[: len(seqs)] == seqs
        assert [e.topic for e in replayed[: len(seen)]] == topics


@needs_daemon
def test_async_client(kernel: KernelHandle) -> None:
    async def main() -> None:
        async with AsyncClient(runtime_dir=kernel.runtime_dir) as client:
            entry = await client.wait_ready("echo", timeout=CEILING)
            assert entry["ready_replicas"] == 2
            assert (await client.ping())["pid"] == kernel.proc.pid
            assert [s["name"] for s in (await client.status("echo"))["services"]] == ["echo"]
            assert {s["name"] for s in await client.list()} == {"echo", "crashy"}
            assert (await client.lookup("echo"))["ready"] == 2
            assert (await client.call("echo", "echo", text="async"))["text"] == "async"
            with pytest.raises(RemoteError) as info:
                await client.call("echo", "no_such_method")
            assert info.value.code is ErrorCode.UNKNOWN_METHOD

            async with client.events("service.ready", "service.exited") as stream:
                await client.restart("echo", wait=False)
                topics = []
                async with asyncio.timeout(CEILING):
                    async for env in stream:
                        topics.append(env.topic)
                        if topics.count("service.ready") == 2:
                            break
            assert topics[0] == "service.exited"
            await client.wait_ready("echo", timeout=CEILING)
            assert (await client.scale("echo", 1))["previous"] == 2

    run_async(main())


# --- mkctl end to end ---------------------------------------------------------------------------


@needs_daemon
def test_mkctl_commands(kernel: KernelHandle) -> None:
    with Client(runtime_dir=kernel.runtime_dir) as client:
        client.wait_ready("echo", timeout=CEILING)

    result = mkctl(kernel, "status")
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.split("\n\n", 1)[1].splitlines()
    assert header.split() == ["NAME", "STATE", "READY", "RESTARTS", "PID(S)", "UPTIME", "LAST-EXIT"]
    echo_row = next(r.split() for r in rows if r.startswith("echo "))
    assert echo_row[1:3] == ["ready", "2/2"]

    detail = mkctl(kernel, "status", "echo")
    assert detail.returncode == 0 and "REPLICA" in detail.stdout

    brief = mkctl(kernel, "status", "--brief")
    assert brief.returncode == 0, brief.stderr
    header, *rows = brief.stdout.split("\n\n", 1)[1].splitlines()
    assert header.split() == ["NAME", "STATE", "READY", "RESTARTS"]
    assert next(r.split() for r in rows if r.startswith("echo "))[1:3] == ["ready", "2/2"]

    as_json = mkctl(kernel, "--json", "status")
    assert as_json.returncode == 0
    document = json.loads(as_json.stdout)
    assert document["kernel"]["pid"] == kernel.proc.pid
    assert {s["name"] for s in document["services"]} == {"echo", "crashy"}

    called = mkctl(kernel, "call", "echo", "echo", '{"text": "hi"}')
    assert called.returncode == 0, called.stderr
    assert json.loads(called.stdout)["text"] == "hi"

    missing = mkctl(kernel, "call", "nope", "echo")
    assert missing.returncode == 1
    assert missing.stderr.startswith("mkctl: error: unknown_service: ")
    assert "Traceback" not in missing.stderr

    for args in (("list",), ("lookup", "echo"), ("ping",), ("--json", "lookup", "echo")):
        done = mkctl(kernel, *args)
        assert done.returncode == 0, (args, done.stderr)

    assert mkctl(kernel, "scale", "echo", "1").stdout.strip() == "echo: 2 -> 1 replicas"
    assert mkctl(kernel, "stop", "echo").stdout.strip() == "echo: stopped"
    assert mkctl(kernel, "start", "echo").stdout.strip() == "echo: ready"


@needs_daemon
def test_mkctl_events_follow_a_restart(kernel: KernelHandle) -> None:
    with Client(runtime_dir=kernel.runtime_dir) as client:
        client.wait_ready("echo", timeout=CEILING)
        proc = subprocess.Popen(
            [sys.executable, "-m", "microkernel.cli", "--runtime-dir", str(kernel.runtime_dir),
             "events", "-n", "2", "service.exited", "service.ready"],
            cwd=REPO_ROOT, env=kernel_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            _await_follow_notice(proc)  # only restart once mkctl's subscription is live
            client.restart("echo", wait=False)
            out, err = proc.communicate(timeout=CEILING)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 2
    for line in lines:
        clock, topic, subject, *fields = line.split()
        assert len(clock) == len("12:00:01.123") and topic in ("service.exited", "service.ready")
        assert subject.startswith("echo[")
        assert any(f.startswith("seq=") for f in fields)


def _await_follow_notice(proc: subprocess.Popen[str]) -> None:
    """Wait (ceiling CEILING) for mkctl's 'following …' line: its subscription is then live."""
    assert proc.stderr is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stderr, selectors.EVENT_READ)
        assert selector.select(CEILING), "mkctl events never reported its subscription"
    notice = proc.stderr.readline()
    assert notice.startswith("mkctl: following"), notice


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@needs_daemon
def test_mkctl_events_ctrl_c_exits_0(kernel: KernelHandle) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "microkernel.cli", "--runtime-dir", str(kernel.runtime_dir), "events"],
        cwd=REPO_ROOT, env=kernel_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # As on a terminal: a test run started in the background (`cmd &` in a script) ignores
        # SIGINT, and an ignored SIGINT is inherited (Python then keeps ignoring it, as it should).
        preexec_fn=_default_sigint,
    )
    try:
        _await_follow_notice(proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=CEILING)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert err == ""  # no traceback


@needs_daemon
def test_mkctl_json_events_replay_history(kernel: KernelHandle) -> None:
    result = mkctl(kernel, "--json", "events", "--since", "0", "-n", "2")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["topic"] for r in records][0] == "kernel.started"
    assert records[0]["seq"] < records[1]["seq"]
    assert records[0]["data"]["pid"] == kernel.proc.pid


@needs_daemon
def test_mkctl_shutdown_stops_the_daemon(kernel: KernelHandle) -> None:
    result = mkctl(kernel, "shutdown")
    assert result.returncode == 0, result.stderr
    assert "shutting down" in result.stdout
    assert kernel.proc.wait(timeout=CEILING) == 0
    after = mkctl(kernel, "ping")
    assert after.returncode == 3
