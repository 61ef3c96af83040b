"""Limits on a real daemon: oversized messages, floods, request rates. The kernel keeps serving."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from microkernel.client import Client
from protocols import messages as m
from protocols import wire
from protocols.errors import RemoteError
from protocols.subscription import SyncSubscriber
from microkernel.security.keys import write_key_pair
from microkernel.supervisor.distributed import free_port
from tests.integration.conftest import KernelHandle, start_kernel

CEILING_MS = 10_000
CEILING = CEILING_MS / 1000


def _socket(ctx: zmq.Context, kind: int, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.linger = 0
    sock.connect(endpoint)
    return sock


def _wait_event(monitor: zmq.Socket, wanted: int) -> None:
    """Wait (with a ceiling) for a socket monitor event of kind ``wanted``."""
    while True:
        assert monitor.poll(CEILING_MS), f"no monitor event {wanted} within {CEILING:g}s"
        if recv_monitor_message(monitor)["event"] == wanted:
            return


def _synced_publisher(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    """An XPUB connected to the bus's publish side, returned once the bus has subscribed to it
    (before that, ZeroMQ would drop what it publishes)."""
    pub = _socket(ctx, zmq.XPUB, endpoint)
    assert pub.poll(CEILING_MS), "the event bus never subscribed to the publisher"
    assert pub.recv()[:1] == b"\x01"
    return pub


def _event(topic: str, **data: object) -> list[bytes]:
    return wire.encode(wire.Event(topic, dict(data)), sender="limits-test", topic=topic)


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


SMALL = """
[kernel]
max_message_size = "1MiB"
"""


@pytest.mark.parametrize("kernel_config", [SMALL])
def test_an_oversized_control_frame_disconnects_its_sender_and_the_kernel_keeps_serving(
    kernel: KernelHandle, ctx: zmq.Context
) -> None:
    # 2 MiB: over the protocol limit, answered with too_large; 5 MiB: over ZeroMQ's cap (4x), the
    # peer is disconnected before the kernel buffers it.
    dealer = _socket(ctx, zmq.DEALER, kernel.endpoints.control)
    dealer.send_multipart(wire.encode(m.PingRequest(), sender="t", msg_id=b"big") + [b"z" * (2 << 20)])
    assert dealer.poll(CEILING_MS)
    reply = wire.decode(dealer.recv_multipart())
    assert reply.is_error and reply.message.code == "too_large" and reply.header.parent_id == b"big"

    monitor = dealer.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    dealer.send_multipart(wire.encode(m.PingRequest(), sender="t") + [b"z" * (5 << 20)])
    _wait_event(monitor, zmq.EVENT_DISCONNECTED)
    dealer.disable_monitor()
    monitor.close()
    dealer.close()
    assert kernel.proc.poll() is None
    with Client(runtime_dir=kernel.runtime_dir) as client:
        assert client.ping()["pid"] == kernel.proc.pid


@pytest.mark.parametrize("kernel_config", [SMALL])
def test_an_oversized_event_or_subscription_does_not_stop_the_bus(kernel: KernelHandle, ctx: zmq.Context) -> None:
    subscriber = SyncSubscriber(ctx, kernel.endpoints.events_out, ["limits.*"], timeout=CEILING)
    try:
        big = _synced_publisher(ctx, kernel.endpoints.events_in)
        other = _synced_publisher(ctx, kernel.endpoints.events_in)
        monitor = big.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        big.send_multipart(_event("limits.big", blob=b"z" * (2 << 20)))
        _wait_event(monitor, zmq.EVENT_DISCONNECTED)  # the bus refused the frame and dropped the publisher
        big.disable_monitor()
        monitor.close()
        other.send_multipart(_event("limits.ok", n=1))
        first = subscriber.next_event(timeout=CEILING)
        assert first is not None and first.topic == "limits.ok"
        # The dropped publisher reconnects by itself; once the bus subscribes again it is heard.
        assert big.poll(CEILING_MS) and big.recv()[:1] == b"\x01"
        big.send_multipart(_event("limits.ok", n=2))
        second = subscriber.next_event(timeout=CEILING)
        assert second is not None and second.topic == "limits.ok" and second.message.data == {"n": 2}
        for sock in (big, other):
            sock.close()
        # The subscribe side takes subscriptions (topic prefixes) of at most 64 KiB.
        greedy = ctx.socket(zmq.SUB)
        greedy.linger = 0
        monitor = greedy.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        greedy.setsockopt(zmq.SUBSCRIBE, b"x" * (100 << 10))
        greedy.connect(kernel.endpoints.events_out)
        _wait_event(monitor, zmq.EVENT_DISCONNECTED)
        greedy.disable_monitor()
        monitor.close()
        greedy.close()
    finally:
        subscriber.close()
    assert kernel.proc.poll() is None
    SyncSubscriber(ctx, kernel.endpoints.events_out, ["kernel.*"], timeout=CEILING).close()  # welcomed: alive


RATED = """
[limits]
rate_per_s = 100
burst = 50
rejections_per_s = 100000
"""


def test_a_flooding_client_is_rate_limited_while_a_polite_one_is_served(short_tmp: str, ctx: zmq.Context) -> None:
    with start_kernel(RATED, short_tmp) as kernel:
        flood = _socket(ctx, zmq.DEALER, kernel.endpoints.control)
        polite_errors: list[BaseException] = []
        polite_done = threading.Event()

        def polite() -> None:
            try:
                with Client(runtime_dir=kernel.runtime_dir) as client:
                    for _ in range(20):
                        client.ping()
            except BaseException as exc:  # reported by the main thread
                polite_errors.append(exc)
            finally:
                polite_done.set()

        thread = threading.Thread(target=polite)
        thread.start()
        total, window = 3000, 500  # fewer unanswered than the kernel queues per peer (max_queue)
        sent = ok = limited = 0
        while ok + limited < total:
            while sent < total and sent - (ok + limited) < window:
                flood.send_multipart(wire.encode(m.PingRequest(), sender="flood", msg_id=b"f%06d" % sent))
                sent += 1
            assert flood.poll(CEILING_MS), f"only {ok + limited} of {sent} requests were answered"
            reply = wire.decode(flood.recv_multipart())
            if not reply.is_error:
                ok += 1
                continue
            assert reply.message.code == "rate_limited", reply.message
            assert reply.message.details["retry_after_ms"] >= 1
            limited += 1
        assert polite_done.wait(CEILING * 3)
        thread.join()
        assert not polite_errors, polite_errors
        assert ok >= 50 and limited > 0
        flood.close()


def test_a_client_that_floods_and_never_reads_cannot_grow_the_kernel(kernel: KernelHandle, ctx: zmq.Context) -> None:
    daemon = psutil.Process(kernel.proc.pid)
    with Client(runtime_dir=kernel.runtime_dir, timeout=CEILING) as client:
        client.status()
        rss_before = daemon.memory_info().rss
        stop, progress = threading.Event(), threading.Event()
        sent = [0]

        def flood() -> None:
            sock = _socket(ctx, zmq.DEALER, kernel.endpoints.control)
            frames = wire.encode(m.StatusRequest(), sender="flood")
            try:
                while not stop.is_set():
                    try:
                        sock.send_multipart(frames, zmq.NOBLOCK)
                        sent[0] += 1
                        if sent[0] % 1000 == 0:
                            progress.set()
                    except zmq.Again:  # our queue is full: wait until the kernel takes more
                        sock.poll(100, zmq.POLLOUT)
            finally:
                sock.close()

        thread = threading.Thread(target=flood)
        thread.start()
        try:
            calls = 0
            while sent[0] < 100_000:
                # Once per 1000 flood messages: a polite client stays far below its own rate limit.
                assert progress.wait(CEILING), f"the flood stalled at {sent[0]} messages"
                progress.clear()
                assert client.status()["kernel"]["pid"] == kernel.proc.pid
                calls += 1
            assert calls >= 5  # served while the flood ran (progress signals may coalesce)
        finally:
            stop.set()
            thread.join()
        growth = daemon.memory_info().rss - rss_before
        print(f"flood: {sent[0]} requests, {calls} status calls, rss growth {growth / 2**20:.1f} MiB")
        assert growth < 200 * 1024 * 1024, f"the kernel grew by {growth / 2**20:.0f} MiB"
        assert client.ping()["pid"] == kernel.proc.pid


def test_connections_made_with_one_curve_key_share_its_rate(short_tmp: str) -> None:
    workdir = Path(short_tmp)
    keys, authorized = workdir / "keys", workdir / "authorized"
    authorized.mkdir()
    for name in ("server", "alice", "bob"):
        write_key_pair(keys, name)
    for name in ("alice", "bob"):
        shutil.copy(keys / f"{name}.key", authorized)
    control = f"tcp://127.0.0.1:{free_port()}"
    config = f"""
[security]
control_tcp = "{control}"
server_secret_key = "{keys}/server.key_secret"
authorized_keys = "{authorized}"
[limits]
rate_per_s = 0.01
burst = 3
"""

    def client(name: str) -> Client:
        return Client(control, timeout=CEILING, client_key=keys / f"{name}.key_secret", server_key=keys / "server.key")

    with start_kernel(config, workdir), client("alice") as first, client("alice") as second, client("bob") as other:
        for _ in range(3):
            first.ping()
        with pytest.raises(RemoteError) as refused:
            second.ping()  # a new connection, the same key: the same bucket
        assert refused.value.code.value == "rate_limited" and refused.value.details["retry_after_ms"] > 0
        assert other.ping()["pid"] > 0  # another key has its own
