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


# --- recv_reply: a DEALER's receive, MK1 and the header as copies -----------------------------------

_HEADER = st.binary(min_size=1, max_size=30).map(lambda b: b"\x87" + b)  # a msgpack map's first byte
_VALID = st.builds(lambda h, b, bufs: [MAGIC, h, b"\x81" + b, *bufs],
                   _HEADER, st.binary(max_size=30), st.lists(st.one_of(st.binary(max_size=20), st.just(MAGIC)), max_size=2))
_MALFORMED = st.one_of(
    st.just([MAGIC]),                                          # a lone MK1
    _HEADER.map(lambda h: [MAGIC, h]),                         # no body
    st.lists(_frame(), min_size=1, max_size=4).filter(lambda f: f[0] != MAGIC),  # not a reply at all
)


def _is_reply(frames: list[bytes]) -> bool:
    return len(frames) >= 3 and frames[0] == MAGIC and frames[1][:1] == b"\x87" and frames[2][:1] == b"\x81"


@pytest.fixture(scope="module")
def dealer_peers():
    """A DEALER with two ROUTER peers, as a client with two replicas of a service."""
    ctx = zmq.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.linger = 0
    dealer.rcvtimeo = 10_000
    routers = []
    for _ in range(2):
        address = f"inproc://replies-{next(_addresses)}"
        router = ctx.socket(zmq.ROUTER)
        router.linger = 0
        router.bind(address)
        dealer.connect(address)
        routers.append(router)
    for router in routers:  # each router learns the dealer's routing id
        dealer.send(b"hello")
    ids = []
    for router in routers:
        router.rcvtimeo = 10_000
        ids.append(router.recv_multipart()[0])
    yield dealer, list(zip(routers, ids))
    transport.forget(dealer)
    dealer.close()
    for router in routers:
        router.close()


@settings(max_examples=300, deadline=None)
@given(script=st.lists(st.tuples(st.integers(0, 1), st.one_of(_VALID, _MALFORMED)), min_size=1, max_size=8))
def test_recv_reply_returns_every_valid_reply_whole_whatever_malformed_ones_come_between(
        dealer_peers, script: list[tuple[int, list[bytes]]]) -> None:
    dealer, peers = dealer_peers
    # Every valid reply made unique (its position in the body), so each can be told from the others.
    script = [(peer, [*frames[:2], frames[2] + b"#%d" % i, *frames[3:]] if _is_reply(frames) else frames)
              for i, (peer, frames) in enumerate(script)]
    ends = [[MAGIC, b"\x87end", b"\x81" + bytes([peer])] for peer in (0, 1)]
    for peer, frames in script:
        router, ident = peers[peer]
        transport.send_message(router, [ident, *frames])
    for (router, ident), end in zip(peers, ends):  # each peer's last message: a valid reply
        transport.send_message(router, [ident, *end])
    # Receive until both ends came (each peer's messages arrive in its order, so all of the script's
    # did): every valid reply must come back intact, never merged with anything, in its peer's order.
    valid = [frames for _, frames in script if _is_reply(frames)]
    got = []
    while not all(end in [[bytes(f) for f in frames] for frames in got] for end in ends):
        got.append(transport.recv_reply(dealer))  # rcvtimeo: a ceiling, never reached when this works
    received_valid = [[bytes(f) for f in frames] for frames in got
                      if len(frames) >= 3 and frames[0] == MAGIC and bytes(frames[1])[:1] == b"\x87"
                      and bytes(frames[2])[:1] == b"\x81" and [bytes(f) for f in frames] not in ends]
    for frames in received_valid:
        assert frames in valid, f"a reply that was never sent: {frames}\nsent {script}\ngot {got}"
    for peer in (0, 1):
        mine = [frames for p, frames in script if p == peer and frames in valid]
        assert [f for f in received_valid if f in mine] == mine, f"sent {script}\ngot {got}"
    # Envelope frames are bytes, buffers zmq.Frame, as recv_message gives them.
    for frames in got:
        if frames[0] == MAGIC and len(frames) >= 3:
            assert all(type(f) is bytes for f in frames[:3]) and all(type(f) is zmq.Frame for f in frames[3:])
    assert not transport._held.get(dealer)


def test_recv_reply_gives_a_lone_mk1_back_as_it_is_and_the_next_reply_whole(dealer_peers) -> None:
    dealer, peers = dealer_peers
    router, ident = peers[0]
    router.send_multipart([ident, MAGIC])
    assert transport.recv_reply(dealer) == [MAGIC]  # nothing after it: the receive does not wait
    router.send_multipart([ident, MAGIC])
    router.send_multipart([ident, MAGIC, b"\x87h"])
    router.send_multipart([ident, MAGIC, b"\x87h2", b"\x81b2", b"buffer"])
    assert transport.recv_reply(dealer) == [MAGIC]
    assert transport.recv_reply(dealer) == [MAGIC, b"\x87h"]
    got = transport.recv_reply(dealer)
    assert got[:3] == [MAGIC, b"\x87h2", b"\x81b2"] and bytes(got[3]) == b"buffer" and len(got) == 4
    assert not transport._held


def test_recv_reply_reads_a_message_that_is_no_reply_to_its_end(dealer_peers) -> None:
    dealer, peers = dealer_peers
    router, ident = peers[1]
    router.send_multipart([ident, b"junk", MAGIC, b"x"])
    router.send_multipart([ident, MAGIC, b"\x87h", b"\x81b"])
    assert transport.recv_reply(dealer) == [b"junk", MAGIC, b"x"]
    assert transport.recv_reply(dealer) == [MAGIC, b"\x87h", b"\x81b"]
    with pytest.raises(zmq.Again):
        transport.recv_reply(dealer, transport.NOBLOCK)
