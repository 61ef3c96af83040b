"""The limits wired into a real ControlRouter on an inproc socket: what a client sees on the wire."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import zmq

from protocols import messages as m
from protocols import wire
from protocols.subscription import AsyncSubscriber
from protocols.transport import AsyncRequester, AsyncSocket, SyncRequester, frame_size_limit
from microkernel.bus.control import ControlRouter
from microkernel.limits import LimitSettings
from services.dataplane import DataPlane
from services.events import SUBSCRIPTION_MAX_SIZE, EventPublisher

CEILING = 10.0  # seconds; every wait returns as soon as its condition holds


class FakeClock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


class Peer:
    """A DEALER in the test's loop that collects the replies it gets."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(endpoint)
        self.replies: list[wire.Envelope] = []
        self._changed = asyncio.Event()
        self.socket = AsyncSocket(sock, self._on_message)

    def _on_message(self, frames: list[Any]) -> None:
        self.replies.append(wire.decode(frames))
        self._changed.set()

    def send(self, message: Any, msg_id: bytes) -> None:
        self.socket.send(wire.encode(message, sender="t", msg_id=msg_id))

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(CEILING):
            while not condition():
                self._changed.clear()
                await self._changed.wait()


def _handled(router: ControlRouter) -> tuple[Callable[[], int], Callable[[int], Awaitable[None]]]:
    """A count of the messages the router has taken in, and a wait for it to reach ``n``."""
    seen = [0]
    changed = asyncio.Event()
    inner = router.socket.on_message

    def counting(frames: list[Any]) -> None:
        inner(frames)
        seen[0] += 1
        changed.set()

    router.socket.on_message = counting

    async def wait(n: int) -> None:
        async with asyncio.timeout(CEILING):
            while seen[0] < n:
                changed.clear()
                await changed.wait()

    return (lambda: seen[0]), wait


def _run(limits: LimitSettings, handlers: dict[type, Any], scenario: Callable[..., Awaitable[None]]) -> None:
    async def main() -> None:
        ctx = zmq.Context()
        endpoint = f"inproc://limits-{id(scenario):x}"
        router = ControlRouter(ctx, endpoint, handlers=handlers, kernel=None, max_size=1 << 20, limits=limits)
        peers: list[Peer] = []
        try:
            await scenario(router, lambda: peers.append(Peer(ctx, endpoint)) or peers[-1])
        finally:
            for peer in peers:
                peer.socket.close()
            router.close()
            ctx.term()

    asyncio.run(main())


def _ping(kernel: Any, env: wire.Envelope) -> m.PingReply:
    return m.PingReply(version="t", pid=1, uptime_s=0.0)


def test_a_client_over_its_rate_gets_rate_limited_then_silence_and_others_are_served() -> None:
    limits = LimitSettings(rate_per_s=10, burst=5, rejections_per_s=3)

    async def scenario(router: ControlRouter, new_peer: Callable[[], Peer]) -> None:
        clock = FakeClock()
        assert router.limiter.rate is not None
        router.limiter.rate.clock = clock
        count, handled = _handled(router)
        flood, polite = new_peer(), new_peer()
        for i in range(12):
            flood.send(m.PingRequest(), msg_id=b"flood-%04d" % i)
        await handled(12)
        polite.send(m.PingRequest(), msg_id=b"polite")
        await polite.wait_for(lambda: len(polite.replies) == 1)
        assert not polite.replies[0].is_error
        # A second later the flooder has tokens again; its marker request is answered after
        # everything it sent before (one peer's messages and replies keep their order).
        clock.now += 1.0
        flood.send(m.PingRequest(), msg_id=b"marker")
        await flood.wait_for(lambda: any(r.header.parent_id == b"marker" for r in flood.replies))
        ok = [r for r in flood.replies if not r.is_error]
        limited = [r for r in flood.replies if r.is_error]
        assert [r.header.parent_id for r in ok] == [b"flood-%04d" % i for i in range(5)] + [b"marker"]
        assert [r.header.parent_id for r in limited] == [b"flood-%04d" % i for i in range(5, 8)]
        for reply in limited:
            assert reply.message.code == "rate_limited"
            assert reply.msg_type == "ping_reply"
            assert 0 < reply.message.details["retry_after_ms"] <= 100  # one token comes back in 1/rate s
            assert "limits.rate_per_s" in reply.message.reason
        assert router.limiter.rejected == 3 and router.limiter.dropped == 4
        assert count() == 14

    _run(limits, {m.PingRequest: _ping}, scenario)


