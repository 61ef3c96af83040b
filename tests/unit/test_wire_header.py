"""The header fast paths agree with plain msgpack, byte for byte and value for value.

``_pack_header`` builds headers from pre-packed pieces and ``_decode_canonical_header`` parses the
layout we write straight from the bytes; both must be indistinguishable from the general path
(msgpack + ``_check_header``), including for mutated and hostile inputs.
"""

from __future__ import annotations

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import wire
from protocols.errors import ProtocolError

msg_types = st.sampled_from(["rpc_request", "rpc_reply", "error_reply", "train.progress", "a"]) | st.text(min_size=1, max_size=40)
senders = st.sampled_from(["bench", "svc:echo.0.1", "", "é¥ts_nsπ", "x" * 40, "\xa5ts_ns"]) | st.text(max_size=300)
# 16 bytes is what new_msg_id makes (the struct layouts of _pack_header); other sizes take the pieces.
ids = st.binary(min_size=16, max_size=16) | st.binary(min_size=1, max_size=300)
parents = st.none() | st.binary(min_size=16, max_size=16) | st.binary(max_size=300)
deadlines = st.none() | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
statuses = st.none() | st.sampled_from(["ok", "error"])
stamps = st.integers(min_value=1 << 32, max_value=(1 << 64) - 1) | st.integers(min_value=0, max_value=(1 << 64) - 1)


def reference(msg_type, sender, msg_id, parent_id, deadline_ns, status, ts) -> bytes:
    h = {"msg_id": msg_id, "msg_type": msg_type, "version": wire.PROTOCOL_VERSION, "sender": sender, "ts_ns": ts}
    if parent_id is not None:
        h["parent_id"] = parent_id
    if deadline_ns is not None:
        h["deadline_ns"] = deadline_ns
    if status is not None:
        h["status"] = status
    return msgpack.packb(h, use_bin_type=True)


def general(raw: bytes):
    try:
        h = msgpack.unpackb(raw, raw=False, use_list=False)
    except Exception:
        return "unparseable"
    try:
        return wire._check_header(h)
    except ProtocolError:
        return "invalid"


@settings(max_examples=400, deadline=None)
@given(msg_types, senders, ids, parents, deadlines, statuses, stamps)
def test_packed_headers_are_exactly_what_msgpack_writes(msg_type, sender, msg_id, parent_id, deadline_ns, status, ts) -> None:
    original = wire._time_ns
    wire._time_ns = lambda: ts
    try:
        got = wire._pack_header(msg_type, sender, msg_id, parent_id, deadline_ns, status)
    finally:
        wire._time_ns = original
    assert got == reference(msg_type, sender, msg_id, parent_id, deadline_ns, status, ts)


@settings(max_examples=1500, deadline=None)
@given(msg_types, senders, ids, parents, deadlines.filter(lambda d: d is None or d >= -(1 << 63)), statuses,
       st.lists(st.tuples(st.sampled_from(["flip", "drop", "insert"]), st.integers(0, 10_000), st.integers(0, 255)),
                max_size=3))
def test_the_fast_decoder_accepts_nothing_the_general_path_rejects(msg_type, sender, msg_id, parent_id, deadline_ns,
                                                                   status, mutations) -> None:
    raw = bytearray(wire._pack_header(msg_type, sender, msg_id, parent_id, deadline_ns, status))
    for op, where, value in mutations:
        if op == "flip" and raw:
            raw[where % len(raw)] = value
        elif op == "drop" and raw:
            del raw[where % len(raw)]
        else:
            raw.insert(where % (len(raw) + 1), value)
    fast = wire._decode_canonical_header(bytes(raw))
    slow = general(bytes(raw))
    if fast is None:
        return  # not the canonical layout: the general path decides (tested elsewhere)
    assert isinstance(slow, wire.Header)
    assert tuple(fast) == tuple(slow)
    assert all(type(a) is type(b) for a, b in zip(fast, slow, strict=True))


def test_unmutated_headers_take_the_fast_path() -> None:
    raw = wire._pack_header("rpc_request", "bench", b"x" * 16, None, None, None)
    header = wire._decode_canonical_header(raw)  # so the property above is not vacuous
    assert header is not None and header == general(raw)


def test_a_learned_layout_never_misreads_another_header_of_the_same_length() -> None:
    # Two kinds of header with the same length: a request with a deadline and a reply with a
    # parent id and a status, from senders whose names make the lengths equal.
    request = wire._pack_header("rpc_request", "a" * 17, None, None, (1 << 62) + 5, None)
    reply = wire._pack_header("rpc_reply", "bb", None, b"p" * 16, None, "ok")
    assert len(request) == len(reply)
    for raw in (request, reply, request, reply, request):  # each one replaces the other's layout
        assert wire._decode_canonical_header(raw) == general(raw)
    # Flipping a constant byte of the learned layout is noticed, not read as that layout.
    broken = bytearray(reply)
    broken[-1] ^= 0x01
    assert wire._decode_canonical_header(bytes(broken)) is None
