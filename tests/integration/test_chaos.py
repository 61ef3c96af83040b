"""CI's one-minute chaos soak: ``bench/chaos.py --minutes 1`` must find nothing broken.

The soak (see ``docs/reliability.md``) kills replicas, hangs them past heartbeat liveness, pushes
a memory hog over its budget and ``kill -9``s the daemon itself under client load; it prints one
JSON line. Here: every zero-key is 0, requests succeeded, and every request that did not hang
either succeeded or failed with a clear error code (nothing without a code, no wrong answer).

Below it, what the soaks found, each pinned down deterministically (xfail until fixed, see each
reason): a call must come back within its own timeout even when the kernel's look-up was slow
(against a stand-in kernel), and a training job must ride through a store restart. And a check
that the soak's lease checker can see an over-allocation at all.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import zmq

from bench.chaos_watch import check_leases
from microkernel.client import Client
from protocols import messages, wire
from protocols.errors import ErrorCode, MicrokernelError
from tests.integration.conftest import REPO_ROOT, kernel_env, start_kernel
from tests.integration.stand_in_kernel import FakeKernel

# A ceiling for the whole run (about 90 s here: start-up, 60 s of chaos, final checks).
CEILING = 300.0
ZERO_KEYS = ("hung", "lost_acked_writes", "corrupted_reads", "lease_overallocations", "orphans", "shm_segments_leaked")


def run_soak(*args: str) -> dict:
    """Run ``bench/chaos.py`` with ``args``; its one JSON line (it must not report an error)."""
    proc = subprocess.Popen([sys.executable, "bench/chaos.py", *args], cwd=REPO_ROOT, env=kernel_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=CEILING)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the bench tears its daemon down on SIGTERM
        out, err = proc.communicate(timeout=120)
        raise AssertionError(f"the soak did not finish within {CEILING:g}s:\n{err[-4000:]}") from None
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one JSON line, got {out!r}\n{err[-4000:]}"
    result = json.loads(lines[0])
    assert "error" not in result and proc.returncode == 0, f"{result}\n{err[-4000:]}"
    return result


@pytest.mark.timeout(CEILING + 150)  # above the suite's 120 s default: the soak's own ceilings come first
def test_one_minute_chaos_soak_breaks_nothing() -> None:
    result = run_soak("--minutes", "1", "--seed", "2")
    report = json.dumps(result, indent=1)
    for key in ZERO_KEYS:
        assert result[key] == 0, f"{key} = {result[key]}\n{report}"
    assert result["succeeded"] > 0, report
    assert result["failed_clear_error"] + result["succeeded"] == result["requests"] - result["hung"], report
    by_op = result["failed_clear_error_by_op"]
    assert sum(n for codes in by_op.values() for n in codes.values()) == result["failed_clear_error"], report
    assert set(by_op) <= set(result["requests_by_op"]), report
    # The chaos actually happened: replicas died, and the daemon itself was killed and came back.
    assert result["daemon_restarts"] >= 1, report
    assert sum(result["restarts_by_reason"].values()) >= 1, report
    assert result["acked_writes"] > 0, report
    # Every heartbeat kill said how long its replica had been silent: past liveness x interval.
    if result["restarts_by_reason"].get("heartbeat"):
        assert result["heartbeat_silence_max_s"] >= 3.0, report


# --- what the soak's `hung` key guards, pinned down on its own ----------------------------------

CALL_TIMEOUT = 1.0
# How slow the stand-in kernel is to answer the look-up, as a share of the call's timeout.
LOOKUP_DELAY = 0.8


def test_a_call_returns_within_its_timeout_when_the_lookup_was_slow(short_tmp: str) -> None:
    """Regression: Client.call(timeout=T) gave the kernel look-up T and then the request another
    full T, so a call could return after ~2T; the timeout is now one budget for the whole call."""
    kernel = FakeKernel(short_tmp)
    silent = kernel.ctx.socket(zmq.ROUTER)  # a replica that takes requests and never answers
    silent.linger = 0
    silent_endpoint = f"ipc://{short_tmp}/silent.sock"
    silent.bind(silent_endpoint)
    outcome: dict[str, object] = {}

    def caller() -> None:
        with Client(kernel.endpoints.control, timeout=CALL_TIMEOUT) as client:
            client.ping()
            started = time.monotonic()
            try:
                client.call("svc", "work", timeout=CALL_TIMEOUT)
            except MicrokernelError as exc:
                outcome["code"] = exc.code
            outcome["elapsed"] = time.monotonic() - started

    thread = threading.Thread(target=caller)
    thread.start()
    try:
        _, identity, ping = kernel.wait_control("ping_request")
        kernel.reply(identity, ping, messages.PingReply(version="0", pid=os.getpid(), uptime_s=0.0))
        _, identity, lookup = kernel.wait_control("lookup_request")
        # The injected fault: a busy kernel answers the look-up late (this is the slowness under
        # test, not a wait for something to happen).
        threading.Event().wait(LOOKUP_DELAY * CALL_TIMEOUT)
        kernel.reply(identity, lookup, messages.LookupReply(service="svc", endpoints=[silent_endpoint],
                                                            methods=["work"], ready=1, replicas=1))
        thread.join(10 * CALL_TIMEOUT)
        assert not thread.is_alive()
    finally:
        thread.join(10 * CALL_TIMEOUT)
        kernel.close()
    assert outcome.get("code") == ErrorCode.TIMEOUT
    assert float(outcome["elapsed"]) <= CALL_TIMEOUT + 0.3, f"the call took {outcome['elapsed']:.2f}s with timeout {CALL_TIMEOUT}s"


def test_the_soak_lease_checker_flags_overallocations() -> None:
    """The soak's ``lease_overallocations`` is only worth its zero if the checker can see one."""
    devices = [{"uuid": "GPU-a", "memory_total": 8 << 30}, {"uuid": "GPU-b", "memory_total": 16 << 30}]

    def lease(i: int, device: str, memory: int, mode: str = "shared") -> dict:
        return {"id": f"lease-{i}", "devices": [device], "memory": memory, "mode": mode}

    fine = [lease(1, "GPU-a", 4 << 30), lease(2, "GPU-a", 4 << 30), lease(3, "GPU-b", 0, "exclusive")]
    assert check_leases({"devices": devices, "leases": fine}) == []
    too_much = [lease(1, "GPU-a", 6 << 30), lease(2, "GPU-a", 4 << 30)]
    assert len(check_leases({"devices": devices, "leases": too_much})) == 1
    shared_exclusive = [lease(1, "GPU-b", 0, "exclusive"), lease(2, "GPU-b", 1 << 30)]
    assert len(check_leases({"devices": devices, "leases": shared_exclusive})) == 1
    two_exclusive = [lease(1, "GPU-b", 0, "exclusive"), lease(2, "GPU-b", 0, "exclusive")]
    assert len(check_leases({"devices": devices, "leases": two_exclusive})) == 1