def test_requests_beyond_the_in_flight_cap_get_overloaded_at_once() -> None:
    limits = LimitSettings(max_inflight_per_client=2, max_inflight=100)
    release = asyncio.Event()

    async def slow_status(kernel: Any, env: wire.Envelope) -> m.StatusReply:
        await release.wait()
        return m.StatusReply(kernel={}, services=[])

    async def scenario(router: ControlRouter, new_peer: Callable[[], Peer]) -> None:
        busy, other = new_peer(), new_peer()
        for i in range(3):
            busy.send(m.StatusRequest(), msg_id=b"s%d" % i)
        await busy.wait_for(lambda: len(busy.replies) == 1)
        refused = busy.replies[0]
        assert refused.is_error and refused.message.code == "overloaded"
        assert refused.header.parent_id == b"s2"
        other.send(m.StatusRequest(), msg_id=b"o")  # another client still has room
        busy.send(m.PingRequest(), msg_id=b"p")  # and synchronous requests are never counted
        await busy.wait_for(lambda: len(busy.replies) == 2)
        assert busy.replies[1].header.parent_id == b"p" and not busy.replies[1].is_error
        assert max(router.limiter.inflight.running.values()) == 2  # busy's two, still running
        release.set()
        await busy.wait_for(lambda: len(busy.replies) == 4)
        await other.wait_for(lambda: len(other.replies) == 1)
        assert not any(r.is_error for r in busy.replies[1:] + other.replies)
        assert router.limiter.inflight.count == 0

    _run(limits, {m.PingRequest: _ping, m.StatusRequest: slow_status}, scenario)


def test_every_request_reply_socket_and_subscriber_caps_its_frames() -> None:
    async def main() -> None:
        ctx = zmq.Context()
        limit = 1 << 20
        router = ControlRouter(ctx, "inproc://caps-control", handlers={}, kernel=None, max_size=limit,
                               limits=LimitSettings(max_queue=77))
        plane = DataPlane(ctx, "inproc://caps-plane", {}, service="s", sender="s", log=logging.getLogger("t"),
                          max_size=limit)
        sockets = [router.socket.sock, plane.socket.sock]
        closers = [router.close, plane.socket.close]
        sync = SyncRequester(ctx, ["inproc://caps-control"], sender="t", max_size=limit)
        requester = AsyncRequester(ctx, ["inproc://caps-control"], sender="t", max_size=limit)
        subscriber = AsyncSubscriber(ctx, "inproc://caps-events", ["*"], lambda env: None, max_size=limit)
        sockets += [sync.sock, requester.socket.sock, subscriber.socket.sock]
        closers += [sync.close, requester.close, subscriber.close]
        try:
            assert [s.getsockopt(zmq.MAXMSGSIZE) for s in sockets] == [frame_size_limit(limit)] * 5 == [4 << 20] * 5
            assert router.socket.sock.getsockopt(zmq.SNDHWM) == router.socket.sock.getsockopt(zmq.RCVHWM) == 77
            unlimited = SyncRequester(ctx, ["inproc://caps-control"], sender="t")
            assert unlimited.sock.getsockopt(zmq.MAXMSGSIZE) == -1  # no limit given: ZeroMQ's default
            unlimited.close()
            # A replica's event publisher only receives subscriptions: capped at the subscribe side's size.
            publisher = EventPublisher(ctx, "inproc://caps-events-in", sender="s", log=logging.getLogger("t"))
            assert publisher.socket.sock.getsockopt(zmq.MAXMSGSIZE) == SUBSCRIPTION_MAX_SIZE == 64 * 1024
            publisher.socket.close()
        finally:
            for close in closers:
                close()
            ctx.term()

    asyncio.run(main())


def test_a_decoder_failure_other_than_a_protocol_error_still_gets_a_reply(monkeypatch: Any) -> None:
    """Whatever goes wrong while decoding, the sender hears ``internal`` and the router keeps serving."""
    import microkernel.bus.control as control

    real_decode = wire.decode

    def decode(frames: Any, **kwargs: Any) -> wire.Envelope:
        env = real_decode(frames, **kwargs)
        if env.header.msg_id == b"boom":
            raise RecursionError("maximum recursion depth exceeded")
        return env

    monkeypatch.setattr(control.wire, "decode", decode)

    async def scenario(router: ControlRouter, new_peer: Callable[[], Peer]) -> None:
        peer = new_peer()
        peer.send(m.PingRequest(), msg_id=b"boom")
        peer.send(m.PingRequest(), msg_id=b"after")
        await peer.wait_for(lambda: len(peer.replies) == 2)
        error, ok = peer.replies
        assert error.is_error and error.message.code == "internal" and "RecursionError" in error.message.reason
        assert not ok.is_error and ok.header.parent_id == b"after"

    _run(LimitSettings(), {m.PingRequest: _ping}, scenario)
