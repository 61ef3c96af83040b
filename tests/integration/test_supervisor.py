"""Supervision semantics end to end: a real daemon, real service processes, real sockets.

Every wait is on an event from the kernel's bus (or a process exit), with a generous ceiling.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable

import psutil
import pytest

from microkernel.client import Client
from protocols import wire
from protocols.errors import CallTimeout, MicrokernelError
from tests.integration.conftest import start_kernel
from tests.processes import assert_all_gone

CEILING = 30.0

ECHO = 'entry = "tests.fixtures.echo:Echo"'
CRASHY = 'entry = "tests.fixtures.crashy:Crashy"'
FAST = """
[kernel]
heartbeat_interval = "300ms"
heartbeat_liveness = 10
"""
HEARTBEAT_TIMEOUT_S = 0.3 * 10  # FAST's interval x liveness


def wait_event(stream, predicate: Callable[[wire.Envelope], bool], timeout: float = CEILING) -> wire.Envelope:
    """The first event from ``stream`` that satisfies ``predicate`` (fails after the ceiling)."""
    seen = []
    deadline = timeout
    import time

    end = time.monotonic() + deadline
    while True:
        left = end - time.monotonic()
        env = stream.next_event(timeout=max(0.0, left)) if left > 0 else None
        if env is None:
            pytest.fail(f"no matching event within {timeout:g}s; saw: {[(e.msg_type, _data(e)) for e in seen][-15:]}")
        seen.append(env)
        if predicate(env):
            return env


def _data(env: wire.Envelope) -> dict:
    return wire.body_of(env.message)


def is_event(topic: str, service: str | None = None, **fields) -> Callable[[wire.Envelope], bool]:
    def match(env: wire.Envelope) -> bool:
        if env.msg_type != topic:
            return False
        data = _data(env)
        if service is not None and data.get("service") != service:
            return False
        return all(data.get(k) == v for k, v in fields.items())

    return match


def exit_kind(env: wire.Envelope) -> str:
    return _data(env)["reason"]["kind"]


def test_dependencies_start_only_after_readiness_and_stop_in_reverse(short_tmp: str) -> None:
    config = f"""
[services.db]
entry = "tests.fixtures.slow_ready:SlowReady"
[services.db.config]
steps = 2
step_s = 0.2
[services.api]
{CRASHY}
depends_on = ["db"]
[services.web]
{CRASHY}
depends_on = ["api"]
"""
    with start_kernel(config, short_tmp) as k, Client(runtime_dir=k.runtime_dir) as c:
        with c.events("service.*", since_seq=0) as stream:
            order = []
            while len([e for e in order if e[0] == "service.ready"]) < 3:
                env = wait_event(stream, lambda e: e.msg_type in ("service.starting", "service.ready"))
                order.append((env.msg_type, _data(env)["service"]))
        assert order.index(("service.ready", "db")) < order.index(("service.starting", "api"))
        assert order.index(("service.ready", "api")) < order.index(("service.starting", "web"))
        with c.events("service.exited") as stream:
            c.shutdown()
            stopped = [_data(wait_event(stream, is_event("service.exited")))["service"] for _ in range(3)]
        assert stopped == ["web", "api", "db"]
        assert k.proc.wait(timeout=CEILING) == 0


@pytest.mark.parametrize(
    "restart,code,restarted",
    [
        ("permanent", 0, True),
        ("permanent", 3, True),
        ("transient", 0, False),
        ("transient", 3, True),
        ("temporary", 3, False),
    ],
)
def test_restart_types(short_tmp: str, restart: str, code: int, restarted: bool) -> None:
    config = f"""
[services.w]
{CRASHY}
restart = "{restart}"
"""
    with start_kernel(config, short_tmp) as k, Client(runtime_dir=k.runtime_dir) as c:
        c.wait_ready("w", timeout=CEILING)
        with c.events("service.*") as stream:
            with pytest.raises(MicrokernelError):  # crash() dies without replying
                c.call("w", "crash", code=code, timeout=1.0)
            exited = wait_event(stream, is_event("service.exited", "w"))
            assert _data(exited)["reason"]["text"] == f"exit({code})"
            assert _data(exited)["will_restart"] is restarted
            if restarted:
                ready = wait_event(stream, is_event("service.ready", "w"))
                assert _data(ready)["incarnation"] == 2
        status = c.status("w")["services"][0]
        assert status["replicas"][0]["last_exit"]["text"] == f"exit({code})"
        assert status["state"] == ("ready" if restarted else "exited")


def test_intensity_exceeded_marks_the_service_failed_and_start_resets_it(short_tmp: str) -> None:
    config = f"""