# --- a store restart during a training job ---------------------------------------------------------

STORE_DOWN_S = 3.0  # the injected fault: how long the restarted store stays unavailable


def open_gate(path: str) -> None:
    """Release a GatedStore held in setup (no-op when nobody waits on the FIFO)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # ENXIO: no reader yet, or any more
        return
    os.close(fd)


def event_of(env: wire.Envelope) -> tuple[str, dict]:
    return env.msg_type, wire.body_of(env.message)


def test_a_training_job_rides_through_a_store_restart(short_tmp: str) -> None:
    """Regression: the trainer's store calls were not retried, so one not_ready while the store
    restarted ended the job (seen twice in the 30-minute soak)."""
    gate = os.path.join(short_tmp, "gate")
    os.mkfifo(gate)
    config = f"""
[kernel]
heartbeat_interval = "1s"

[services.store]
entry = "tests.fixtures.chaos_store:GatedStore"
[services.store.config]
gate = "{gate}"

[services.trainer]
entry = "services.trainer:Trainer"
depends_on = ["store"]
"""
    model = {"n_layers": 1, "d_model": 16, "n_heads": 2, "context": 16}
    try:
        with start_kernel(config, short_tmp) as k, Client(runtime_dir=k.runtime_dir, timeout=60.0) as c:
            c.wait_ready("store", timeout=60.0)
            c.wait_ready("trainer", timeout=60.0)
            with c.events("train.*", "service.*") as stream:
                c.call("trainer", "train_start", job="ride", config=model, steps=400, batch_size=4, checkpoint_every=5)
                while True:  # the job is checkpointing: the store is in use
                    env = stream.next_event(60.0)
                    assert env is not None, "no checkpoint within 60 s"
                    if event_of(env)[0] == "train.checkpointed":
                        break
                store_pid = c.status("store")["services"][0]["replicas"][0]["pid"]
                os.kill(store_pid, signal.SIGKILL)
                # The store stays down STORE_DOWN_S (the fault), or until the job gave up.
                down_until = time.monotonic() + STORE_DOWN_S
                outcome = None
                while (left := down_until - time.monotonic()) > 0:
                    env = stream.next_event(left)
                    if env is not None and event_of(env)[0] in ("train.failed", "train.finished"):
                        outcome = event_of(env)
                        break
                open_gate(gate)
                while outcome is None:
                    env = stream.next_event(120.0)
                    assert env is not None, "the job neither finished nor failed within 120 s"
                    if event_of(env)[0] in ("train.failed", "train.finished") and event_of(env)[1].get("job") == "ride":
                        outcome = event_of(env)
            assert outcome[0] == "train.finished", f"the job ended with {outcome}"
    finally:
        open_gate(gate)


def test_the_soak_tally_says_which_operation_got_which_error_and_why() -> None:
    # A 30-minute soak once reported one bad_state among 13 781 clear errors, with no way to tell
    # which request it answered: errors are counted per operation, with the first reason of each.
    from bench.chaos_load import ERROR_SAMPLES, Tally
    from protocols.errors import CallTimeout, ErrorCode, MicrokernelError

    tally = Tally(grace=1.0)

    def fail(code: ErrorCode, reason: str) -> None:
        raise MicrokernelError(code, reason)

    assert tally.run("echo.echo", 5.0, lambda: "ok") == "ok"
    tally.run("trainer.train_start", 5.0, lambda: fail(ErrorCode.BAD_STATE, "job 'chaos-3' already exists"))
    tally.run("trainer.train_start", 5.0, lambda: fail(ErrorCode.BAD_STATE, "job 'chaos-4' already exists"))
    tally.run("echo.echo", 5.0, lambda: fail(ErrorCode.NOT_READY, "service 'echo' is still starting"))

    def timed_out() -> None:
        raise CallTimeout("no reply to rpc_request within 5s")

    tally.run("store.get", 5.0, timed_out)
    summary = tally.summary()
    assert summary["requests"] == 5 and summary["succeeded"] == 1 and summary["failed_clear_error"] == 4
    assert summary["failed_clear_error_by_code"] == {"bad_state": 2, "not_ready": 1, "timeout": 1}
    assert summary["failed_clear_error_by_op"] == {
        "echo.echo": {"not_ready": 1}, "store.get": {"timeout": 1}, "trainer.train_start": {"bad_state": 2}}
    assert summary["failed_clear_error_reasons"] == {
        "echo.echo not_ready": "service 'echo' is still starting",
        "store.get timeout": "no reply to rpc_request within 5s",
        "trainer.train_start bad_state": "job 'chaos-3' already exists",  # the first one
    }
    # The reasons kept stay bounded however many kinds of error a soak meets.
    for i in range(2 * ERROR_SAMPLES):
        tally.run(f"op{i}", 5.0, lambda: fail(ErrorCode.INTERNAL, "boom"))
    assert len(tally.summary()["failed_clear_error_reasons"]) == ERROR_SAMPLES
    assert tally.summary()["failed_clear_error"] == 4 + 2 * ERROR_SAMPLES


def test_a_hang_cut_short_by_the_end_of_the_soak_is_not_judged() -> None:
    # Found by a 30-minute soak: a replica SIGSTOPped just before the soak ended had its hang cut
    # short; it was still alive (its liveness not yet spent), so the driver waited on and counted
    # the kernel's kill, in time by its own clock, as "killed_late".
    import random

    import psutil

    from bench.chaos import ChaosDriver

    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)

    class OneReplica:
        def status(self) -> dict:
            return {"services": [{"name": "echo", "replicas": [{"replica": 0, "state": "ready", "pid": child.pid}]}]}

    try:
        ended = threading.Event()
        ended.set()  # the soak is over before the hang could run its course
        driver = ChaosDriver(None, None, None, ended, random.Random(1), end_at=time.monotonic(),  # type: ignore[arg-type]
                             interval=(1.0, 2.0), restart_every=0.0, names=["echo"])
        driver.hang_replica(OneReplica(), past_liveness=True)  # type: ignore[arg-type]
        assert dict(driver.hangs) == {"sigstop_past_liveness:cut_short": 1}
        assert driver.hang_survivors == [] and driver.stopped == {}
        assert psutil.Process(child.pid).status() != psutil.STATUS_STOPPED  # resumed
    finally:
        child.kill()
        child.wait()
