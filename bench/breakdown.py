"""CPU cost of each stage of our hot paths next to the raw-pyzmq equivalent, in-process.

Usage::

    .venv/bin/python bench/breakdown.py          # one JSON line: microseconds per operation

Each figure is the best of several ``timeit`` repeats (robust to background load) of one
stage, with no network in between (inproc sockets where a socket is needed). It explains the
end-to-end figures of ``bench/rpc.py``: where a round trip, a forwarded event or a status
request spends its CPU. Not an acceptance figure.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import timeit
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import msgpack
import zmq

from bench.harness import PAYLOAD_TEXT, emit, log

NUMBER = 20_000
REPEAT = 7


def best_us(fn: Any, number: int = NUMBER) -> float:
    return round(min(timeit.repeat(fn, number=number, repeat=REPEAT)) / number * 1e6, 2)


def socket_pair(ctx: zmq.Context, name: str) -> tuple[zmq.Socket, zmq.Socket]:
    a = ctx.socket(zmq.PAIR)
    b = ctx.socket(zmq.PAIR)
    a.sndhwm = b.rcvhwm = 0
    b.bind(f"inproc://{name}")
    a.connect(f"inproc://{name}")
    return a, b


def rpc_stages(ctx: zmq.Context) -> dict[str, float]:
    from protocols import messages, wire

    out: dict[str, float] = {}
    req = messages.RpcRequest(method="echo", args={"text": PAYLOAD_TEXT})
    req_frames = wire.encode(req, sender="bench", msg_id=wire.new_msg_id(), deadline_ns=1 << 62)
    routed = [b"\x00\x80\x00\x00\x29", *req_frames]
    env = wire.decode(routed)
    result = {"text": PAYLOAD_TEXT}
    reply_frames = wire.encode_reply(env.header, messages.RpcReply(result=result), sender="svc:echo.0.1",
                                     routing=env.routing)

    # codec
    out["client_encode_request"] = best_us(lambda: wire.encode(req, sender="bench", msg_id=wire.new_msg_id(), deadline_ns=1 << 62))
    out["server_decode_request"] = best_us(lambda: wire.decode(routed))
    out["server_encode_reply"] = best_us(lambda: wire.encode_reply(
        env.header, messages.RpcReply(result=result), sender="svc:echo.0.1", routing=env.routing))
    out["client_decode_reply"] = best_us(lambda: wire.decode(reply_frames[1:]))
    out["decode_header_only"] = best_us(lambda: wire._decode_header(req_frames[1]))
    out["raw_msgpack_pack"] = best_us(lambda: msgpack.packb({"text": PAYLOAD_TEXT}))
    out["raw_msgpack_unpack"] = best_us(lambda: msgpack.unpackb(routed[-1]))
    packer = msgpack.Packer(use_bin_type=True)
    hdr = {"msg_id": b"0123456789abcdef", "msg_type": "rpc_request", "version": (1, 0), "sender": "bench",
           "ts_ns": 1, "deadline_ns": 2}
    out["msgpack_packb_header"] = best_us(lambda: msgpack.packb(hdr, use_bin_type=True))
    out["msgpack_reused_packer_header"] = best_us(lambda: packer.pack(hdr))
    out["header_construct"] = best_us(lambda: wire.Header(
        msg_id=b"x", msg_type="rpc_request", version=(1, 0), sender="s", ts_ns=1, parent_id=None, deadline_ns=None,
        status=None))

    # transport (inproc, same thread): send + recv of the same message
    a, b = socket_pair(ctx, "rpc")
    four = reply_frames
    one = msgpack.packb({"text": PAYLOAD_TEXT})

    def multi_nocopy() -> None:
        a.send_multipart(four, copy=False)
        b.recv_multipart(copy=False)

    def multi_copy() -> None:
        a.send_multipart(four)
        b.recv_multipart()

    def single() -> None:
        a.send(one)
        b.recv()

    send_message, recv_message = _frame_io()
    out["sdk_send_message_recv_message_5_frames"] = best_us(lambda: (send_message(a, four), recv_message(b)))
    low_send, low_recv = lowlevel_frame_io()
    out["lowlevel_pyzmq_5_frames_send_recv"] = best_us(lambda: (low_send(a, four), low_recv(b)))
    out["zmq_5_frames_copy_false_send_recv"] = best_us(multi_nocopy)
    out["zmq_5_frames_copy_true_send_recv"] = best_us(multi_copy)
    out["zmq_1_frame_send_recv"] = best_us(single)
    poller = zmq.Poller()
    poller.register(b, zmq.POLLIN)
    a.send(one)
    out["zmq_poller_poll_ready"] = best_us(lambda: poller.poll(1000))
    out["zmq_socket_poll_ready"] = best_us(lambda: b.poll(1000))
    out["zmq_attr_set_sndtimeo"] = best_us(lambda: setattr(a, "sndtimeo", 30000))
    out["zmq_setsockopt_int_sndtimeo"] = best_us(lambda: a.setsockopt(int(zmq.SNDTIMEO), 30000))
    out["zmq_attr_get_rcvmore"] = best_us(lambda: b.rcvmore)
    out["zmq_getsockopt_rcvmore"] = best_us(lambda: b.getsockopt(zmq.RCVMORE))
    b.recv()
    a.close()
    b.close()
    return out


def dataplane_stages(ctx: zmq.Context) -> dict[str, float]:
    """The replica's whole request handling (decode, checks, handler, encode) minus zmq I/O."""
    from protocols import messages, wire
    from services.base import Service, rpc
    from services.dataplane import DataPlane
    from services.handlers import bind_rpc_handlers

    class E(Service):
        @rpc
        def echo(self, text: str) -> dict[str, Any]:
            return {"text": text}

    out: dict[str, float] = {}

    async def main() -> None:
        dp = DataPlane(ctx, "inproc://dp", bind_rpc_handlers(E()), service="echo", sender="svc:echo.0.1",
                       log=logging.getLogger("bench"))
        dp.serve()
        sent: list[Any] = []
        dp.socket.send = sent.append  # type: ignore[method-assign]
        req = messages.RpcRequest(method="echo", args={"text": PAYLOAD_TEXT})
        frames = [b"\x00\x80\x00\x00\x29", *wire.encode(req, sender="bench", deadline_ns=1 << 62)]

        def once() -> None:
            dp._on_message(frames)
            sent.clear()

        out["server_on_message_total"] = best_us(once)
        dp.socket.close()

    with asyncio.Runner() as runner:
        runner.run(main())
    return out


