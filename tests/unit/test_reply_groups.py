"""Replies to a burst leave in groups: ``AsyncSocket.send_soon`` and the data plane's quick handlers.

Real sockets over inproc, where a message the socket sends is at once readable by its peer in
the same thread: what the peer can read while a message is handled shows what has left.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import zmq

from protocols import transport, wire
from protocols.transport import AsyncSocket, recv_reply
from services.base import Service, rpc
from services.dataplane import DataPlane
from services.handlers import bind_rpc_handlers

CEILING = 10.0


class Peer:
    """The DEALER end of a burst, and the replies it has read so far."""

    def __init__(self, dealer: zmq.Socket) -> None:
        self.dealer = dealer
        self.received: list[bytes] = []

    def read(self) -> int:
        """Read every reply that has left; how many there are in all."""
        while True:
            try:
                self.received.append(self.dealer.recv_multipart(zmq.NOBLOCK)[-1])
            except zmq.Again:
                return len(self.received)


async def _burst(name: str, count: int, on_message: Any) -> list[bytes]:
    """``count`` messages queued before the socket's first drain, each handled by
    ``on_message(socket, frames, peer)``; returns the replies the peer received, in order."""
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.bind(f"inproc://{name}")
    dealer = ctx.socket(zmq.DEALER)
    dealer.linger = 0
    dealer.connect(f"inproc://{name}")
    for k in range(count):
        dealer.send_multipart([b"MK1", str(k).encode()])
    peer = Peer(dealer)
    handled = asyncio.Event()
    holder: list[AsyncSocket] = []

    def handle(frames: list[Any]) -> None:
        on_message(holder[0], frames, peer)
        if int(frames[-1]) == count - 1:
            handled.set()  # wakes the test after this drain, which sends what it holds first

    socket = AsyncSocket(router, handle)  # its first drain runs on the loop's next turn
    holder.append(socket)
    try:
        async with asyncio.timeout(CEILING):
            await handled.wait()
        peer.read()
        return peer.received
    finally:
        socket.close()
        dealer.close()


def _numbers(count: int) -> list[bytes]:
    return [str(k).encode() for k in range(count)]


def test_a_burst_is_answered_in_groups_in_order_and_the_first_reply_leaves_at_once() -> None:
    group = transport.COALESCE
    count = 3 * group + 3
    seen: list[int] = []  # how many replies the peer had when message k was handled

    def on_message(socket: AsyncSocket, frames: list[Any], peer: Peer) -> None:
        seen.append(peer.read())
        socket.send_soon([frames[0], frames[-1]])

    assert asyncio.run(_burst("groups", count, on_message)) == _numbers(count)
    # The first reply at once; then a group each time `group` replies are held; the rest at the end.
    assert seen == [0] + [1 + group * ((k - 1) // group) for k in range(1, count)]


def test_a_send_after_held_replies_sends_them_first() -> None:
    def on_message(socket: AsyncSocket, frames: list[Any], peer: Peer) -> None:
        if frames[-1] == b"3":
            socket.send([frames[0], frames[-1]])  # at once, after the replies held before it
        else:
            socket.send_soon([frames[0], frames[-1]])

    assert asyncio.run(_burst("in-order", 6, on_message)) == _numbers(6)


def test_release_sends_the_held_replies_before_a_long_piece_of_work() -> None:
    at_release: list[int] = []

    def on_message(socket: AsyncSocket, frames: list[Any], peer: Peer) -> None:
        if frames[-1] == b"4":
            socket.release()
            at_release.append(peer.read())
        socket.send_soon([frames[0], frames[-1]])

    assert asyncio.run(_burst("release", 6, on_message)) == _numbers(6)
    assert at_release == [4]  # replies 0-3 had left when message 4's work began


class Calls(Service):
    def __init__(self) -> None:
        super().__init__()
        self.earlier_replies_arrived = threading.Event()

    @rpc
    def echo(self, text: str) -> dict[str, Any]:
        return {"text": text}

    @rpc
    def wait_for_earlier_replies(self) -> bool:
        # Blocks the loop until the caller has the replies to the calls made before this one.
        return self.earlier_replies_arrived.wait(CEILING)


def test_replies_do_not_wait_for_a_handler_whose_last_call_was_not_quick() -> None:
    earlier = 5

    async def main() -> None:
        ctx = zmq.Context.instance()
        service = Calls()
        handlers = bind_rpc_handlers(service)
        dp = DataPlane(ctx, "inproc://quick-handlers", handlers, service="calls", sender="svc:calls.0.1",
                       log=logging.getLogger("test"))
        dp.serve()
        caller = ctx.socket(zmq.DEALER)
        caller.linger = 0
        caller.connect("inproc://quick-handlers")
        encode = wire.RpcRequestEncoder("t").encode
        deadline = time.time_ns() + 60_000_000_000
        # The whole burst is queued before the data plane's first drain.
        for k in range(earlier):
            transport.send_message(caller, encode("echo", {"text": str(k)}, wire.new_msg_id(), deadline))
        transport.send_message(caller, encode("wait_for_earlier_replies", {}, wire.new_msg_id(), deadline))

        def receive_all() -> list[Any]:
            results = []
            caller.rcvtimeo = int(CEILING * 1000)
            for k in range(earlier + 1):
                usual = wire.decode_rpc_reply(recv_reply(caller), None)
                assert usual is not None
                results.append(usual[1])
                if k == earlier - 1:
                    service.earlier_replies_arrived.set()
            return results

        try:
            results = await asyncio.to_thread(receive_all)
        finally:
            dp.close(linger=0)
            caller.close()
        assert results == [{"text": str(k)} for k in range(earlier)] + [True]
        assert handlers["echo"].quick and not handlers["wait_for_earlier_replies"].quick

    asyncio.run(main())
