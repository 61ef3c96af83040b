"""Round trips and validation of the wire format (protocols/wire.py)."""

from __future__ import annotations

import dataclasses
import typing

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import messages as m
from protocols import wire
from protocols.errors import ErrorCode, ProtocolError
from protocols.registry import registered_types

leaf = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=20) | st.binary(max_size=64)
msgpack_values = st.recursive(leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def strategy_for(annotation: typing.Any) -> st.SearchStrategy:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is typing.Any:
        return msgpack_values
    if origin in (typing.Union, __import__("types").UnionType):
        return st.one_of(*(st.none() if a is type(None) else strategy_for(a) for a in args))
    if annotation is str:
        return st.text(max_size=30)
    if annotation is int:
        return st.integers(-(2**63), 2**63 - 1)
    if annotation is float:
        return st.floats(allow_nan=False)
    if annotation is bool:
        return st.booleans()
    if annotation is bytes:
        return st.binary(max_size=64)
    if origin is list:
        return st.lists(strategy_for(args[0]), max_size=4)
    if origin is dict:
        return st.dictionaries(st.text(max_size=8), strategy_for(args[1]), max_size=4)
    raise AssertionError(f"no strategy for {annotation!r}")


def message_strategy(cls: type) -> st.SearchStrategy:
    hints = typing.get_type_hints(cls)
    return st.builds(cls, **{f.name: strategy_for(hints[f.name]) for f in dataclasses.fields(cls)})


ALL = sorted(registered_types().items())


@pytest.mark.parametrize("msg_type,cls", ALL, ids=[t for t, _ in ALL])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_every_message_type_round_trips(msg_type: str, cls: type, data: st.DataObject) -> None:
    msg = data.draw(message_strategy(cls))
    frames = wire.encode(msg, sender="test", routing=[b"peer"])
    env = wire.decode(frames)
    assert env.routing == [b"peer"]
    assert env.header.msg_type == msg_type
    assert env.header.version == wire.PROTOCOL_VERSION
    assert env.message == msg


def test_event_topic_frame_and_generic_events() -> None:
    frames = wire.encode(wire.Event("train.progress", {"step": 3, "loss": 0.5}), sender="trainer", topic="train.progress")
    assert bytes(frames[0]) == b"train.progress"
    env = wire.decode(frames, topic=True)
    assert env.topic == "train.progress"
    assert env.message == wire.Event("train.progress", {"step": 3, "loss": 0.5})


def test_arrays_and_large_binaries_travel_as_zero_copy_frames() -> None:
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    big = b"x" * (wire.INLINE_BYTES_LIMIT + 1)
    frames = wire.encode(m.RpcReply(result={"a": arr, "big": big, "small": b"y"}), sender="s")
    assert len(frames) == 3 + 2  # MK1, header, body + 2 buffers
    env = wire.decode(frames)
    out = env.message.result
    np.testing.assert_array_equal(out["a"], arr)
    assert not out["a"].flags.writeable
    assert out["a"].base is not None  # a view over the frame, not a copy
    assert isinstance(out["big"], memoryview) and out["big"].readonly and out["big"] == big
    assert out["small"] == b"y"


def test_deeply_nested_large_binaries_and_arrays_still_become_frames() -> None:
    # Below the top two levels the encoder finds large binaries by the packed size, arrays by
    # the packer's hook: both must still travel as frames, never inlined.
    big = bytes(range(256)) * ((wire.INLINE_BYTES_LIMIT // 256) + 1)
    arr = np.arange(6, dtype=np.int16)
    frames = wire.encode(m.RpcReply(result={"a": {"b": [{"blob": big, "arr": arr}]}}), sender="s")
    assert len(frames) == 3 + 2
    inner = wire.decode(frames).message.result["a"]["b"][0]
    assert isinstance(inner["blob"], memoryview) and inner["blob"] == big
    np.testing.assert_array_equal(inner["arr"], arr)


@given(result=msgpack_values)
@settings(max_examples=150, deadline=None)
def test_encode_result_is_an_rpc_reply(result) -> None:
    req = wire.decode([b"peer", *wire.encode(m.RpcRequest(method="f"), sender="c")])
    frames = wire.encode_result(req.header, result, sender="svc[0]", routing=req.routing)
    assert frames[0] == b"peer"
    env = wire.decode(frames)
    assert env.routing == [b"peer"] and env.msg_type == "rpc_reply" and env.header.status == "ok"
    assert env.header.parent_id == req.header.msg_id and env.header.sender == "svc[0]"
    assert env.message == wire.decode(wire.encode_reply(req.header, m.RpcReply(result=result), sender="svc[0]")).message


def test_non_contiguous_and_scalar_arrays() -> None:
    arr = np.arange(20, dtype=np.int64).reshape(4, 5)[:, ::2]
    scalar = np.float64(2.5).reshape(())
    env = wire.decode(wire.encode(m.RpcReply(result=[arr, np.asarray(scalar)]), sender="s"))
    np.testing.assert_array_equal(env.message.result[0], arr)
    assert env.message.result[1].shape == () and float(env.message.result[1]) == 2.5


def test_replies_correlate_and_errors_decode_as_error_reply() -> None:
    req = wire.decode(wire.encode(m.StatusRequest(), sender="c"))
    ok = wire.decode(wire.encode_reply(req.header, m.StatusReply(kernel={}, services=[]), sender="k"))
    assert ok.header.parent_id == req.header.msg_id and ok.header.status == "ok" and ok.msg_type == "status_reply"
    err = wire.decode(wire.encode_error(req.header, ErrorCode.UNKNOWN_SERVICE, "nope", sender="k"))
    assert err.is_error and err.msg_type == "status_reply"
    assert err.message == m.ErrorReply(code="unknown_service", reason="nope", details={})


def _header(**overrides):
    h = {"msg_id": b"0123456789abcdef", "msg_type": "ping_request", "version": [1, 0], "sender": "x", "ts_ns": 1}
    h.update(overrides)
    return msgpack.packb({k: v for k, v in h.items() if v is not None})


@pytest.mark.parametrize(
    "frames,code",
    [
        ([b"id"], ErrorCode.MALFORMED),
        ([b"id", b"MK1"], ErrorCode.MALFORMED),
        ([b"id", b"MK1", b"\xc1", msgpack.packb({})], ErrorCode.MALFORMED),
        ([b"id", b"MK1", msgpack.packb([1, 2]), msgpack.packb({})], ErrorCode.MALFORMED),
        ([b"id", b"MK1", _header(version=[2, 0]), msgpack.packb({})], ErrorCode.VERSION_MISMATCH),
        ([b"id", b"MK1", _header(version="1.0"), msgpack.packb({})], ErrorCode.MALFORMED),
        ([b"id", b"MK1", _header(msg_type="launch_missiles_request"), msgpack.packb({})], ErrorCode.UNKNOWN_TYPE),
        ([b"id", b"MK1", _header(msg_type="stop_request"), msgpack.packb({})], ErrorCode.INVALID_FIELD),
        ([b"id", b"MK1", _header(msg_type="stop_request"), msgpack.packb({"service": 3})], ErrorCode.INVALID_FIELD),
        ([b"id", b"MK1", _header(msg_type="scale_request"), msgpack.packb({"service": "a", "replicas": True})], ErrorCode.INVALID_FIELD),
        ([b"id", b"MK1", _header(), b"\x92\x01"], ErrorCode.MALFORMED),
        ([b"id", b"MK1", _header(), msgpack.packb([1])], ErrorCode.MALFORMED),
        ([b"id", b"MK1", _header(msg_type="rpc_request"), msgpack.packb({"method": "x", "args": {"a": msgpack.ExtType(1, msgpack.packb(5))}})], ErrorCode.MALFORMED),
        ([b"id", b"MK1", _header(msg_type="rpc_request"), msgpack.packb({"method": "x", "args": {"a": msgpack.ExtType(2, msgpack.packb([0, "<f4", [3]]))}}), b"12345678"], ErrorCode.MALFORMED),
    ],
)
def test_invalid_input_raises_protocol_error_with_a_code(frames, code) -> None:
    with pytest.raises(ProtocolError) as info:
        wire.decode(frames)
    assert info.value.code == code
    assert info.value.reason
    assert getattr(info.value, "routing", None) == [b"id"]


def test_oversized_messages_are_refused_before_parsing() -> None:
    frames = wire.encode(m.RpcRequest(method="x", args={"blob": b"z" * 200_000}), sender="c", routing=[b"id"])
    with pytest.raises(ProtocolError) as info:
        wire.decode(frames, max_size=100_000)
    assert info.value.code == ErrorCode.TOO_LARGE
    assert info.value.header.msg_type == "rpc_request"  # so the error reply can be correlated


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    frames = [b"MK1", _header(msg_type="stop_request"), msgpack.packb({"service": "a", "new_in_1_1": 7})]
    assert wire.decode(frames).message == m.StopRequest(service="a")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=6))
def test_random_frames_never_raise_anything_but_protocol_error(frames) -> None:
    try:
        wire.decode(frames, max_size=1 << 20)
    except ProtocolError:
        pass


def test_a_message_packed_ahead_decodes_like_the_message_itself() -> None:
    reply = m.StatusReply(kernel={"pid": 1, "uptime_s": 0.5}, services=[{"name": "echo", "replicas": []}])
    packed = wire.pack_message(reply)
    request = wire.decode(wire.encode(m.StatusRequest(), sender="c"))
    for _ in range(2):  # sent twice: a fresh header each time, the same body
        env = wire.decode(wire.encode_reply(request.header, packed, sender="k", routing=[b"id"]))
        assert env.message == reply and env.routing == [b"id"]
        assert env.header.parent_id == request.header.msg_id and env.header.status == "ok"
    with pytest.raises(ValueError):
        wire.pack_message(m.RpcReply(result=b"x" * wire.INLINE_BYTES_LIMIT))


@pytest.mark.parametrize("deadline_ns", [None, 2**40, 5])
@pytest.mark.parametrize("msg_id", [None, wire.new_msg_id(), b"short-id"])
def test_packed_shortcuts_make_what_encode_makes(msg_id: bytes | None, deadline_ns: int | None) -> None:
    # packed_request (the requesters' path) and encode_reply's Packed branch against encode's own:
    # the same frames, headers alike in everything but the clock.
    def same(got: list, want: list) -> wire.Header:
        g, w = wire.decode(got), wire.decode(want)
        assert len(got) == len(want) and got[-1] == want[-1] and g.routing == w.routing and g.message == w.message
        assert g.header._replace(ts_ns=0, msg_id=b"") == w.header._replace(ts_ns=0, msg_id=b"")
        return g.header

    packed = wire.pack_message(m.StatusRequest(brief=True))
    header = same(wire.packed_request(packed, "c", msg_id, deadline_ns),
                  wire.encode(packed, sender="c", msg_id=msg_id, deadline_ns=deadline_ns))
    assert msg_id is None or header.msg_id == msg_id
    request = wire.decode(wire.encode(m.StatusRequest(), sender="c", msg_id=msg_id)).header
    reply = wire.pack_message(m.StatusReply(kernel={"pid": 1}, services=[]))
    same(wire.encode_reply(request, reply, sender="k", routing=[b"id"]),
         wire.encode(reply, sender="k", parent_id=request.msg_id, status="ok", routing=[b"id"]))


_ARG_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(method=st.text(max_size=16), args=st.dictionaries(st.text(max_size=10), _ARG_VALUES, max_size=5),
       deadline=st.none() | st.integers(2**32, 2**63))
def test_the_data_plane_fast_path_agrees_with_decode(method: str, args: dict, deadline: int | None) -> None:
    frames = [b"\x00peer", *wire.encode_rpc_request(method, args, sender="caller", deadline_ns=deadline)]
    usual = wire.decode_rpc_request(frames, 1 << 20)
    env = wire.decode(frames, max_size=1 << 20)
    assert usual is not None
    routing, header, got_method, got_args = usual
    assert (routing, header, got_method, got_args) == (env.routing, env.header, env.message.method, env.message.args)


def _request_frames(body: object, **header: object) -> list:
    frames = [b"\x00peer", *wire.encode_rpc_request("m", {}, sender="caller")]
    frames[3] = msgpack.packb(body, use_bin_type=True)
    return frames


@pytest.mark.parametrize("frames", [
    _request_frames({"method": "m"}),                              # args omitted: decode fills the default
    _request_frames({"method": "m", "args": {}, "extra": 1}),      # unknown field: ignored by decode
    _request_frames({"method": 1, "args": {}}),                    # wrong type: decode's error
    _request_frames({"method": "m", "args": {1: 2}}),              # non-string argument name
    _request_frames([1, 2]),                                       # not a map
    [b"\x00peer", *wire.encode_rpc_request("m", {}, sender="caller")][:3],          # truncated
    [b"\x00peer", *wire.encode_rpc_request("m", {"b": b"x" * 70_000}, sender="c")],  # buffer frame
    [b"\x00peer", *wire.encode(m.PingRequest(), sender="caller")],                   # another type
    [b"\x00peer", *wire.encode_error(None, ErrorCode.INTERNAL, "no", sender="caller")],  # a reply
])
def test_anything_unusual_is_left_to_decode(frames: list) -> None:
    assert wire.decode_rpc_request(frames, 1 << 20) is None


def test_the_fast_path_respects_the_size_limit() -> None:
    frames = [b"\x00peer", *wire.encode_rpc_request("m", {"text": "x" * 100}, sender="caller")]
    size = sum(len(f) for f in frames)
    assert wire.decode_rpc_request(frames, size) is not None
    assert wire.decode_rpc_request(frames, size - 1) is None
