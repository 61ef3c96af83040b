"""Bad input on the kernel's control socket gets clear errors and never hurts the daemon."""

from __future__ import annotations

import msgpack
import pytest
import zmq

from microkernel.client import Client
from protocols import messages as m
from protocols import wire
from protocols.errors import ErrorCode, RemoteError
from tests.integration.conftest import KernelHandle

CEILING_MS = 10_000


@pytest.fixture
def kernel_config() -> str:
    return """
[kernel]
max_message_size = "1MiB"
[services.w]
entry = "tests.fixtures.crashy:Crashy"
"""


@pytest.fixture
def dealer(kernel: KernelHandle):
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(kernel.endpoints.control)
    yield sock
    sock.close()


def _reply(sock: zmq.Socket) -> wire.Envelope:
    assert sock.poll(CEILING_MS), "no reply from the kernel"
    return wire.decode(sock.recv_multipart())


def _header(**overrides) -> bytes:
    h = {"msg_id": b"x" * 16, "msg_type": "ping_request", "version": [1, 0], "sender": "fuzz", "ts_ns": 1}
    h.update(overrides)
    return msgpack.packb(h)


BAD = [
    ("no protocol frame", [b"hello"], ErrorCode.MALFORMED),
    ("header is not msgpack", [b"MK1", b"\xc1\xc1", b"\x80"], ErrorCode.MALFORMED),
    ("header not a map", [b"MK1", msgpack.packb([1, 2, 3]), b"\x80"], ErrorCode.MALFORMED),
    ("truncated", [b"MK1", _header()], ErrorCode.MALFORMED),
    ("future major version", [b"MK1", _header(version=[2, 0]), b"\x80"], ErrorCode.VERSION_MISMATCH),
    ("unknown type", [b"MK1", _header(msg_type="reboot_request"), b"\x80"], ErrorCode.UNKNOWN_TYPE),
    ("a reply sent as a request", [b"MK1", _header(msg_type="ping_reply"), msgpack.packb({"version": "1", "pid": 1, "uptime_s": 0.0})], ErrorCode.UNKNOWN_TYPE),
    ("missing field", [b"MK1", _header(msg_type="stop_request"), b"\x80"], ErrorCode.INVALID_FIELD),
    ("wrong field type", [b"MK1", _header(msg_type="scale_request"), msgpack.packb({"service": "w", "replicas": "many"})], ErrorCode.INVALID_FIELD),
    ("body garbage", [b"MK1", _header(), b"\xff\xfe"], ErrorCode.MALFORMED),
    ("oversized", [b"MK1", _header(), b"\x80", b"z" * (2 * 1024 * 1024)], ErrorCode.TOO_LARGE),
    ("unknown service", [b"MK1", _header(msg_type="stop_request"), msgpack.packb({"service": "nope"})], ErrorCode.UNKNOWN_SERVICE),
    ("negative scale", [b"MK1", _header(msg_type="scale_request"), msgpack.packb({"service": "w", "replicas": -1})], ErrorCode.INVALID_FIELD),
    ("expired deadline", [b"MK1", _header(deadline_ns=1), b"\x80"], ErrorCode.DEADLINE_EXCEEDED),
    ("stale readiness", [b"MK1", _header(msg_type="ready_request"), msgpack.packb({"service": "w", "replica": 0, "incarnation": 99, "endpoint": "ipc:///x", "methods": [], "pid": 1})], ErrorCode.BAD_STATE),
]


@pytest.mark.parametrize("frames,code", [(f, c) for _, f, c in BAD], ids=[name for name, _, _ in BAD])
def test_bad_input_gets_an_error_reply_and_the_kernel_keeps_serving(kernel: KernelHandle, dealer, frames, code) -> None:
    dealer.send_multipart(frames)
    env = _reply(dealer)
    assert env.is_error
    assert env.message.code == code.value
    assert env.message.reason
    if frames[0] == b"MK1" and code not in (ErrorCode.MALFORMED,):
        assert env.header.parent_id == b"x" * 16  # correlated whenever the header was readable
    # Still serving, on the same connection and on a new one.
    dealer.send_multipart(wire.encode(m.PingRequest(), sender="t"))
    assert isinstance(_reply(dealer).message, m.PingReply)
    with Client(runtime_dir=kernel.runtime_dir) as c:
        assert c.status()["kernel"]["pid"] == kernel.proc.pid
    assert kernel.proc.poll() is None


def test_a_burst_of_garbage_does_not_stall_a_well_behaved_client(kernel: KernelHandle, dealer) -> None:
    frames = [frames for _, frames, _ in BAD]
    for i in range(2000):
        dealer.send_multipart(frames[i % len(frames)])
    with Client(runtime_dir=kernel.runtime_dir) as c:
        for _ in range(20):
            assert c.ping()["pid"] == kernel.proc.pid
    replies = 0
    while dealer.poll(CEILING_MS if replies == 0 else 2000):
        dealer.recv_multipart()
        replies += 1
        if replies == 2000:
            break
    assert replies == 2000  # every bad message was answered


def test_remote_errors_surface_in_the_client(kernel: KernelHandle) -> None:
    with Client(runtime_dir=kernel.runtime_dir) as c:
        with pytest.raises(RemoteError) as info:
            c.restart("ghost")
        assert info.value.code == ErrorCode.UNKNOWN_SERVICE
        assert "ghost" in info.value.reason and "w" in info.value.reason


def test_a_shared_memory_reference_is_refused_and_the_segment_left_alone(kernel: KernelHandle, dealer) -> None:
    from protocols import shm

    segment = shm.Segment.create(4096, tag="probe")
    try:
        ref = msgpack.ExtType(wire.EXT_SHM, msgpack.packb([segment.name, 0, 16, None, None]))
        dealer.send_multipart([b"MK1", _header(msg_type="status_request"), msgpack.packb({"service": ref})])
        env = _reply(dealer)
        assert env.header.status == "error" and env.message.code == ErrorCode.FORBIDDEN.value
        assert shm.Segment.attach(segment.name).size == 4096  # not claimed (unlinked) by the kernel
    finally:
        segment.close()
        segment.unlink()
