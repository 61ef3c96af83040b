"""The clients' reply path: ``map_builder_of``, ``wire.decode_reply_map`` and
``Sync/AsyncRequester.request_map`` give exactly the map the general decoder's message gives, and leave
everything unusual to it. Also the AsyncSocket's receive on a wake-up, with and without a message."""

from __future__ import annotations

import asyncio
import typing
from typing import Any

import msgpack
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import messages as m
from protocols import wire
from protocols.errors import ErrorCode, ProtocolError, RemoteError
from protocols.registry import build, map_builder_of
from protocols.transport import AsyncRequester, AsyncSocket
from tests.unit.test_wire import ALL, message_strategy, msgpack_values
from tests.unit.test_wire_rpc_fastpath import Peer, answered

CEILING = 10.0  # seconds; every wait returns as soon as its condition holds


def _reply(message: Any, parent: bytes | None = None) -> list[Any]:
    """``message`` as an ok reply reaches a DEALER: ``[MK1, header, body, *buffers]``."""
    return wire.encode(message, sender="kernel", parent_id=parent or wire.new_msg_id(), status=wire.STATUS_OK)


@pytest.mark.parametrize("msg_type,cls", ALL, ids=[t for t, _ in ALL])
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_decode_reply_map_agrees_with_decode_for_every_type(msg_type: str, cls: type, data: st.DataObject) -> None:
    frames = _reply(data.draw(message_strategy(cls)))
    env = wire.decode(frames, max_size=1 << 22)
    usual = wire.decode_reply_map(frames, 1 << 22)
    if len(frames) > 3:  # buffer frames: always the general path
        assert usual is None
        return
    assert usual is not None
    parent_id, body = usual
    assert parent_id == env.header.parent_id
    assert body == wire.body_of(env.message)
    assert list(body) == list(wire.body_of(env.message))  # the same keys, in field order


def _bodies(cls: type) -> st.SearchStrategy:
    """Bodies for ``cls``: any map, or a valid one with a field dropped or replaced by any value."""
    fields = list(typing.get_type_hints(cls))

    def spoil(body: dict, change: tuple[int, Any, bool]) -> dict:
        if fields:
            index, value, drop = change
            name = fields[index % len(fields)]
            if drop:
                body.pop(name, None)
            else:
                body[name] = value
        return body

    valid = message_strategy(cls).map(wire.body_of).map(dict)
    changes = st.tuples(st.integers(0, 50), msgpack_values, st.booleans())
    return st.one_of(msgpack_values, st.builds(spoil, valid, changes))


@pytest.mark.parametrize("msg_type,cls", ALL, ids=[t for t, _ in ALL])
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_the_map_builder_checks_as_build_does(msg_type: str, cls: type, data: st.DataObject) -> None:
    body = data.draw(_bodies(cls))
    try:
        expected: Any = wire.body_of(build(cls, body))
    except ProtocolError as exc:
        expected = exc
    try:
        got: Any = map_builder_of(cls)(body)
    except ProtocolError as exc:
        got = exc
    if isinstance(expected, ProtocolError):
        assert isinstance(got, ProtocolError)
        assert (got.code, got.reason) == (expected.code, expected.reason)
    else:
        assert got == expected and list(got) == list(expected)


def _status_frames(body: object, **header: object) -> list[Any]:
    frames = _reply(m.StatusReply(kernel={}, services=[]))
    frames[2] = msgpack.packb(body, use_bin_type=True)
    if header:
        fields = msgpack.unpackb(frames[1])
        fields.update(header)
        frames[1] = msgpack.packb(fields, use_bin_type=True)
    return frames


@pytest.mark.parametrize("frames", [
    _status_frames({"kernel": {}}),                                # a required field missing: decode names it
    _status_frames({"kernel": [], "services": []}),                # a field of the wrong type
    _status_frames([1]),                                           # not a map
    _status_frames({"kernel": {}, "services": []}, msg_type="no_such_reply"),  # an unregistered type
    _status_frames({"kernel": {}, "services": []}, status="error"),            # an error
    [wire.MAGIC, msgpack.packb(["not", "a", "map"]), msgpack.packb({"kernel": {}, "services": []})],  # no header
    wire.encode(m.StatusRequest(), sender="client"),               # a request (no status)
    [b"\x00peer", *_reply(m.PingReply(version="1", pid=1, uptime_s=0.0))],      # routing frames
    _reply(m.PingReply(version="1", pid=1, uptime_s=0.0))[:2],      # truncated
    _reply(m.RpcReply(result=b"x" * 70_000)),                      # a buffer frame
])
def test_decode_reply_map_leaves_anything_unusual_to_decode(frames: list) -> None:
    assert wire.decode_reply_map(frames, 1 << 20) is None