def lowlevel_frame_io() -> tuple[Any, Any]:
    """Multipart send/recv without pyzmq's Python-level sugar: int flags, the Cython base class's
    ``send``/``recv`` and ``get(RCVMORE)`` (no ``send_multipart`` type checks, no ``enum.Flag``
    arithmetic per frame, no attribute lookups by name; ``get`` still converts the option to a
    ``SocketOption`` enum inside pyzmq).
    Same frames and copy policy as ``protocols.transport`` (envelope copied, payload zero-copy).
    A reference for what the transport could cost, not used by the SDK.
    """
    from zmq.backend import Socket as Base

    bsend, brecv, bget = Base.send, Base.recv, Base.get
    more_flag, rcvmore = int(zmq.SNDMORE), int(zmq.RCVMORE)

    def send(sock: zmq.Socket, frames: Any, flags: int = 0) -> None:
        flags = int(flags)
        copy = all(type(f) is bytes and len(f) < 65536 for f in frames)
        last = len(frames) - 1
        for i, f in enumerate(frames):
            bsend(sock, f, flags | more_flag if i < last else flags, copy)

    def recv(sock: zmq.Socket, flags: int = 0) -> list[Any]:
        f = brecv(sock, int(flags))
        frames = [f]
        after_magic = 0 if f == b"MK1" else -1
        while bget(sock, rcvmore):
            if after_magic >= 2:
                frames.append(brecv(sock, 0, False))
                continue
            f = brecv(sock, 0)
            frames.append(f)
            if after_magic >= 0:
                after_magic += 1
            elif f == b"MK1":
                after_magic = 0
        return frames

    return send, recv


def _frame_io() -> tuple[Any, Any]:
    """The SDK's multipart send/recv helpers (protocols.transport), or pyzmq's if it has none."""
    from protocols import transport

    send = getattr(transport, "send_message", None)
    recv = getattr(transport, "recv_message", None)
    if send is None or recv is None:
        return (lambda s, frames, flags=0: s.send_multipart(frames, flags, copy=False),
                lambda s, flags=0: s.recv_multipart(flags, copy=False))
    return send, recv


