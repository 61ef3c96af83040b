"""Frame I/O of ``protocols.transport``: ``send_message`` and ``recv_message`` / ``recv_routed``
over real sockets. Every message arrives whole and alone, envelope frames (anything up to
``MK1``, ``MK1``, the header and the body) as ``bytes``, every later frame as a ``zmq.Frame``."""

from __future__ import annotations

import itertools

import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import transport, wire

MAGIC = wire.MAGIC
_addresses = itertools.count()


def _frame() -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=40), st.just(MAGIC))


@pytest.fixture(scope="module")
def pair():
    """One PAIR of sockets for the module: every test receives all it sends."""
    ctx = zmq.Context.instance()
    address = f"inproc://frames-{next(_addresses)}"
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind(address)
    b.connect(address)
    for s in (a, b):
        s.linger = 0
        s.rcvtimeo = s.sndtimeo = 10_000
    yield a, b
    a.close()
    b.close()


def _expected_types(frames: list[bytes]) -> list[type]:
    """bytes up to MK1 and the two frames after the first MK1; zmq.Frame after them."""
    if MAGIC not in frames:
        return [bytes] * len(frames)
    last_bytes = frames.index(MAGIC) + 2
    return [bytes if i <= last_bytes else zmq.Frame for i in range(len(frames))]


@settings(max_examples=150, deadline=None)
@given(messages=st.lists(st.lists(_frame(), min_size=1, max_size=7), min_size=1, max_size=4))
def test_messages_arrive_whole_in_order_with_envelope_frames_as_bytes(pair, messages: list[list[bytes]]) -> None:
    a, b = pair
    for frames in messages:
        transport.send_message(a, frames)
    for frames in messages:
        got = transport.recv_message(b)
        assert [bytes(f) for f in got] == frames
        assert [type(f) for f in got] == _expected_types(frames)


def test_a_router_receives_the_routing_id_then_the_message() -> None:
    ctx = zmq.Context.instance()
    address = f"inproc://frames-{next(_addresses)}"
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    router.bind(address)
    dealer.setsockopt(zmq.ROUTING_ID, b"\x00caller")
    dealer.connect(address)
    router.rcvtimeo = dealer.sndtimeo = 10_000
    try:
        sent = [[MAGIC, b"header", b"body", b"buffer-1", b"buffer-2"], [MAGIC, b"h", b"b"], [b"no magic"]]
        for frames in sent:
            transport.send_message(dealer, frames)
        for frames in sent:
            got = transport.recv_routed(router)
            assert got[0] == b"\x00caller" and type(got[0]) is bytes
            assert [bytes(f) for f in got[1:]] == frames
            assert [type(f) for f in got[1:]] == _expected_types(frames)
    finally:
        router.close(linger=0)
        dealer.close(linger=0)


def test_a_message_mixing_small_frames_and_a_large_buffer_arrives_intact(pair) -> None:
    a, b = pair
    large = bytes(range(256)) * 1024  # 256 KiB: past the zero-copy threshold
    assert len(large) >= transport.ZERO_COPY_THRESHOLD
    frames = [MAGIC, b"header", b"body", large, memoryview(b"small view"), b"tail"]
    transport.send_message(a, frames)
    got = transport.recv_message(b)
    assert [bytes(f) for f in got] == [bytes(f) for f in frames]


def test_recv_message_with_noblock_raises_again_when_nothing_is_queued(pair) -> None:
    _, b = pair
    with pytest.raises(zmq.Again):
        transport.recv_message(b, transport.NOBLOCK)