[services.boom]
{CRASHY}
intensity = 2
period = "60s"
backoff = {{ initial = "10ms", max = "20ms" }}
[services.boom.config]
exit_code = 4
"""
    with start_kernel(config, short_tmp) as k, Client(runtime_dir=k.runtime_dir) as c:
        with c.events("service.*", since_seq=0) as stream:
            failed = wait_event(stream, is_event("service.failed", "boom"))
            assert "more than 2 restarts" in _data(failed)["reason"]
        status = c.status("boom")["services"][0]
        assert status["state"] == "failed"
        assert status["restarts"] == 2
        # A manual start gives it a fresh intensity window (and it fails again).
        with c.events("service.*") as stream:
            c.start("boom", wait=False)
            wait_event(stream, is_event("service.started", "boom"))
            wait_event(stream, is_event("service.failed", "boom"))


def test_backoff_grows_between_consecutive_restarts(short_tmp: str) -> None:
    config = f"""
[services.boom]
{CRASHY}
intensity = 10
backoff = {{ initial = "20ms", factor = 2.0, max = "60ms", reset_after = "1h" }}
[services.boom.config]
exit_code = 1
"""
    with start_kernel(config, short_tmp) as k, Client(runtime_dir=k.runtime_dir) as c:
        with c.events("service.backoff", since_seq=0) as stream:
            delays = [_data(wait_event(stream, is_event("service.backoff", "boom")))["delay_s"] for _ in range(4)]
        # First restart immediate (no backoff event), then initial, x2, capped.
        assert delays == pytest.approx([0.02, 0.04, 0.06, 0.06])


def test_backoff_resets_after_a_stable_run(short_tmp: str) -> None:
    config = f"""
[services.w]
{CRASHY}
backoff = {{ initial = "5s", reset_after = "1ms" }}
"""
    with start_kernel(config, short_tmp) as k, Client(runtime_dir=k.runtime_dir) as c:
        c.wait_ready("w", timeout=CEILING)
        with c.events("service.*") as stream:
            for incarnation in (2, 3, 4):
                with pytest.raises(MicrokernelError):
                    c.call("w", "crash", code=1, timeout=1.0)
                # Each run lasted longer than reset_after: every restart is immediate, never a 5 s backoff.
                env = wait_event(stream, lambda e: e.msg_type in ("service.ready", "service.backoff"))
                assert env.msg_type == "service.ready"
                assert _data(env)["incarnation"] == incarnation


def test_missed_heartbeats_kill_and_restart_with_reason(short_tmp: str) -> None:
    config = FAST + """
[services.hb]
entry = "tests.fixtures.no_heartbeat:NoHeartbeat"
"""
    with start_kernel(config, short_tmp) as k, Client(runtime_dir=k.runtime_dir) as c:
        c.wait_ready("hb", timeout=CEILING)
        with c.events("service.*") as stream:
            with pytest.raises(MicrokernelError):
                c.call("hb", "hang", timeout=1.0)
            exited = wait_event(stream, is_event("service.exited", "hb"))
            assert exit_kind(exited) == "heartbeat"
            assert _data(exited)["reason"]["signal"] == signal.SIGKILL
            # How long it was silent, for whoever reads the exit: at least the liveness timeout.
            detail = _data(exited)["reason"]["detail"]
            assert detail.startswith("silent for ") and float(detail.split()[2]) >= HEARTBEAT_TIMEOUT_S, detail
            wait_event(stream, is_event("service.ready", "hb", incarnation=2))


def test_start_timeout_kills_a_service_that_never_gets_ready(short_tmp: str) -> None:
    config = """
[services.stuck]
entry = "tests.fixtures.never_ready:NeverReady"
start_timeout = "1s"
restart = "temporary"
"""
    with start_kernel(config, short_tmp) as k, Client(runtime_dir=k.runtime_dir) as c:
        with c.events("service.*", since_seq=0) as stream:
            exited = wait_event(stream, is_event("service.exited", "stuck"))
        assert exit_kind(exited) == "start_timeout"
        assert c.status("stuck")["services"][0]["replicas"][0]["last_exit"]["kind"] == "start_timeout"


def test_progress_messages_extend_the_start_timeout(short_tmp: str) -> None:
    config = """
[services.slow]
entry = "tests.fixtures.slow_ready:SlowReady"
start_timeout = "3s"
restart = "temporary"
[services.slow.config]
steps = 8
step_s = 0.5
extend_s = 2.0
"""
    with start_kernel(config, short_tmp) as k, Client(runtime_dir=k.runtime_dir) as c:
        with c.events("service.*", since_seq=0) as stream:
            progress = wait_event(stream, is_event("service.progress", "slow"))
            assert _data(progress)["message"] == "loading 1/8"
            env = wait_event(stream, lambda e: e.msg_type in ("service.ready", "service.exited"))
        assert env.msg_type == "service.ready", _data(env)  # 4 s of loading with a 3 s start timeout
        assert _data(env)["startup_ms"] > 3000


def test_stop_kills_the_whole_process_tree(short_tmp: str) -> None:
    config = """
