"""protocols.wire's shared-memory extension (EXT_SHM): encoding, decoding, validation, ownership."""

from __future__ import annotations

import os

import msgpack
import numpy as np
import pytest

from protocols import handover, messages, shm, wire
from protocols.errors import ErrorCode, ProtocolError

pytestmark = [pytest.mark.skipif(not shm.available(), reason="needs /dev/shm"),
              pytest.mark.usefixtures("no_leftover_segments")]

REQUEST = wire.Header(b"r" * 16, "rpc_request", wire.PROTOCOL_VERSION, "caller", 0)
THRESHOLD = 1 << 20





def _reply(result: object, **kw: object) -> list[object]:
    return wire.encode_result(REQUEST, result, sender="svc", shm_threshold=THRESHOLD, **kw)


def _body_refs(frames: list[object]) -> list[list[object]]:
    """The EXT_SHM references in a message's body."""
    refs: list[list[object]] = []

    def hook(code: int, data: bytes) -> object:
        if code == wire.EXT_SHM:
            refs.append(msgpack.unpackb(data))
        return None

    msgpack.unpackb(frames[2], ext_hook=hook)
    return refs


def _with_ref(ref: object) -> list[object]:
    """A reply whose result is one hand-made EXT_SHM reference."""
    header = wire._pack_header("rpc_reply", "svc", None, REQUEST.msg_id, None, wire.STATUS_OK)
    body = msgpack.packb({"result": msgpack.ExtType(wire.EXT_SHM, msgpack.packb(ref))})
    return [wire.MAGIC, header, body]


def test_large_arrays_and_binaries_go_by_shared_memory() -> None:
    big = np.arange(1 << 19, dtype=np.float32).reshape(512, 1024)  # 2 MiB
    blob = os.urandom(THRESHOLD)
    handoffs: list[str] = []
    frames = _reply({"big": big, "blob": blob, "small": np.arange(10), "text": "hi"}, handoffs=handoffs)
    assert len(frames) == 4  # MK1, header, body and one frame: the small array
    assert len(handoffs) == 2 and all(os.path.exists(os.path.join(shm.SHM_DIR, n)) for n in handoffs)
    result = wire.decode(frames).message.result
    assert not any(os.path.exists(os.path.join(shm.SHM_DIR, n)) for n in handoffs)  # claimed = unlinked
    got = result["big"]
    assert got.shape == (512, 1024) and got.dtype == np.float32 and np.array_equal(got, big)
    assert not got.flags.writeable and not got.flags.owndata
    assert type(result["blob"]) is memoryview and result["blob"].readonly and bytes(result["blob"]) == blob
    assert result["small"].tolist() == list(range(10)) and result["text"] == "hi"


def test_without_a_threshold_nothing_changes() -> None:
    big = np.ones(THRESHOLD, dtype=np.uint8)
    frames = wire.encode_result(REQUEST, {"big": big}, sender="svc")
    assert len(frames) == 4 and not _body_refs(frames)
    frames = wire.encode(messages.RpcRequest(method="m", args={"big": big}), sender="c", topic="t.x",
                         shm_threshold=THRESHOLD)
    assert not _body_refs(frames[1:])  # pub/sub never hands over: it may have many receivers


