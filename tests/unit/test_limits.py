"""The control socket's limits as pure logic: token buckets on a fake clock, the LRU of clients,
the replica-traffic bucket, the rejection budget, the in-flight guard and the ``[limits]`` table."""

from __future__ import annotations

import asyncio
import gc
import logging
import warnings

import pytest

from protocols import messages as m
from protocols import wire
from protocols.errors import ErrorCode, MicrokernelError
from microkernel.bus.limits import (
    BAD_INPUT_LINES,
    ControlLimiter,
    InflightGuard,
    RateLimiter,
    TokenBucket,
    is_lifecycle,
)
from microkernel.config import ConfigError, parse_config
from microkernel.limits import LimitSettings


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _router_frames(message: object, routing_id: bytes = b"\x00abcd") -> list[bytes]:
    return [routing_id, *wire.encode(message, sender="t")]


# --- token bucket --------------------------------------------------------------------------------


def test_a_bucket_allows_its_burst_then_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=10.0, burst=5, now=0.0)
    assert [bucket.take(0.0) for _ in range(5)] == [0.0] * 5
    wait = bucket.take(0.0)
    assert wait == pytest.approx(0.1)  # one token comes back in 1/rate seconds
    assert bucket.take(0.05) == pytest.approx(0.05)  # half a token so far
    assert bucket.take(0.1) == 0.0
    # Idle for a long time: the bucket holds ``burst`` tokens, never more.
    assert [bucket.take(100.0) for _ in range(6)].count(0.0) == 5


# --- rate limiter --------------------------------------------------------------------------------


def _limiter(clock: FakeClock, **overrides: int | float) -> RateLimiter:
    settings = {"rate": 10.0, "burst": 3, "max_clients": 100, "rejections_per_s": 2, **overrides}
    return RateLimiter(clock=clock, **settings)  # type: ignore[arg-type]


def test_each_client_has_its_own_bucket() -> None:
    clock = FakeClock()
    limiter = _limiter(clock)
    assert [limiter.take(b"flood") for _ in range(3)] == [0.0] * 3
    assert limiter.take(b"flood") == pytest.approx(0.1)
    assert limiter.take(b"polite") == 0.0  # untouched by the other client's flood
    clock.now += 0.1
    assert limiter.take(b"flood") == 0.0


def test_the_buckets_of_many_clients_stay_bounded() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, max_clients=50)
    for i in range(10_000):
        limiter.take(i.to_bytes(4, "big"))
    assert len(limiter) == 50
    # The least recently seen clients were forgotten: a recent one keeps its (spent) bucket.
    recent = (9_999).to_bytes(4, "big")
    assert limiter.take(recent) == 0.0 and limiter.take(recent) == 0.0
    assert limiter.take(recent) > 0.0


def test_replica_traffic_has_a_bucket_of_its_own() -> None:
    clock = FakeClock()
    limiter = _limiter(clock)
    request = _router_frames(m.StatusRequest())
    heartbeat = _router_frames(m.Heartbeat(service="s", replica=0, incarnation=1))
    ready = _router_frames(m.ReadyRequest(service="s", replica=0, incarnation=1, endpoint="ipc:///x", methods=[],
                                          pid=1))
    progress = _router_frames(m.ProgressRequest(service="s", replica=0, incarnation=1))
    assert is_lifecycle(heartbeat) and is_lifecycle(ready) and is_lifecycle(progress)
    assert not is_lifecycle(request)
    while limiter.take(b"svc:s.0.1", request) == 0.0:
        pass
    # The client spent its bucket on requests: its liveness messages still go through...
    assert limiter.take(b"svc:s.0.1", heartbeat) == 0.0
    assert limiter.take(b"svc:s.0.1", ready) == 0.0
    assert limiter.take(b"svc:s.0.1", progress) == 0.0
    # ...within a second bucket that is itself limited (a flooder gains nothing by naming them).
    assert limiter.take(b"svc:s.0.1", heartbeat) > 0.0
    assert limiter.take(b"svc:s.0.1", request) > 0.0