[services.tree]
entry = "tests.fixtures.grandchildren:Grandchildren"
stop_timeout = "2s"
[services.tree.config]
count = 3
"""
    with start_kernel(config, short_tmp) as k, Client(runtime_dir=k.runtime_dir) as c:
        c.wait_ready("tree", timeout=CEILING)
        pids = c.call("tree", "pids")
        assert len(pids) == 4
        reply = c.stop("tree")
        assert reply["state"] == "stopped"
        assert_all_gone(pids, CEILING)
        assert c.status("tree")["services"][0]["replicas"][0]["last_exit"]["kind"] == "stopped"


def test_kill_9_of_the_daemon_leaves_no_process_behind(short_tmp: str) -> None:
    config = """
[services.tree]
entry = "tests.fixtures.grandchildren:Grandchildren"
replicas = 2
[services.cmd]
command = ["sleep", "1000"]
"""
    with start_kernel(config, short_tmp) as k, Client(runtime_dir=k.runtime_dir) as c:
        c.wait_ready("tree", timeout=CEILING)
        c.wait_ready("cmd", timeout=CEILING)
        pids = list(c.call("tree", "pids")) + list(c.call("tree", "pids"))
        pids += [r["pid"] for s in c.status()["services"] for r in s["replicas"] if r["pid"]]
        descendants = [p.pid for p in psutil.Process(k.proc.pid).children(recursive=True)]
        os.kill(k.proc.pid, signal.SIGKILL)
        k.proc.wait(timeout=CEILING)
        assert_all_gone(sorted(set(pids + descendants)), CEILING)


def test_commands_on_different_services_do_not_block_each_other(short_tmp: str) -> None:
    # `stubborn` ignores SIGTERM (from before it is ready), so stopping it takes its whole 10 s grace.
    config = """
[services.stubborn]
entry = "tests.fixtures.stubborn:Stubborn"
stop_timeout = "10s"
[services.w]
entry = "tests.fixtures.crashy:Crashy"
"""
    with start_kernel(config, short_tmp) as k, Client(runtime_dir=k.runtime_dir) as c:
        c.wait_ready("w", timeout=CEILING)
        c.wait_ready("stubborn", timeout=CEILING)
        stop_done = threading.Event()

        def slow_stop() -> None:
            with Client(runtime_dir=k.runtime_dir, timeout=CEILING) as c2:
                c2.stop("stubborn")
            stop_done.set()

        with c.events("service.stopping", "service.exited") as stream:
            t = threading.Thread(target=slow_stop)
            t.start()
            wait_event(stream, is_event("service.stopping", "stubborn"))
            # While the stubborn stop waits out its grace, a restart of another service completes.
            reply = c.restart("w")
            assert reply["state"] == "ready"
            assert not stop_done.is_set()
            assert c.status("stubborn")["services"][0]["state"] == "stopping"
            t.join(CEILING)
        assert stop_done.is_set()
        exit_reason = c.status("stubborn")["services"][0]["replicas"][0]["last_exit"]
        assert exit_reason["kind"] == "stopped" and exit_reason["signal"] == signal.SIGKILL


def test_late_subscribers_miss_nothing_published_after_subscribing(short_tmp: str) -> None:
    config = f"""
[services.e]
{ECHO}
"""
    with start_kernel(config, short_tmp) as k, Client(runtime_dir=k.runtime_dir) as c:
        c.wait_ready("e", timeout=CEILING)
        for i in range(5):
            with c.events("demo.*", "service.stopped") as stream:
                # Published the instant events() returns: the welcome handshake guarantees delivery.
                c.call("e", "publish", topic=f"demo.n{i}", data={"i": i})
                env = wait_event(stream, lambda e: e.msg_type.startswith("demo."))
                assert env.message == wire.Event(f"demo.n{i}", {"i": i})
        with c.events("service.stopped") as stream:
            c.stop("e")
            wait_event(stream, is_event("service.stopped", "e"))


@pytest.mark.parametrize(
    "strategy,crashed,restarted,untouched",
    [
        ("one_for_one", "b", [], ["a", "c"]),
        ("one_for_all", "b", ["a", "c"], []),
        ("rest_for_one", "b", ["c"], ["a"]),
    ],
)
def test_group_strategies(short_tmp: str, strategy: str, crashed: str, restarted: list[str], untouched: list[str]) -> None:
    services = "".join(f"\n[services.{n}]\n{CRASHY}\n" for n in "abc")
    config = services + f"""
