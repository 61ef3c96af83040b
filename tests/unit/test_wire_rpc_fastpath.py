"""The hot paths (``RpcRequestEncoder``, ``RpcReplyEncoder``, ``decode_rpc_reply``,
``SyncRequester.call`` and the publishers' ``EventEncoder``) give exactly what the general
encoder and decoder give, and leave everything unusual to them."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import Iterator
from unittest import mock

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import messages as m
from protocols import transport, wire
from protocols.errors import ErrorCode, MicrokernelError, RemoteError
from protocols.registry import class_for
from protocols.transport import AsyncRequester, NoPeer, SyncRequester

NOW = 1_790_000_000_123_456_789

_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def frozen(counter_start: int = 7):
    """The clock and the id counter fixed, so that two encoders must agree byte for byte."""
    return mock.patch.multiple(wire, _time_ns=lambda: NOW, _counter=itertools.count(counter_start))


@settings(max_examples=200, deadline=None)
@given(method=st.text(max_size=16), args=st.dictionaries(st.text(max_size=10), _VALUES, max_size=5),
       deadline=st.integers(2**32, 2**64 - 1))
def test_the_request_encoder_writes_what_encode_rpc_request_writes(method: str, args: dict, deadline: int) -> None:
    msg_id = wire.new_msg_id()
    with frozen():
        fast = wire.RpcRequestEncoder("caller").encode(method, args, msg_id, deadline)
        general = wire.encode_rpc_request(method, args, sender="caller", msg_id=msg_id, deadline_ns=deadline)
    assert fast == general


@pytest.mark.parametrize("args", [
    {"blob": b"x" * 70_000},                 # a buffer frame
    {"x": np.arange(4, dtype=np.float32)},   # an array frame
    {"nested": {"x": np.arange(4)}},         # an array frame further in (the inline packing declines it)
    {"many": ["y" * 1000] * 70},             # a body past the inline limit
])
def test_the_request_encoder_hands_unusual_arguments_to_the_general_encoder(args: dict) -> None:
    msg_id = wire.new_msg_id()
    with frozen():
        fast = wire.RpcRequestEncoder("caller").encode("m", args, msg_id, NOW + 10**9)
        general = wire.encode_rpc_request("m", args, sender="caller", msg_id=msg_id, deadline_ns=NOW + 10**9)
    assert [bytes(f) for f in fast] == [bytes(f) for f in general]
    env = wire.decode([b"\x00peer", *fast])
    assert env.message.method == "m" and set(env.message.args) == set(args)


def _request_header() -> wire.Header:
    return wire.decode([b"\x00peer", *wire.encode_rpc_request("m", {}, sender="caller")]).header


@settings(max_examples=200, deadline=None)
@given(result=_VALUES)
def test_the_reply_encoder_writes_what_encode_result_writes_or_declines(result: object) -> None:
    request = _request_header()
    with frozen():
        fast = wire.RpcReplyEncoder("svc:echo.0.1").encode(b"\x00peer", request.msg_id, result)
    with frozen():
        general = wire.encode_result(request, result, sender="svc:echo.0.1", routing=[b"\x00peer"])
    if fast is None:  # declined: a list, a binary, or a map holding binaries
        assert type(result) in (list, bytes) or (type(result) is dict and any(type(v) is bytes for v in result.values()))
    else:
        assert fast == general


def test_the_reply_encoder_declines_frames_and_large_bodies() -> None:
    encoder = wire.RpcReplyEncoder("svc")
    request = _request_header()
    assert encoder.encode(b"\x00peer", request.msg_id, b"x" * 70_000) is None
    assert encoder.encode(b"\x00peer", request.msg_id, {"x": np.zeros(3)}) is None
    assert encoder.encode(b"\x00peer", request.msg_id, {"s": "y" * 70_000}) is None
    assert encoder.encode(b"\x00peer", request.msg_id, 42) is not None
    # A value msgpack cannot take is left to the general encoder, which says what is wrong.
    assert encoder.encode(b"\x00peer", request.msg_id, {"x": object()}) is None
    with pytest.raises(TypeError):
        wire.encode_result(request, {"x": object()}, sender="svc")
    # A declined packing leaves nothing behind in the encoder's packer.
    frames = encoder.encode(b"\x00peer", request.msg_id, {"a": [1, 2]})
    assert frames is not None and frames[3] == msgpack.packb({"result": {"a": [1, 2]}}, use_bin_type=True)


@settings(max_examples=200, deadline=None)
@given(result=_VALUES)
def test_decode_rpc_reply_agrees_with_decode(result: object) -> None:
    request = _request_header()
    frames = wire.encode_result(request, result, sender="svc")
    usual = wire.decode_rpc_reply(frames, 1 << 20)
    env = wire.decode(frames, max_size=1 << 20)
    assert usual is not None
    parent_id, got = usual
    assert parent_id == env.header.parent_id == request.msg_id and got == env.message.result


def _reply_frames(body: object) -> list:
    frames = wire.encode_result(_request_header(), None, sender="svc")
    frames[2] = msgpack.packb(body, use_bin_type=True)
    return frames


@pytest.mark.parametrize("frames", [
    _reply_frames({}),                                     # result omitted: decode fills the default
    _reply_frames({"result": 1, "extra": 2}),              # unknown field: ignored by decode
    _reply_frames([1]),                                    # not a map
    wire.encode_result(_request_header(), b"x" * 70_000, sender="svc"),           # a buffer frame
    wire.encode_error(_request_header(), ErrorCode.INTERNAL, "no", sender="svc"),  # an error
    wire.encode_reply(_request_header(), m.PingReply(version="1.3", pid=1, uptime_s=0.0), sender="svc"),              # another type
    [b"\x00peer", *wire.encode_result(_request_header(), 1, sender="svc")],        # routing frames
    wire.encode_result(_request_header(), 1, sender="svc")[:2],                    # truncated
])
def test_decode_rpc_reply_leaves_anything_unusual_to_decode(frames: list) -> None:
    assert wire.decode_rpc_reply(frames, 1 << 20) is None


def test_decode_rpc_reply_reads_each_header_of_a_learned_length_by_its_own_parts() -> None:
    # Replies of one length and layout from senders with names of one length: the first learns
    # the layout, the others share it but not their msg_type..ts_ns part, which is checked apart.
    senders = ["svc", "abc", "xyz"]
    for sender in senders * 2:
        request = _request_header()
        frames = wire.encode_result(request, {"from": sender}, sender=sender)
        assert wire.decode_rpc_reply(frames, 1 << 20) == (request.msg_id, {"from": sender})
    # The same length and layout, but that part altered: an invalid protocol version (major 9),
    # and a message type that is no reply, each decoded (or refused) as decode does.
    request = _request_header()
    frames = wire.encode_result(request, 1, sender="svc")
    for old, new in ((b"\x92\x01", b"\x92\x09"), (b"\xa9rpc_reply", b"\xa9rpc_reque")):
        assert old in frames[1]
        altered = [frames[0], frames[1].replace(old, new), frames[2]]
        assert len(altered[1]) == len(frames[1])
        assert wire.decode_rpc_reply(altered, 1 << 20) is None
    # A reply with a deadline (another layout of another length) still takes the usual path.
    with_deadline = wire.encode(m.RpcReply(result=2), sender="svc", parent_id=request.msg_id,
                                status=wire.STATUS_OK, deadline_ns=NOW + 10**9)
    assert wire.decode_rpc_reply(with_deadline, 1 << 20) == (request.msg_id, 2)


def test_decode_rpc_reply_respects_the_size_limit() -> None:
    frames = wire.encode_result(_request_header(), "x" * 100, sender="svc")
    size = sum(len(f) for f in frames)
    assert wire.decode_rpc_reply(frames, size) is not None
    assert wire.decode_rpc_reply(frames, size - 1) is None


class Peer:
    """A ROUTER answering each request with the frames ``answer(header)`` returns (a list of replies)."""

    def __init__(self, ctx: zmq.Context, endpoint: str, answer) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.bind(endpoint)
        self.answer = answer
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        frames = self.sock.recv_multipart()
        env = wire.decode(frames)
        for reply in self.answer(env.header):
            self.sock.send_multipart([frames[0], *reply])

    def close(self) -> None:
        self.thread.join(10)
        self.sock.close()


@contextlib.contextmanager
def answered(answer) -> Iterator[SyncRequester]:
    """A requester whose one request a ``Peer`` answers with ``answer(header)``."""
    ctx = zmq.Context.instance()
    endpoint = f"inproc://answered-{id(answer)}"
    peer = Peer(ctx, endpoint, answer)
    requester = SyncRequester(ctx, [endpoint], sender="caller")
    try:
        yield requester
    finally:
        requester.close()
        peer.close()


_ANSWERS = [
    # a late reply to an earlier request first: ignored
    (lambda h: [wire.encode_result(h._replace(msg_id=b"0" * 16), "stale", sender="s"),
                wire.encode_result(h, "fresh", sender="s")], "fresh"),
    # a reply in a layout the fast path does not know: the general decoder reads it
    (lambda h: [[wire.MAGIC, msgpack.packb({"msg_id": b"r" * 5, "msg_type": "rpc_reply", "version": [1, 0],
                                             "sender": "s", "ts_ns": 1, "parent_id": h.msg_id, "status": "ok"}),
                 msgpack.packb({"result": [1, 2]})]], [1, 2]),
    (lambda h: [wire.encode_error(h, ErrorCode.HANDLER_ERROR, "boom", sender="s")], RemoteError),
    (lambda h: [wire.encode_reply(h, m.PingReply(version="1.3", pid=1, uptime_s=0.0), sender="s")], MicrokernelError),
]


def _check_outcome(call, outcome) -> None:
    if isinstance(outcome, type):
        with pytest.raises(outcome) as info:
            call()
        if outcome is MicrokernelError:
            assert info.value.code == ErrorCode.MALFORMED and "ping_reply" in str(info.value)
        else:
            assert info.value.code == ErrorCode.HANDLER_ERROR
    else:
        assert call() == outcome


@pytest.mark.parametrize("answer, outcome", _ANSWERS)
def test_sync_requester_call(answer, outcome) -> None:
    with answered(answer) as requester:
        _check_outcome(lambda: requester.call("m", {}, timeout=10), outcome)


@pytest.mark.parametrize("deadline", [True, False])  # without one: the general encoder's frames
@pytest.mark.parametrize("answer, outcome", _ANSWERS)
def test_async_requester_call(answer, outcome, deadline: bool) -> None:
    ctx = zmq.Context.instance()
    endpoint = f"inproc://answered-async-{id(answer)}-{deadline}"
    peer = Peer(ctx, endpoint, answer)

    async def main() -> object:
        requester = AsyncRequester(ctx, [endpoint], sender="caller")
        try:
            return await requester.call("m", {}, timeout=10 if deadline else None)
        finally:
            requester.close()

    try:
        with asyncio.Runner() as runner:
            _check_outcome(lambda: runner.run(main()), outcome)
    finally:
        peer.close()


def test_async_requester_matches_replies_of_calls_and_requests_out_of_order() -> None:
    # Two call()s and a request() in flight on one DEALER, answered in reverse order, one with an error.
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    router.bind("inproc://out-of-order")

    def serve() -> None:
        got = [router.recv_multipart() for _ in range(3)]
        for frames in reversed(got):
            env = wire.decode(frames)
            if env.msg_type == "ping_request":
                reply = wire.encode_reply(env.header, m.PingReply(version="1.3", pid=7, uptime_s=0.0), sender="s")
            elif env.message.args["n"] == 2:
                reply = wire.encode_error(env.header, ErrorCode.HANDLER_ERROR, "two", sender="s")
            else:
                reply = wire.encode_result(env.header, env.message.args["n"] * 10, sender="s")
            router.send_multipart([frames[0], *reply])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    async def main() -> list:
        requester = AsyncRequester(ctx, ["inproc://out-of-order"], sender="caller")
        try:
            return await asyncio.gather(requester.call("m", {"n": 1}, timeout=10),
                                        requester.call("m", {"n": 2}, timeout=10),
                                        requester.request(m.PingRequest(), timeout=10), return_exceptions=True)
        finally:
            requester.close()

    try:
        first, second, ping = asyncio.run(main())
    finally:
        thread.join(10)
        router.close()
    assert first == 10
    assert isinstance(second, RemoteError) and second.code == ErrorCode.HANDLER_ERROR and second.reason == "two"
    assert ping.message.pid == 7


def test_sync_requester_call_without_a_peer_raises_no_peer(tmp_path) -> None:
    requester = SyncRequester(zmq.Context.instance(), [f"ipc://{tmp_path}/nobody.sock"], sender="caller", immediate=True)
    try:
        with pytest.raises(NoPeer):
            requester.call("m", {}, timeout=5, try_now=True)
    finally:
        requester.close()


def _kinds(frames: list) -> list[str]:
    return ["bytes" if type(f) is bytes else "frame" for f in frames]


@pytest.mark.parametrize("routing_id", [None, wire.MAGIC])  # None: the ROUTER's own; MK1: a look-alike
@pytest.mark.parametrize("frames", [
    wire.encode_rpc_request("m", {"text": "x"}, sender="caller"),
    wire.encode_rpc_request("m", {"blob": b"y" * 70_000}, sender="caller"),  # a buffer frame after the body
    [b"not-mk1"],                                                             # garbage: one frame
    [b"a", b"b", wire.MAGIC, b"h", b"b", b"z"],                               # MK1 late
])
def test_recv_routed_reads_the_routing_id_and_the_message(frames: list, routing_id: bytes | None) -> None:
    ctx = zmq.Context.instance()
    endpoint = f"inproc://routed-{id(frames)}-{routing_id}"
    router = ctx.socket(zmq.ROUTER)
    router.bind(endpoint)
    dealer = ctx.socket(zmq.DEALER)
    if routing_id is not None:
        dealer.setsockopt(zmq.ROUTING_ID, routing_id)
    dealer.connect(endpoint)
    try:
        for _ in range(2):
            dealer.send_multipart(frames)
        got = transport.recv_routed(router)
        again = transport.recv_message(router)
        assert [bytes(f) for f in got] == [bytes(f) for f in again] == [got[0], *map(bytes, frames)]
        # the envelope up to the body is bytes, anything after it stays a zero-copy frame
        magic = frames.index(wire.MAGIC) if wire.MAGIC in frames else None
        expected = ["bytes"] * (len(frames) + 1)
        if magic is not None:
            expected[magic + 4:] = ["frame"] * (len(frames) - magic - 3)
        assert _kinds(got) == expected
        if routing_id is None:
            assert _kinds(again) == expected
    finally:
        dealer.close(linger=0)
        router.close(linger=0)


def _reverse_peer(endpoint: str, count: int, answer) -> threading.Thread:
    """A ROUTER that takes ``count`` requests, then answers them last first with ``answer(env)``."""
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.linger = 0
    router.bind(endpoint)

    def serve() -> None:
        got = [router.recv_multipart() for _ in range(count)]
        for frames in reversed(got):
            router.send_multipart([frames[0], *answer(wire.decode(frames))])
        router.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("failing", [None, 1])
def test_sync_requester_call_many_keeps_replies_that_come_before_their_turn(failing: int | None) -> None:
    # Three requests in flight, answered in reverse: a usual reply, an error (or a usual reply),
    # and a reply in a layout only the general decoder reads. Results come in call order; an
    # error raises at its turn, after the earlier results.
    def answer(env: wire.Envelope) -> list:
        n = env.message.args["n"]
        if n == failing:
            return wire.encode_error(env.header, ErrorCode.HANDLER_ERROR, f"no {n}", sender="s")
        if n == 0:
            return [wire.MAGIC, msgpack.packb({"msg_id": b"r" * 5, "msg_type": "rpc_reply", "version": [1, 0],
                                               "sender": "s", "ts_ns": 1, "parent_id": env.header.msg_id,
                                               "status": "ok"}), msgpack.packb({"result": "zero"})]
        return wire.encode_result(env.header, n * 10, sender="s")

    endpoint = f"inproc://call-many-{failing}"
    thread = _reverse_peer(endpoint, 3, answer)
    requester = SyncRequester(zmq.Context.instance(), [endpoint], sender="caller")
    try:
        results = requester.call_many("m", ({"n": n} for n in range(3)), timeout=10, window=3)
        if failing is None:
            assert list(results) == ["zero", 10, 20]
        else:
            assert next(results) == "zero"
            with pytest.raises(RemoteError) as info:
                next(results)
            assert info.value.reason == "no 1"
    finally:
        thread.join(10)
        requester.close()


# --- events: the publishers' EventEncoder --------------------------------------------------------


def general(topic: str, data: dict) -> list:
    return wire.encode(wire.Event(topic, data), sender="svc:pub.0.1", topic=topic)


@settings(max_examples=200, deadline=None)
@given(topic=st.text(min_size=1, max_size=24).filter(lambda t: class_for(t) is None), data=st.dictionaries(st.text(max_size=10), _VALUES, max_size=5))
def test_the_event_encoder_writes_what_encode_writes_or_declines(topic: str, data: dict) -> None:
    with frozen():
        fast = wire.EventEncoder("svc:pub.0.1").encode(topic, data)
    with frozen():
        expected = general(topic, data)
    if fast is None:  # declined: a binary among the top-level values
        assert any(type(v) is bytes for v in data.values())
    else:
        assert fast == expected
        env = wire.decode(fast, topic=True)
        assert env.topic == topic and env.message == wire.Event(topic, data)


@pytest.mark.parametrize("data", [
    {"blob": b"x" * 70_000},                 # a buffer frame
    {"x": np.arange(4, dtype=np.float32)},   # an array frame
    {"nested": {"x": np.arange(4)}},         # an array frame further in (the inline packing declines it)
    {"many": ["y" * 1000] * 70},             # a body past the inline limit
    {"odd": object()},                       # nothing msgpack takes: the general encoder says what is wrong
])
def test_the_event_encoder_declines_what_only_the_general_encoder_can_do(data: dict) -> None:
    encoder = wire.EventEncoder("svc:pub.0.1")
    assert encoder.encode("demo.tick", data) is None
    # A declined packing leaves nothing behind in the encoder's packer.
    with frozen():
        fast = encoder.encode("demo.tick", {"n": 1})
    with frozen():
        assert fast == general("demo.tick", {"n": 1})


def test_the_event_encoder_remembers_a_bounded_number_of_topics() -> None:
    encoder = wire.EventEncoder("svc:pub.0.1")
    for i in range(wire.EventEncoder.TOPICS):
        assert encoder.encode(f"demo.t{i}", {"i": i}) is not None
    # Past its bound it declines new topics (the general encoder has its own bounded cache) and
    # still serves the ones it knows.
    assert encoder.encode("demo.one_more", {"i": 0}) is None
    with frozen():
        fast = encoder.encode("demo.t3", {"i": 3})
    with frozen():
        assert fast == general("demo.t3", {"i": 3})
    assert encoder.encode(b"demo.bytes", {"i": 0}) is None  # type: ignore[arg-type]