def test_rejection_replies_are_budgeted_per_client_and_second() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, rejections_per_s=2)
    limiter.take(b"a")
    limiter.take(b"b")
    assert [limiter.may_reply(b"a") for _ in range(4)] == [True, True, False, False]
    assert limiter.may_reply(b"b")  # another client's budget is its own
    clock.now += 1.0
    assert limiter.may_reply(b"a")
    assert not limiter.may_reply(b"never-seen")


def test_a_zero_rate_is_refused_by_the_limiter_itself() -> None:
    with pytest.raises(ValueError):
        RateLimiter(rate=0, burst=1, max_clients=1, rejections_per_s=1)


# --- the control socket's limiter ----------------------------------------------------------------


def test_connections_with_one_curve_key_share_its_bucket() -> None:
    class KeySocket:  # what a CURVE endpoint's socket knows while a message is handled
        peer = ""

    socket, sent = KeySocket(), []
    limiter = ControlLimiter(LimitSettings(rate_per_s=1, burst=1), send=sent.append, sender="k",
                             clock=FakeClock(), socket=socket)
    socket.peer = "alice"
    assert limiter.admit(_router_frames(m.PingRequest(), b"conn-1"))
    assert not limiter.admit(_router_frames(m.PingRequest(), b"conn-2"))  # same key, other connection
    socket.peer = ""
    assert limiter.admit(_router_frames(m.PingRequest(), b"conn-3"))  # no key: the connection itself
    assert len(sent) == 1 and sent[0][0] == b"conn-2"  # the refusal goes back where it came from
    reply = wire.decode(sent[0][1:])
    assert reply.message.code == "rate_limited" and reply.message.details["retry_after_ms"] == 1000


def test_unaddressable_or_unreadable_requests_still_get_an_uncorrelated_refusal() -> None:
    sent: list[list[bytes]] = []
    limiter = ControlLimiter(LimitSettings(rate_per_s=1, burst=1), send=sent.append, sender="k", clock=FakeClock())
    assert limiter.admit([b"c", b"garbage"])
    for frames in ([b"c", b"garbage"], [b"c", wire.MAGIC, b"\xc1", b"\x80"], [b"c", wire.MAGIC]):
        assert not limiter.admit(frames)
    for reply in sent:
        assert reply[0] == b"c"
        env = wire.decode(reply[1:])
        assert env.msg_type == "error_reply" and env.header.parent_id is None
        assert env.message.code == "rate_limited"


