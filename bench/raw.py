"""Raw pyzmq baselines, measured in the same run as our figures.

Servers run as separate processes (``python bench/raw.py serve-sync|serve-async|publish ...``);
each prints one line once its socket is bound and exits when its stdin closes. The client-side
loops (latency, pipelined, subscribe) are plain functions used by ``bench/rpc.py`` for both the
raw baselines and our stack, so both sides are measured by the same code where possible.

Payload: the same ~100-byte msgpack map (``{"text": 91 chars}``) everywhere. Raw servers unpack
the request and pack a reply, like a real handler would.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import msgpack
import zmq

from bench.harness import PAYLOAD_TEXT

# --- servers (separate processes) ---------------------------------------------------------------


def _exit_on_stdin_eof() -> None:
    def watch() -> None:
        try:
            while sys.stdin.buffer.read(4096):
                pass
        finally:
            os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def _ready(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def serve_sync(endpoint: str) -> None:
    """Blocking ROUTER echo: recv, unpack, pack, send. The ceiling for Python."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    sock.bind(endpoint)
    _exit_on_stdin_eof()
    _ready(f"ready {os.getpid()}")
    recv, send, unpackb, packb = sock.recv_multipart, sock.send_multipart, msgpack.unpackb, msgpack.packb
    while True:
        ident, body = recv()
        req = unpackb(body)
        send([ident, packb({"text": req["text"]})])


def serve_async(endpoint: str) -> None:
    """uvloop + loop.add_reader on the zmq FD, draining with NOBLOCK: the fastest asyncio pattern."""
    import asyncio

    import uvloop

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    sock.bind(endpoint)
    _exit_on_stdin_eof()
    recv, send, unpackb, packb = sock.recv_multipart, sock.send_multipart, msgpack.unpackb, msgpack.packb
    NOBLOCK, Again = zmq.NOBLOCK, zmq.Again

    async def main() -> None:
        loop = asyncio.get_running_loop()
        pending = [False]

        def drain() -> None:
            while True:
                try:
                    ident, body = recv(NOBLOCK)
                except Again:
                    return
                req = unpackb(body)
                send([ident, packb({"text": req["text"]})], NOBLOCK)

        def check() -> None:
            pending[0] = False
            # The FD is edge-triggered: after sending, re-check EVENTS or arrivals go unnoticed.
            if sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                on_ready()

        def on_ready() -> None:
            drain()
            if not pending[0]:
                pending[0] = True
                loop.call_soon(check)

        loop.add_reader(sock.getsockopt(zmq.FD), on_ready)
        loop.call_soon(check)
        _ready(f"ready {os.getpid()}")
        await asyncio.Event().wait()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


def serve_publish(endpoint: str) -> None:
    """XPUB that publishes ``n`` events of ``size`` bytes per stdin command ``<n> <size>``.

    XPUB (not PUB) so the publisher can see the subscription arrive and answer a welcome on it,
    exactly like the kernel does: no slow-joiner sleep. Replies ``sent <n>`` on stdout.
    """
    ctx = zmq.Context()
    sock = ctx.socket(zmq.XPUB)
    sock.linger = 0
    sock.bind(endpoint)
    _ready(f"ready {os.getpid()}")
    packb = msgpack.packb
    send = sock.send_multipart
    topic = b"bench.tick"
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "welcome":  # wait for a subscription, answer on its topic
            sub = sock.recv()
            while not (sub[:1] == b"\x01" and sub[1:].startswith(b"_welcome")):
                sub = sock.recv()
            send([sub[1:], packb({"welcome": True})])
            _ready("welcomed")
            continue
        n, size = int(cmd[0]), int(cmd[1])
        data = "x" * size
        for i in range(n):
            send([topic, packb({"seq": i, "data": data})])
        _ready(f"sent {n}")
    os._exit(0)


# --- client loops (in the benchmark process) ---------------------------------------------------


def latency_raw(sock: zmq.Socket, n: int) -> list[int]:
    """Round trips of the raw sync client (DEALER): pack, send, recv, unpack. Nanoseconds each."""
    packb, unpackb = msgpack.packb, msgpack.unpackb
    send, recv = sock.send, sock.recv
    clock = time.perf_counter_ns
    out = []
    for _ in range(n):
        t0 = clock()
        send(packb({"text": PAYLOAD_TEXT}))
        reply = unpackb(recv())
        out.append(clock() - t0)
        assert reply["text"] == PAYLOAD_TEXT
    return out


def pipelined_raw(sock: zmq.Socket, n: int, window: int) -> float:
    """Messages/s with ``window`` requests in flight from one DEALER."""
    packb, unpackb = msgpack.packb, msgpack.unpackb
    send, recv = sock.send, sock.recv
    t0 = time.perf_counter()
    sent = 0
    for _ in range(min(window, n)):
        send(packb({"text": PAYLOAD_TEXT}))
        sent += 1
    for _ in range(n):
        unpackb(recv())
        if sent < n:
            send(packb({"text": PAYLOAD_TEXT}))
            sent += 1
    return n / (time.perf_counter() - t0)


def subscribe_count(next_event: Callable[[], Any], seq_of: Callable[[Any], int], n: int) -> dict[str, Any]:
    """Receive events with ``next_event()`` until seq ``n - 1`` arrives (or it returns None: idle).

    Returns the receive rate between the first and the last event and how many arrived (PUB
    sockets drop at their high-water mark when the receiver is slower than the sender).
    """
    got = 0
    first = last = 0.0
    clock = time.perf_counter
    while True:
        ev = next_event()
        if ev is None:
            break
        last = clock()
        if got == 0:
            first = last
        got += 1
        if seq_of(ev) >= n - 1:
            break
    rate = (got - 1) / (last - first) if got > 1 and last > first else 0.0
    return {"received": got, "per_s": rate}


def raw_pubsub(endpoint: str, n: int, size: int, rounds: int) -> dict[str, Any]:
    """PUB→SUB with msgpack pack (publisher process) + unpack (here); best-of ``rounds`` rate."""
    from bench.harness import Helper

    ctx = zmq.Context.instance()
    with Helper([__file__, "publish", endpoint]) as pub:
        sub = ctx.socket(zmq.SUB)
        sub.linger = 0
        sub.setsockopt(zmq.SUBSCRIBE, b"bench.")
        sub.setsockopt(zmq.SUBSCRIBE, b"_welcome")
        sub.connect(endpoint)
        assert pub.proc.stdin is not None
        pub.proc.stdin.write(b"welcome\n")
        pub.proc.stdin.flush()
        sub.recv_multipart()  # the welcome: our subscriptions are live
        assert pub.read_line() == "welcomed"
        unpackb = msgpack.unpackb
        recv = sub.recv_multipart

        poll = sub.poll

        def next_event() -> Any:  # poll + recv + unpack: what a subscriber with a timeout does
            if not poll(2000):
                return None
            return unpackb(recv()[1])

        results = []
        for _ in range(rounds):
            pub.proc.stdin.write(f"{n} {size}\n".encode())
            pub.proc.stdin.flush()
            results.append(subscribe_count(next_event, lambda ev: ev["seq"], n))
            pub.read_line()
        sub.close()
    best = max(results, key=lambda r: r["per_s"])
    return best


def main(argv: list[str]) -> None:
    cmd, endpoint = argv[0], argv[1]
    {"serve-sync": serve_sync, "serve-async": serve_async, "publish": serve_publish}[cmd](endpoint)


if __name__ == "__main__":
    main(sys.argv[1:])