[groups.g]
strategy = "{strategy}"
services = ["a", "b", "c"]
"""
    with start_kernel(config, short_tmp) as k, Client(runtime_dir=k.runtime_dir) as c:
        for n in "abc":
            c.wait_ready(n, timeout=CEILING)
        with c.events("service.*") as stream:
            with pytest.raises(MicrokernelError):
                c.call(crashed, "crash", code=2, timeout=1.0)
            expected = {crashed, *restarted}
            seen: set[str] = set()
            while seen != expected:
                env = wait_event(stream, lambda e: e.msg_type == "service.ready")
                seen.add(_data(env)["service"])
                assert _data(env)["service"] in expected
        for n in untouched:
            assert c.status(n)["services"][0]["replicas"][0]["incarnation"] == 1
        for n in restarted:
            assert c.status(n)["services"][0]["replicas"][0]["last_exit"]["kind"] == "stopped"


def test_group_intensity_escalates(short_tmp: str) -> None:
    config = f"""
[services.ok]
{CRASHY}
[services.bad]
{CRASHY}
backoff = {{ initial = "10ms", max = "10ms" }}
[services.bad.config]
exit_code = 9
[groups.g]
strategy = "one_for_one"
services = ["ok", "bad"]
intensity = 2
"""
    with start_kernel(config, short_tmp) as k, Client(runtime_dir=k.runtime_dir) as c:
        with c.events("supervisor.*", "service.failed", since_seq=0) as stream:
            esc = wait_event(stream, is_event("supervisor.escalated"))
            assert _data(esc)["group"] == "g" and _data(esc)["service"] == "bad"
            failed = {_data(wait_event(stream, is_event("service.failed")))["service"] for _ in range(2)}
        assert failed == {"ok", "bad"}
        assert {s["name"]: s["state"] for s in c.status()["services"]} == {"ok": "failed", "bad": "failed"}


def test_scale_up_and_down(short_tmp: str) -> None:
    config = f"""
[services.w]
{CRASHY}
"""
    with start_kernel(config, short_tmp) as k, Client(runtime_dir=k.runtime_dir) as c:
        c.wait_ready("w", timeout=CEILING)
        assert c.scale("w", 3)["previous"] == 1
        status = c.status("w")["services"][0]
        assert status["ready_replicas"] == 3 and status["state"] == "ready"
        assert len(c.lookup("w")["endpoints"]) == 3
        pids = [r["pid"] for r in status["replicas"]]
        c.scale("w", 1)
        status = c.status("w")["services"][0]
        assert len(status["replicas"]) == 1 and status["replicas"][0]["pid"] == pids[0]
        assert_all_gone(pids[1:], CEILING)


def test_a_crashed_replica_leaves_no_grandchildren(short_tmp: str) -> None:
    config = f"""
[services.e]
{ECHO}
restart = "temporary"
"""
    with start_kernel(config, short_tmp) as k, Client(runtime_dir=k.runtime_dir) as c:
        c.wait_ready("e", timeout=CEILING)
        orphan = c.call("e", "grandchild")
        with c.events("service.exited") as stream:
            # The reply to a self-stopping handler is not what this test is about (and its delivery
            # races the replica's exit); the exit event is.
            with contextlib.suppress(CallTimeout):
                c.call("e", "exit", code=5, timeout=2.0)
            assert _data(wait_event(stream, is_event("service.exited", "e")))["reason"]["text"] == "exit(5)"
        assert_all_gone([orphan], CEILING)


def test_start_concurrency_queues_starts_without_timing_them_out(short_tmp: str) -> None:
    # Each SlowReady takes ~2 s to get ready; with one start slot the third waits ~4 s for its
    # turn, which must not count against its 4 s start timeout.
    services = "".join(
        f"""
[services.s{i}]
entry = "tests.fixtures.slow_ready:SlowReady"
start_timeout = "4s"
restart = "temporary"
[services.s{i}.config]
steps = 3
step_s = 0.5
extend_s = 0.1
"""
        for i in range(3)
    )
    config = "[kernel]\nstart_concurrency = 1\n" + services
    with start_kernel(config, short_tmp) as k, Client(runtime_dir=k.runtime_dir) as c:
        with c.events("service.*", since_seq=0) as stream:
            order = []
            while len(order) < 3:
                env = wait_event(stream, lambda e: e.msg_type in ("service.ready", "service.exited"))
                assert env.msg_type == "service.ready", _data(env)
                order.append(_data(env)["service"])
        spawned = [e for e in c.status()["services"]]
        starts = sorted(r["replicas"][0]["started_at_ns"] for r in spawned)
        readies = sorted(r["replicas"][0]["ready_at_ns"] for r in spawned)
        # Never two starting at once: each spawn follows the previous readiness.
        assert starts[1] >= readies[0] and starts[2] >= readies[1]