def test_malformed_input_is_logged_a_few_times_then_counted(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    limiter = ControlLimiter(LimitSettings(), send=lambda frames: None, sender="k", clock=clock)
    with caplog.at_level(logging.INFO, logger="microkernel.control"):
        for _ in range(BAD_INPUT_LINES + 80):
            limiter.log_rejection(b"c", "malformed: garbage")
        assert len(caplog.records) == BAD_INPUT_LINES
        clock.now += 60
        limiter.log_rejection(b"c", "malformed: garbage")
    assert "80 more malformed control messages" in caplog.records[-2].getMessage()
    assert len(caplog.records) == BAD_INPUT_LINES + 2


# --- in-flight guard -----------------------------------------------------------------------------


def _env(routing_id: bytes) -> wire.Envelope:
    return wire.decode([routing_id, *wire.encode(m.PingRequest(), sender="t")])


def test_in_flight_requests_are_capped_per_client_and_overall() -> None:
    async def scenario() -> None:
        guard = InflightGuard(per_client=2, total=3)
        release = asyncio.Event()
        calls: list[bytes] = []

        async def slow(kernel: object, env: wire.Envelope) -> str:
            calls.append(env.routing[0])
            await release.wait()
            return "done"

        handler = guard.wrap(slow, lambda rid: rid)
        tasks = [handler(None, _env(b"a")), handler(None, _env(b"a"))]
        with pytest.raises(MicrokernelError) as refused:
            handler(None, _env(b"a"))
        assert refused.value.code is ErrorCode.OVERLOADED
        assert "max_inflight_per_client" in refused.value.reason
        tasks.append(handler(None, _env(b"b")))
        with pytest.raises(MicrokernelError) as full:
            handler(None, _env(b"c"))
        assert full.value.code is ErrorCode.OVERLOADED and "max_inflight" in full.value.reason
        assert guard.count == 3 and guard.running == {b"a": 2, b"b": 1}
        await asyncio.sleep(0)  # let the tasks start
        assert calls == [b"a", b"a", b"b"]  # refused requests never ran their handler
        release.set()
        assert await asyncio.gather(*tasks) == ["done"] * 3
        assert guard.count == 0 and guard.running == {}
        # Cancelled requests give their slot back too.
        release.clear()
        pending = handler(None, _env(b"a"))
        await asyncio.sleep(0)
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        assert guard.count == 0 and guard.running == {}

    asyncio.run(scenario())


def test_a_refused_awaitable_of_a_sync_handler_is_closed_and_sync_results_pass() -> None:
    async def scenario() -> None:
        guard = InflightGuard(per_client=1, total=0)
        gate = asyncio.Event()

        async def queued() -> str:
            await gate.wait()
            return "late"

        def sometimes_async(kernel: object, env: wire.Envelope) -> object:
            return "now" if kernel == "sync" else queued()

        handler = guard.wrap(sometimes_async, lambda rid: rid)
        first = handler(None, _env(b"a"))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "coroutine was never awaited" would be a leak
            with pytest.raises(MicrokernelError):
                handler(None, _env(b"a"))
            gc.collect()
        assert handler("sync", _env(b"a")) == "now"  # answered inline: never counted
        gate.set()
        assert await first == "late"
        assert guard.count == 0

    asyncio.run(scenario())


# --- configuration -------------------------------------------------------------------------------


def test_the_limits_table_defaults_and_overrides() -> None:
    assert parse_config("").limits == LimitSettings()
    config = parse_config("""
[limits]
rate_per_s = 50.5
burst = 10
max_clients = 7
rejections_per_s = 0
max_inflight_per_client = 0
max_inflight = 9
max_queue = 20
""")
    assert config.limits == LimitSettings(rate_per_s=50.5, burst=10, max_clients=7, rejections_per_s=0,
                                          max_inflight_per_client=0, max_inflight=9, max_queue=20)


@pytest.mark.parametrize("text,key", [
    ("[limits]\nburst = 0", "limits.burst"),
    ("[limits]\nrate_per_s = -1", "limits.rate_per_s"),
    ("[limits]\nmax_queue = 0", "limits.max_queue"),
    ("[limits]\nmax_inflight = 'lots'", "limits.max_inflight"),
    ("[limits]\nrate = 5", "limits.rate"),
])
def test_bad_limits_name_the_key(text: str, key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(text)
    assert exc.value.key == key
    assert exc.value.line == 2


def test_the_rejection_report_stays_bounded_with_many_clients(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    limiter = ControlLimiter(LimitSettings(rate_per_s=1, burst=1, rejections_per_s=0), send=lambda frames: None,
                             sender="k", clock=clock)
    with caplog.at_level(logging.WARNING, logger="microkernel.limits"):
        for i in range(5000):
            frames = _router_frames(m.PingRequest(), i.to_bytes(4, "big"))
            assert limiter.admit(frames)
            assert not limiter.admit(frames)
        assert len(limiter._since_log) == 1000 + 1  # the first thousand clients, then "(others)"
        clock.now += 60
        frames = _router_frames(m.PingRequest(), b"svc:w.0.1")
        assert limiter.admit(frames) and not limiter.admit(frames)
    assert limiter.dropped == 5001 and limiter.rejected == 0
    assert len(caplog.records) == 2  # the first rejection, then one report after the interval
    report = caplog.records[1].getMessage()
    assert "rate-limited 5000 control requests from 1001 clients" in report and "(others) (4000)" in report
    assert len(limiter._since_log) == 0