def test_decode_reply_map_respects_the_size_limit() -> None:
    frames = _reply(m.PingReply(version="1.0", pid=1, uptime_s=0.0))
    size = sum(len(f) for f in frames)
    assert wire.decode_reply_map(frames, size) is not None
    assert wire.decode_reply_map(frames, size - 1) is None


PING = m.PingReply(version="1.3", pid=7, uptime_s=2.5)


_ANSWERS = [
    # a late reply to an earlier request first: ignored
    (lambda h: [_reply(m.PingReply(version="old", pid=1, uptime_s=0.0), b"0" * 16), _reply(PING, h.msg_id)],
     {"version": "1.3", "pid": 7, "uptime_s": 2.5}),
    # a reply in a layout the fast path does not know: the general decoder reads it
    (lambda h: [[wire.MAGIC, msgpack.packb({"msg_id": b"r" * 5, "msg_type": "ping_reply", "version": [1, 0],
                                             "sender": "k", "ts_ns": 1, "parent_id": h.msg_id, "status": "ok"}),
                 msgpack.packb({"version": "2", "pid": 3, "uptime_s": 1.0})]],
     {"version": "2", "pid": 3, "uptime_s": 1.0}),
    (lambda h: [wire.encode_error(h, ErrorCode.UNKNOWN_SERVICE, "no such service", sender="k")], RemoteError),
    # the reply to this request, but invalid: the general decoder's error, naming the field
    (lambda h: [[wire.MAGIC, _reply(PING, h.msg_id)[1], msgpack.packb({"version": "2", "pid": "three"})]],
     ProtocolError),
]


def _check_map(request_map: Any, outcome: Any) -> None:
    if isinstance(outcome, type):
        with pytest.raises(outcome) as info:
            request_map()
        if outcome is RemoteError:
            assert info.value.code == ErrorCode.UNKNOWN_SERVICE
        else:
            assert info.value.code == ErrorCode.INVALID_FIELD and "pid" in str(info.value)
    else:
        assert request_map() == outcome


@pytest.mark.parametrize("answer, outcome", _ANSWERS)
def test_sync_requester_request_map(answer, outcome) -> None:
    with answered(answer) as requester:
        _check_map(lambda: requester.request_map(m.PingRequest(), timeout=10), outcome)


@pytest.mark.parametrize("packed", [False, True])  # a request packed once (what monitoring loops send)
@pytest.mark.parametrize("answer, outcome", _ANSWERS)
def test_async_requester_request_map(answer, outcome, packed: bool) -> None:
    ctx = zmq.Context.instance()
    endpoint = f"inproc://map-async-{id(answer)}-{packed}"
    peer = Peer(ctx, endpoint, answer)
    request = wire.pack_message(m.PingRequest()) if packed else m.PingRequest()

    async def main() -> Any:
        requester = AsyncRequester(ctx, [endpoint], sender="caller")
        try:
            return await requester.request_map(request, timeout=CEILING)
        finally:
            requester.close()

    try:
        _check_map(lambda: asyncio.run(main()), outcome)
    finally:
        peer.close()


async def _wake_up_cases() -> None:
    ctx = zmq.Context.instance()
    got: list[list[Any]] = []
    arrived = asyncio.Event()

    def on_message(frames: list[Any]) -> None:
        got.append(frames)
        arrived.set()

    router = ctx.socket(zmq.ROUTER)
    router.bind("inproc://wake-up")
    socket = AsyncSocket(router, on_message)
    dealer = ctx.socket(zmq.DEALER)
    dealer.linger = 0
    dealer.connect("inproc://wake-up")
    try:
        # A wake-up without a message: the failed receive is quiet, and nothing is handled.
        socket._on_ready()
        assert got == []
        # The next message still arrives (the FD was re-armed by that receive).
        dealer.send_multipart([b"MK1", b"h", b"b"])
        async with asyncio.timeout(CEILING):
            await arrived.wait()
        assert got[0][1:] == [b"MK1", b"h", b"b"]
        # With replies queued, a wake-up sends them before receiving.
        socket._outbox.append([got[0][0], b"queued"])
        socket._on_ready()
        assert socket.queued == 0
        assert await asyncio.to_thread(dealer.recv_multipart) == [b"queued"]
    finally:
        socket.close()
        dealer.close()


def test_a_wake_up_receives_at_once_and_tolerates_no_message() -> None:
    asyncio.run(_wake_up_cases())
