"""The service SDK and runner against a stand-in kernel made of real sockets.

The daemon is not involved: each test binds the kernel's three sockets itself (control ROUTER,
event XSUB/XPUB answering the welcome handshake, see ``stand_in_kernel``), starts
``python -m services.runner`` with the ``MK_*`` environment pointing at them and talks to the
replica over real ipc sockets. Every wait is a poll with a ceiling; nothing sleeps.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from protocols import messages, wire
from protocols.errors import ErrorCode
from tests.integration.stand_in_kernel import CEILING, REPO, Caller, Child, FakeKernel, make_ready, runner_env, spawn

# --- a shared echo replica for the RPC tests ------------------------------------------------------


@dataclass
class Running:
    kernel: FakeKernel
    child: Child
    ready: messages.ReadyRequest
    caller: Caller


@pytest.fixture(scope="module")
def echo() -> Iterator[Running]:
    runtime_dir = tempfile.mkdtemp(prefix="mk-", dir="/tmp")
    kernel = FakeKernel(runtime_dir)
    child = spawn(kernel, "tests.fixtures.echo:Echo", "echo", heartbeat=0.5, config={"greeting": "hi"})
    caller = None
    try:
        ready = make_ready(kernel, child)
        caller = Caller(kernel.ctx, child.endpoint)
        yield Running(kernel, child, ready, caller)
    finally:
        child.kill()
        if caller is not None:
            caller.close()
        kernel.close()
        shutil.rmtree(runtime_dir, ignore_errors=True)


def test_ready_request_describes_the_replica(echo: Running) -> None:
    ready = echo.ready
    assert (ready.service, ready.replica, ready.incarnation) == ("echo", 0, 1)
    assert ready.endpoint == echo.child.endpoint
    assert ready.pid == echo.child.proc.pid
    assert ready.methods == sorted(ready.methods)
    assert {"echo", "add", "array_sum", "make_array", "blob", "fail", "sleep", "publish", "exit"} <= set(ready.methods)


def test_echo_and_add(echo: Running) -> None:
    assert echo.caller.result("echo", text="hello") == {
        "text": "hello", "service": "echo", "replica": 0, "incarnation": 1, "pid": echo.child.proc.pid,
    }
    assert echo.caller.result("add", a=2, b=3.5) == 5.5


def test_numpy_arrays_travel_zero_copy_and_read_only(echo: Running) -> None:
    x = np.arange(12, dtype=np.float64).reshape(3, 4)
    info = echo.caller.result("array_info", x=x)
    assert info == {"shape": [3, 4], "dtype": "<f8", "writeable": False, "sum": 66.0}
    assert echo.caller.result("array_sum", x=x) == 66.0
    arr = echo.caller.result("make_array", n=1000)
    assert arr.dtype == np.float32 and arr.shape == (1000,)
    assert not arr.flags.writeable and not arr.flags.owndata  # a view of the received frame
    np.testing.assert_array_equal(arr, np.arange(1000, dtype=np.float32))


def test_megabyte_blobs_both_ways(echo: Running) -> None:
    blob = echo.caller.result("blob", size=1 << 20)
    assert isinstance(blob, memoryview) and blob.readonly and blob.nbytes == 1 << 20
    assert echo.caller.result("blob_len", data=b"\x07" * (1 << 20)) == {"len": 1 << 20, "type": "memoryview"}


def test_handler_exception_is_handler_error(echo: Running) -> None:
    err = echo.caller.error("fail", message="boom")
    assert (err.code, err.reason) == (ErrorCode.HANDLER_ERROR, "ValueError: boom")


def test_bad_arguments_are_invalid_field(echo: Running) -> None:
    missing = echo.caller.error("echo")
    assert missing.code == ErrorCode.INVALID_FIELD and "text" in missing.reason
    extra = echo.caller.error("echo", text="x", colour="red")
    assert extra.code == ErrorCode.INVALID_FIELD and "colour" in extra.reason


def test_unknown_method(echo: Running) -> None:
    err = echo.caller.error("nope")
    assert err.code == ErrorCode.UNKNOWN_METHOD and "'nope'" in err.reason


def test_garbage_gets_malformed_replies_and_service_keeps_serving(echo: Running) -> None:
    sock = echo.caller.sock
    header = wire.pack({"msg_id": b"0123456789abcdef", "msg_type": "rpc_request", "version": [1, 0],
                        "sender": "test", "ts_ns": 1})
    for frames in ([b"garbage"], [wire.MAGIC, b"\xc1", b"\x80"], [wire.MAGIC, header, b"\xc1"], [wire.MAGIC]):
        sock.send_multipart(frames)
        env = echo.caller.recv()
        assert env.is_error and env.message.code == ErrorCode.MALFORMED, (frames, env.message)
    assert env.header.parent_id is None  # the last one had no readable header to correlate with
    sock.send_multipart([wire.MAGIC, header, b"\xc1"])
    assert echo.caller.recv().header.parent_id == b"0123456789abcdef"
    assert echo.caller.result("echo", text="still here")["text"] == "still here"


def test_non_rpc_messages_and_oversized_requests_are_refused(echo: Running) -> None:
    sock = echo.caller.sock
    sock.send_multipart(wire.encode(messages.PingRequest(), sender="test"))
    assert echo.caller.recv().message.code == ErrorCode.UNKNOWN_TYPE
    err = echo.caller.error("blob_len", data=bytes(5 << 20))  # MK_MAX_MESSAGE_SIZE is 4 MiB
    assert err.code == ErrorCode.TOO_LARGE


def test_deadlines(echo: Running) -> None:
    expired = echo.caller.send("echo", text="late", deadline_ns=time.time_ns() - 1)
    env = echo.caller.recv()
    assert env.header.parent_id == expired and env.message.code == ErrorCode.DEADLINE_EXCEEDED
    # An async handler still running at its deadline is cancelled and answered.
    msg_id = echo.caller.send("sleep", seconds=60.0, deadline_ns=time.time_ns() + 200_000_000)
    env = echo.caller.recv()
    assert env.header.parent_id == msg_id and env.message.code == ErrorCode.DEADLINE_EXCEEDED
    assert echo.caller.result("sleep", seconds=0.0) == 0.0


def test_publish_reaches_the_event_bus(echo: Running) -> None:
    assert echo.caller.result("publish", topic="demo.published", data={"n": 1}) is None
    env = echo.kernel.wait_event("demo.published")
    assert env.message == wire.Event("demo.published", {"n": 1})
    assert env.header.sender == "svc:echo.0.1"
    assert echo.caller.result("publish_from_thread", topic="demo.threaded", data={"n": 2}) is None
    assert echo.kernel.wait_event("demo.threaded").message.data == {"n": 2}
    err = echo.caller.error("publish", topic="service.ready", data={})
    assert err.code == ErrorCode.HANDLER_ERROR and "reserved for the kernel" in err.reason
    # A topic once published is remembered as valid; its later events and bad input are as before.
    for n in (3, 4):
        assert echo.caller.result("publish", topic="demo.twice", data={"n": n}) is None
    end = time.monotonic() + CEILING
    while [e.message.data for e in echo.kernel.events if e.topic == "demo.twice"] != [{"n": 3}, {"n": 4}]:
        assert time.monotonic() < end, f"saw {[e.topic for e in echo.kernel.events]}"
        echo.kernel.pump(end - time.monotonic())
    err = echo.caller.error("publish", topic="demo.twice", data=[1, 2])
    assert err.code == ErrorCode.HANDLER_ERROR and "event data must be a dict" in err.reason
    err = echo.caller.error("publish", topic="", data={})
    assert err.code == ErrorCode.HANDLER_ERROR and "non-empty string" in err.reason


def test_call_looks_up_through_the_kernel_then_goes_direct(echo: Running) -> None:
    relay = echo.caller.send("relay", service="echo", method="add", args={"a": 1, "b": 2})
    _, identity, lookup = echo.kernel.wait_control("lookup_request", after=len(echo.kernel.inbox))
    assert lookup.message == messages.LookupRequest(service="echo")
    echo.kernel.reply(identity, lookup, messages.LookupReply(
        service="echo", endpoints=[echo.child.endpoint], methods=echo.ready.methods, ready=1, replicas=1))
    env = echo.caller.recv()
    assert env.header.parent_id == relay and env.message.result == 3


# --- one replica per test ---------------------------------------------------------------------------


@pytest.fixture
def fake_kernel(short_tmp: str) -> Iterator[FakeKernel]:
    k = FakeKernel(short_tmp)
    try:
        yield k
    finally:
        k.close()


@pytest.fixture
def children() -> Iterator[list[Child]]:
    started: list[Child] = []
    try:
        yield started
    finally:
        for child in started:
            child.kill()


def test_heartbeats_start_before_ready_from_the_replica_identity(fake_kernel: FakeKernel, children: list[Child]) -> None:
    child = spawn(fake_kernel, "tests.fixtures.echo:Echo", "echo")
    children.append(child)
    first_hb, identity, _ = fake_kernel.wait_control("heartbeat")
    ready_at, ready_identity, ready = fake_kernel.wait_control("ready_request")
    assert first_hb < ready_at
    assert identity == ready_identity == b"svc:echo.0.1"
    fake_kernel.reply(ready_identity, ready, messages.ReadyReply(state="ready"))
    # Heartbeats keep coming after readiness.
    i, _, beat = fake_kernel.wait_control("heartbeat", after=ready_at + 1)
    i, _, beat = fake_kernel.wait_control("heartbeat", after=i + 1)
    assert beat.message == messages.Heartbeat(service="echo", replica=0, incarnation=1)


def test_sigterm_drains_runs_teardown_and_exits_zero(fake_kernel: FakeKernel, children: list[Child]) -> None:
    child = spawn(fake_kernel, "tests.fixtures.echo:Echo", "echo")
    children.append(child)
    make_ready(fake_kernel, child)
    caller = Caller(fake_kernel.ctx, child.endpoint)
    slow = caller.send("sleep", seconds=0.3)
    caller.call("echo", text="after the slow call")  # same connection: the slow call is in flight now
    os.killpg(child.proc.pid, signal.SIGTERM)
    env = caller.recv()
    assert env.header.parent_id == slow and env.message.result == 0.3  # finished, not cancelled
    assert child.wait() == 0
    out = child.output()
    assert "SIGTERM: stopping gracefully" in out and "echo teardown done" in out
    assert re.search(r"^\d{4}-\d\d-\d\dT[\d:.]+Z INFO echo\[0\] echo teardown done$", out, re.M), out


def test_stopping_refuses_new_calls_and_cancels_calls_past_the_drain_bound(
    fake_kernel: FakeKernel, children: list[Child]
) -> None:
    # The drain bound is the window in which this test must send one probe after the signal.
    child = spawn(fake_kernel, "tests.fixtures.echo:Echo", "echo", config={"drain_timeout": 1.0})
    children.append(child)
    make_ready(fake_kernel, child)
    caller = Caller(fake_kernel.ctx, child.endpoint)
    stuck = caller.send("sleep", seconds=600.0)
    caller.call("echo", text="the sleep is in flight")
    os.killpg(child.proc.pid, signal.SIGTERM)
    # Until the signal is handled calls still succeed; afterwards they are refused. Each probe is
    # a round trip, and the stuck call holds the replica in its stopping phase meanwhile.
    replies: dict[bytes, wire.Envelope] = {}
    while True:
        probe = caller.send("echo", text="probe")
        while probe not in replies:
            env = caller.recv()
            replies[env.header.parent_id] = env
        if replies[probe].is_error:
            break
    assert replies[probe].message.code == ErrorCode.SHUTTING_DOWN
    while stuck not in replies:
        env = caller.recv()
        replies[env.header.parent_id] = env
    assert replies[stuck].message.code == ErrorCode.SHUTTING_DOWN
    assert child.wait() == 0
    assert "cancelling 1 call(s)" in child.output() and "echo teardown done" in child.output()


def test_request_stop_exits_with_the_given_status_after_replying(fake_kernel: FakeKernel, children: list[Child]) -> None:
    child = spawn(fake_kernel, "tests.fixtures.echo:Echo", "echo")
    children.append(child)
    make_ready(fake_kernel, child)
    caller = Caller(fake_kernel.ctx, child.endpoint)
    assert caller.result("exit", code=3) is None
    assert child.wait() == 3
    assert "echo teardown done" in child.output()


def test_subscriber_receives_events_published_after_ready(fake_kernel: FakeKernel, children: list[Child]) -> None:
    child = spawn(fake_kernel, "tests.fixtures.subscriber:Subscriber", "sub")
    children.append(child)
    make_ready(fake_kernel, child)
    assert "demo." in fake_kernel.subscriptions  # subscribed by prefix, live before ready
    fake_kernel.publish("other.thing", {"skip": True})
    fake_kernel.publish("demo.hello", {"n": 1})
    fake_kernel.publish("demo.again", {"n": 2})
    caller = Caller(fake_kernel.ctx, child.endpoint)
    assert caller.result("wait_received", count=2) == [
        {"topic": "demo.hello", "data": {"n": 1}},
        {"topic": "demo.again", "data": {"n": 2}},
    ]


def test_slow_setup_reports_progress(fake_kernel: FakeKernel, children: list[Child]) -> None:
    child = spawn(fake_kernel, "tests.fixtures.slow_ready:SlowReady", "slow", config={"steps": 2, "step_s": 0.01, "extend_s": 5})
    children.append(child)
    after = 0
    for step in (1, 2):
        after, identity, env = fake_kernel.wait_control("progress_request", after=after)
        assert env.message.message == f"loading {step}/2" and env.message.extend_s == 5.0
        fake_kernel.reply(identity, env, messages.ProgressReply(deadline_in_s=10.0 * step))
        after += 1
    make_ready(fake_kernel, child)
    assert Caller(fake_kernel.ctx, child.endpoint).result("deadlines") == [10.0, 20.0]


def test_setup_raising_exits_1_with_the_traceback(fake_kernel: FakeKernel, children: list[Child]) -> None:
    child = spawn(fake_kernel, "tests.fixtures.crashy:Crashy", "crashy", config={"crash_after_setup": True})
    children.append(child)
    assert child.wait() == 1
    out = child.output()
    assert "setup failed" in out and "RuntimeError: crashy: setup failed on purpose" in out
    assert not [e for _, e in fake_kernel.inbox if e.msg_type == "ready_request"]


def test_setup_calling_sys_exit_keeps_its_status(fake_kernel: FakeKernel, children: list[Child]) -> None:
    child = spawn(fake_kernel, "tests.fixtures.crashy:Crashy", "crashy", config={"exit_code": 7})
    children.append(child)
    assert child.wait() == 7


def _run_runner(kernel: FakeKernel, entry: str | None, **env_overrides: str) -> subprocess.CompletedProcess[str]:
    env = runner_env(kernel, "bad", **env_overrides)
    for name in [k for k, v in env.items() if v == "<unset>"]:
        del env[name]
    argv = [sys.executable, "-m", "services.runner", *([entry] if entry else [])]
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("tests.fixtures.no_such_module:Echo", "no module named 'tests.fixtures.no_such_module'"),
        ("tests.fixtures.echo:NoSuchClass", "has no attribute 'NoSuchClass'"),
        ("tests.fixtures.echo:np", "not a subclass of services.base.Service"),
        ("no-such-entry-point", "neither 'package.module:Class' nor an entry point"),
        ("tests.fixtures.echo:", "must look like 'package.module:Class'"),
    ],
)
def test_bad_entry_exits_2_with_a_clear_message(fake_kernel: FakeKernel, entry: str, expected: str) -> None:
    done = _run_runner(fake_kernel, entry)
    assert done.returncode == 2, done.stderr
    assert expected in done.stderr


def test_missing_environment_is_named(fake_kernel: FakeKernel) -> None:
    done = _run_runner(fake_kernel, "tests.fixtures.echo:Echo", MK_SERVICE="<unset>", MK_ENDPOINT="<unset>")
    assert done.returncode == 2
    assert "missing environment variables: MK_SERVICE, MK_ENDPOINT" in done.stderr
    done = _run_runner(fake_kernel, None, MK_ENTRY="<unset>")
    assert done.returncode == 2 and "MK_ENTRY" in done.stderr
    done = _run_runner(fake_kernel, "tests.fixtures.echo:Echo", MK_CONFIG="[1]")
    assert done.returncode == 2 and "MK_CONFIG must be a JSON object" in done.stderr


def test_runner_exits_when_the_kernel_is_already_gone(fake_kernel: FakeKernel) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    done = _run_runner(fake_kernel, "tests.fixtures.echo:Echo", MK_KERNEL_PID=str(gone.pid))
    assert done.returncode == 1 and "is gone" in done.stderr