def test_arrays_below_the_threshold_travel_as_frames() -> None:
    frames = _reply({"a": np.ones(THRESHOLD // 8 - 1, dtype=np.float64)})
    assert len(frames) == 4 and not _body_refs(frames)


def test_non_contiguous_and_deeply_nested_payloads() -> None:
    base = np.arange(1 << 20, dtype=np.int32).reshape(1024, 1024)
    view = base[:, ::2]
    # Many medium binaries inline past 64 KiB: the body is packed a second time (see _pack_body);
    # the second pass must reuse the first pass's hand-overs, not make new ones.
    result = {"deep": [[{"v": view}]], "inline": [b"i" * 60_000] * 3}
    handoffs: list[str] = []
    frames = _reply(result, handoffs=handoffs)
    assert len(handoffs) == 1 and len(_body_refs(frames)) == 1
    got = wire.decode(frames).message.result
    assert np.array_equal(got["deep"][0][0]["v"], view)
    assert [len(b) for b in got["inline"]] == [60_000] * 3


def test_arrays_in_a_segment_are_handed_over_at_any_size() -> None:
    arr = shm.empty(100, "int16")
    arr[:] = np.arange(100)
    frames = _reply({"whole": arr, "tail": arr[90:], "again": arr})
    refs = _body_refs(frames)
    assert len({r[0] for r in refs}) == 1 and sorted(r[1] for r in refs) == [0, 0, 180]
    got = wire.decode(frames).message.result
    assert got["tail"].tolist() == list(range(90, 100)) and got["whole"].sum() == sum(range(100))
    # Sent again in another message: a new hand-over name of the same segment.
    again = wire.decode(_reply(arr)).message.result
    assert np.array_equal(again, arr)


def test_requests_carry_hand_overs_too() -> None:
    frames = wire.encode(messages.RpcRequest(method="put", args={"t": np.ones(THRESHOLD, dtype=np.uint8)}),
                         sender="c", shm_threshold=THRESHOLD)
    env = wire.decode(frames)
    assert env.message.args["t"].sum() == THRESHOLD


def test_missing_segment_is_a_clear_decode_error() -> None:
    frames = _reply(np.ones(THRESHOLD, dtype=np.uint8))
    wire.decode(frames)
    with pytest.raises(ProtocolError) as info:
        wire.decode(frames)  # claimed already: the name is gone
    assert info.value.code is ErrorCode.NOT_FOUND and "does not exist" in info.value.reason
    assert info.value.header.parent_id == REQUEST.msg_id  # the caller can still be told


def test_shared_memory_is_refused_where_not_same_host() -> None:
    handoffs: list[str] = []
    frames = _reply(np.ones(THRESHOLD, dtype=np.uint8), handoffs=handoffs)
    with pytest.raises(ProtocolError) as info:
        wire.decode(frames, shm=False)
    assert info.value.code is ErrorCode.FORBIDDEN
    assert os.path.exists(os.path.join(shm.SHM_DIR, handoffs[0]))  # not claimed
    handover.reclaim(handoffs)


@pytest.mark.parametrize("ref", [
    "mk.0.1.x",
    ["mk.0.1.x", 0, 10, "<f4"],
    ["../../etc/passwd", 0, 4, None, None],
    ["mk.0.1.x", -1, 4, None, None],
    ["mk.0.1.x", 0, "4", None, None],
    ["mk.0.1.x", 0, 4, "<f4", None],
    ["mk.0.1.x", 0, 4, None, [1]],
    ["mk.0.1.x", 0, 4, "<f4", [-1]],
    ["mk.0.1.x", 0, 4, "<f4", [1.5]],
])
def test_malformed_references_are_rejected(ref: object) -> None:
    with pytest.raises(ProtocolError) as info:
        wire.decode(_with_ref(ref))
    assert info.value.code is ErrorCode.MALFORMED


def test_references_must_fit_their_segment_and_dtype() -> None:
    for ref_tail in ([0, 1 << 30, None, None], [0, 8, "<f8", [2]], [0, 12, "<f8", [1]], [0, 8, "nonsense", [1]]):
        name, _ = handover.export(np.ones(THRESHOLD, dtype=np.uint8), {})
        with pytest.raises(ProtocolError) as info:
            wire.decode(_with_ref([name, *ref_tail]))
        assert info.value.code is ErrorCode.MALFORMED
        assert not os.path.exists(os.path.join(shm.SHM_DIR, name))  # claimed even so: nothing leaks
    unknown = f"mk.0.{os.getpid()}.nosuch"
    with pytest.raises(ProtocolError) as info:
        wire.decode(_with_ref([unknown, 0, 4, None, None]))
    assert info.value.code is ErrorCode.NOT_FOUND


def test_a_caller_learns_at_once_that_its_reply_cannot_be_claimed() -> None:
    import threading

    import zmq

    from protocols.transport import SyncRequester

    ctx = zmq.Context()
    server = ctx.socket(zmq.ROUTER)
    server.bind("inproc://shm-missing")

    def answer() -> None:
        routing, *frames = server.recv_multipart()
        request = wire.decode(frames)
        gone = f"mk.0.{os.getpid()}.gone"
        header = wire._pack_header("rpc_reply", "svc", None, request.header.msg_id, None, wire.STATUS_OK)
        body = msgpack.packb({"result": msgpack.ExtType(wire.EXT_SHM, msgpack.packb([gone, 0, 8, None, None]))})
        server.send_multipart([routing, wire.MAGIC, header, body])

    thread = threading.Thread(target=answer)
    thread.start()
    requester = SyncRequester(ctx, ["inproc://shm-missing"], sender="caller")
    try:
        with pytest.raises(ProtocolError) as info:
            requester.request(messages.RpcRequest(method="m"), timeout=60.0)
        assert info.value.code is ErrorCode.NOT_FOUND and "does not exist" in info.value.reason
    finally:
        thread.join()
        requester.close()
        server.close(linger=0)
        ctx.term()


def test_events_never_claim_shared_memory() -> None:
    name, _ = handover.export(np.ones(THRESHOLD, dtype=np.uint8), {})
    header = wire._pack_header("train.progress", "svc", None, None, None, None)
    body = msgpack.packb({"t": msgpack.ExtType(wire.EXT_SHM, msgpack.packb([name, 0, 8, None, None]))})
    with pytest.raises(ProtocolError) as info:
        wire.decode([b"train.progress", wire.MAGIC, header, body], topic=True)
    assert info.value.code is ErrorCode.FORBIDDEN
    assert os.path.exists(os.path.join(shm.SHM_DIR, name))  # left to its sender
    handover.reclaim([name])


def test_a_body_that_fails_to_encode_takes_its_hand_overs_back(monkeypatch: pytest.MonkeyPatch) -> None:
    real_export = handover.export
    calls: list[int] = []

    def export_once(obj: object, links: dict[str, str]) -> tuple[str, int]:
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("the second payload breaks")
        return real_export(obj, links)

    monkeypatch.setattr(handover, "export", export_once)
    handoffs: list[str] = []
    with pytest.raises(RuntimeError):
        _reply({"a": np.ones(THRESHOLD, dtype=np.uint8), "b": np.ones(THRESHOLD, dtype=np.uint8)}, handoffs=handoffs)
    assert len(handoffs) == 1 and not os.path.exists(os.path.join(shm.SHM_DIR, handoffs[0]))
    assert handover.pending() == []