def client_stages(ctx: zmq.Context) -> dict[str, float]:
    """A whole request/reply in one thread over inproc, minus the server's codec.

    ``ours``: what ``SyncRequester.request`` does (wire.encode, the SDK's frame send, socket
    option updates, frame receive, wire.decode) plus the responder's raw recv + send of a
    pre-encoded reply. ``raw``: msgpack and a single frame each way.
    """
    from protocols import messages, wire
    from protocols.transport import SyncRequester

    send_message, recv_message = _frame_io()
    out: dict[str, float] = {}
    router = ctx.socket(zmq.ROUTER)
    router.bind("inproc://client")
    requester = SyncRequester(ctx, ["inproc://client"], sender="bench")
    result = {"text": PAYLOAD_TEXT}
    msg_id = wire.new_msg_id()
    hdr = wire.decode(wire.encode(messages.RpcRequest(method="echo", args={}), sender="bench", msg_id=msg_id)).header
    reply = wire.encode_reply(hdr, messages.RpcReply(result=result), sender="svc:echo.0.1")
    msg = messages.RpcRequest(method="echo", args={"text": PAYLOAD_TEXT})
    sock = requester.sock
    set_timeout = getattr(requester, "_set_timeout", None)  # what SyncRequester does per request
    if set_timeout is None:
        def set_timeout(option: int, ms: int) -> None:
            sock.setsockopt(option, ms)
    sndtimeo, rcvtimeo = int(zmq.SNDTIMEO), int(zmq.RCVTIMEO)

    def ours() -> None:
        set_timeout(sndtimeo, 30000)
        send_message(sock, wire.encode(msg, sender="bench", msg_id=msg_id, deadline_ns=1 << 62))
        ident = router.recv_multipart()[0]
        router.send_multipart([ident, *reply])
        set_timeout(rcvtimeo, 30000)
        wire.decode(recv_message(sock))

    out["client_roundtrip_inproc_ours_no_server_codec"] = best_us(ours)
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect("inproc://client")
    one = msgpack.packb(result)

    def raw_rt() -> None:
        dealer.send(msgpack.packb({"text": PAYLOAD_TEXT}))
        ident, _body = router.recv_multipart()
        router.send_multipart([ident, one])
        msgpack.unpackb(dealer.recv())

    out["client_roundtrip_inproc_raw_no_server_codec"] = best_us(raw_rt)
    requester.close()
    dealer.close()
    router.close()
    return out


def event_stages(ctx: zmq.Context) -> dict[str, float]:
    from protocols import wire
    from protocols.subscription import topic_matches
    from services.events import EventPublisher

    out: dict[str, float] = {}
    data = {"seq": 1, "data": "x" * 80}
    frames = wire.encode(wire.Event("bench.tick", data), sender="svc:publisher.0.1", topic="bench.tick")

    async def pub() -> None:
        p = EventPublisher(ctx, "inproc://nowhere", sender="svc:publisher.0.1", log=logging.getLogger("bench"))
        p.synced = True
        sink: list[Any] = []
        p.socket.send = sink.append  # type: ignore[method-assign]

        def once() -> None:
            p.publish("bench.tick", data)
            sink.clear()

        out["publisher_publish_no_io"] = best_us(once)
        p.socket.close()

    with asyncio.Runner() as runner:
        runner.run(pub())
    out["subscriber_decode"] = best_us(lambda: wire.decode(frames, topic=True))
    out["subscriber_topic_matches"] = best_us(lambda: topic_matches(["bench.*"], "bench.tick"))
    out["raw_event_pack"] = best_us(lambda: msgpack.packb(data))
    out["raw_event_unpack"] = best_us(lambda: msgpack.unpackb(frames[-1]))

    a, b = socket_pair(ctx, "ev")

    def proxy_hop_nocopy() -> None:  # what the kernel's proxy does per event (recv + send)
        a.send_multipart(frames, copy=False)
        b.recv_multipart(copy=False)

    def raw_two_frames() -> None:
        a.send_multipart([b"bench.tick", frames[-1]])
        b.recv_multipart()

    send_message, recv_message = _frame_io()

    def sdk_hop() -> None:  # the SDK helpers: one send + one receive of an event's 4 frames
        send_message(a, frames)
        recv_message(b)

    out["sdk_send_recv_event_4_frames"] = best_us(sdk_hop)
    out["zmq_4_frames_copy_false_send_recv"] = best_us(proxy_hop_nocopy)
    out["zmq_2_frames_copy_true_send_recv"] = best_us(raw_two_frames)
    a.close()
    b.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ctx = zmq.Context()
    result: dict[str, Any] = {"bench": "breakdown", "unit": "us per operation (best of repeats)"}
    for name, fn in (("rpc", rpc_stages), ("dataplane", dataplane_stages), ("client", client_stages),
                     ("events", event_stages)):
        log(f"measuring {name} stages")
        result.update(fn(ctx))
    result["loadavg_1m"] = round(os.getloadavg()[0], 2)
    ctx.term()
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
