"""Fuzzing a real daemon's control socket and event bus with random and mutated input.

``MK_FUZZ_FRAMES`` messages (default 100,000) go to the control socket from several DEALERs, in
bursts with a bounded window of unanswered messages per socket (the kernel's per-peer queue is
bounded too, and a reply it cannot queue is dropped). Meanwhile a well-behaved client asks for
the kernel's status in a loop; every call must succeed within the client's timeout.

Accounting: a ROUTER always knows who sent a message, so every message gets exactly one reply:
garbage without a valid envelope gets an uncorrelated ``error_reply``, a readable header a
correlated error. The only messages whose reply is impossible are those ZeroMQ itself refuses
(frames over the transport cap of 4x ``max_message_size``: the peer is disconnected, see
test_limits.py) and successful one-way messages (``heartbeat``); the fuzzer sends neither, so it
expects as many replies as messages. Requests that change the kernel's state (shutdown, reload,
adding services) are never generated; the kernel has no services, so lifecycle requests fail
with ``unknown_service``.

Run more: ``MK_FUZZ_FRAMES=1000000 MK_FUZZ_SEED=42 .venv/bin/python -m pytest -q tests/integration/test_fuzz.py``.
The seed is printed and is part of every failure message.
"""

from __future__ import annotations

import os
import random
import struct
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator

import msgpack
import pytest
import zmq

from microkernel.client import Client
from protocols import messages as m
from protocols import wire
from protocols.errors import ErrorCode
from protocols.subscription import SyncSubscriber
from tests.integration.conftest import KernelHandle

FRAMES = int(os.environ.get("MK_FUZZ_FRAMES", "100000"))
SEED = int(os.environ.get("MK_FUZZ_SEED", str(random.SystemRandom().randrange(1 << 32))))
BUS_FRAMES = 3000
SOCKETS = 4
WINDOW = 500  # unanswered messages per socket; the kernel's queue per peer is limits.max_queue (1000)
CEILING_MS = 20_000
MAX_SIZE = 1 << 20

# Requests the fuzzer may build valid-looking bodies for: none changes what the kernel runs.
REQUESTS = {
    "ping_request": {}, "status_request": {"service": str}, "list_request": {},
    "lookup_request": {"service": str}, "events_request": {"since_seq": int, "pattern": str, "limit": int},
    "start_request": {"service": str, "wait": bool}, "stop_request": {"service": str},
    "restart_request": {"service": str, "wait": bool}, "scale_request": {"service": str, "replicas": int, "wait": bool},
    "ready_request": {"service": str, "replica": int, "incarnation": int, "endpoint": str, "methods": list, "pid": int},
    "progress_request": {"service": str, "replica": int, "incarnation": int, "message": str, "extend_s": float},
    "lease_release_request": {"lease": str}, "leases_request": {},
    "ping_reply": {"version": str, "pid": int, "uptime_s": float}, "error_reply": {"code": str, "reason": str},
}  # fmt: skip
TYPES = sorted(REQUESTS)


@pytest.fixture
def kernel_config() -> str:
    # Limits far above the fuzzer's pace: the limiter has tests of its own (test_limits.py).
    return """
[kernel]
max_message_size = "1MiB"
[limits]
rate_per_s = 10000000
burst = 10000000
rejections_per_s = 10000000
"""


class Fuzzer:
    """Random and mutated control messages, as a DEALER sends them (no routing id)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.kinds: list[Callable[[], list[bytes]]] = [
            self.random_frames, self.garbage_body, self.truncated, self.bad_magic, self.huge_declared,
            self.bad_version, self.unknown_type, self.wrong_fields, self.extra_frames, self.empty_frames,
            self.deep_nesting, self.ext_types, self.giant_values, self.valid, self.mutated, self.routing_junk,
            self.bad_header_fields, self.oversized,
        ]  # fmt: skip
        self.stats: Counter[str] = Counter()
        # Large pieces are made once: building them per message would cost more than sending them.
        self.nested = [marker * depth + b"\xc0"
                       for depth in (100, 1000, 5000, 100_000) for marker in (b"\x91", b"\x81\xa1k")]
        self.big_string = "s" * 200_000
        self.big_frame = b"z" * (MAX_SIZE // 2)

    def __call__(self) -> list[bytes]:
        kind = self.rng.choice(self.kinds)
        self.stats[kind.__name__] += 1
        return kind()

    # -- pieces --

    def blob(self, limit: int = 64) -> bytes:
        return self.rng.randbytes(self.rng.randrange(limit + 1))

    def value(self, depth: int = 0) -> object:
        """A random msgpack value: scalars, binaries, ext types, giant ints, nested containers."""
        rng = self.rng
        r = rng.randrange(12 if depth < 3 else 9)
        if r == 0:
            return None
        if r == 1:
            return rng.random() < 0.5
        if r == 2:
            return rng.randrange(-(1 << 63), 1 << 64)
        if r == 3:
            return rng.choice([rng.random() * 1e300, float("nan"), float("-inf"), -0.0])
        if r == 4:
            return rng.choice(["", "w", "x" * 300, "\u2603" * 10, "\x00", "*"])
        if r == 5:
            return self.blob()
        if r == 6:
            return msgpack.ExtType(rng.randrange(128), self.blob(8))
        if r == 7:
            return rng.choice([(1 << 64) - 1, -(1 << 63), 0, -1])
        if r == 8:
            return []
        if r == 9:
            return [self.value(depth + 1) for _ in range(rng.randrange(4))]
        if r == 10:
            return {rng.choice(["service", "wait", "replicas", "x", ""]): self.value(depth + 1) for _ in range(3)}
        return {rng.randrange(100): self.value(depth + 1)}

    def header(self, **overrides: object) -> dict[str, object]:
        h: dict[str, object] = {"msg_id": self.rng.randbytes(16), "msg_type": self.rng.choice(TYPES),
                                "version": list(wire.PROTOCOL_VERSION), "sender": "fuzz", "ts_ns": 1}
        h.update(overrides)
        return h

    def body(self, msg_type: str) -> dict[str, object]:
        fields = REQUESTS.get(msg_type, {})
        sample = {str: lambda: self.rng.choice(["", "nope", "w"]), int: lambda: self.rng.randrange(-5, 5),
                  bool: lambda: self.rng.random() < 0.5, float: lambda: self.rng.random(), list: lambda: ["a"]}
        return {k: sample[t]() for k, t in fields.items() if self.rng.random() < 0.9}

    def message(self) -> list[bytes]:
        h = self.header()
        return [wire.MAGIC, msgpack.packb(h), msgpack.packb(self.body(str(h["msg_type"])))]

    # -- kinds --

    def random_frames(self) -> list[bytes]:
        return [self.blob(200) for _ in range(self.rng.randrange(1, 6))]

    def garbage_body(self) -> list[bytes]:
        return [wire.MAGIC, msgpack.packb(self.header()), self.blob(100)]

    def truncated(self) -> list[bytes]:
        frames = self.message()
        if self.rng.random() < 0.5:
            return frames[: self.rng.randrange(1, 3)]
        i = self.rng.randrange(1, 3)
        frames[i] = frames[i][: self.rng.randrange(len(frames[i]))]
        return frames

    def bad_magic(self) -> list[bytes]:
        frames = self.message()
        frames[0] = self.rng.choice([b"", b"MK2", b"mk1", b"MK", b"MK1\x00", self.blob(3)])
        if self.rng.random() < 0.3:
            del frames[0]
        return frames

    def huge_declared(self) -> list[bytes]:
        lengths = [b"\xdb\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff", b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff",
                   b"\xc9\x7f\xff\xff\xff\x05", b"\xda\xff\xff"]  # str32 bin32 array32 map32 ext32 str16
        lie = self.rng.choice(lengths) + self.blob(20)
        if self.rng.random() < 0.5:
            return [wire.MAGIC, lie, msgpack.packb({})]
        body = b"\x81\xa7service" + lie  # {"service": <lie>}
        return [wire.MAGIC, msgpack.packb(self.header(msg_type="stop_request")), body]

    def bad_version(self) -> list[bytes]:
        version = self.rng.choice([[2, 0], [0, 1], [1], [], "1.3", [1, "x"], [-1, 1 << 63], None, [1, 2, 3], [1.0, 3]])
        h = self.header(version=version)
        return [wire.MAGIC, msgpack.packb(h), msgpack.packb(self.body(str(h["msg_type"])))]

    def unknown_type(self) -> list[bytes]:
        name = self.rng.choice(["", "reboot_request", "x" * 2000, "\u2603_request", "service.ready", "a.b",
                                str(self.rng.random())])
        return [wire.MAGIC, msgpack.packb(self.header(msg_type=name)), msgpack.packb({"a": 1})]

    def wrong_fields(self) -> list[bytes]:
        h = self.header()
        body = {k: self.value() for k in REQUESTS[str(h["msg_type"])]}
        if self.rng.random() < 0.3:
            body = self.rng.choice([[], 1, "s", None, b"b", [body]])  # not even a map
        return [wire.MAGIC, msgpack.packb(h), msgpack.packb(body)]

    def extra_frames(self) -> list[bytes]:
        frames = self.message()
        frames += [self.blob(100) for _ in range(self.rng.randrange(1, 5))]
        if self.rng.random() < 0.5:  # a body that points at frames, well or badly
            target = self.rng.choice([0, 7, -1, [0, "<f4", [2]], ["x", 0, 9, None, None]])
            ref = msgpack.ExtType(self.rng.choice([1, 2, 3]), msgpack.packb(target))
            frames[2] = msgpack.packb({"service": ref, "pattern": ref})
        return frames

    def empty_frames(self) -> list[bytes]:
        return self.rng.choice([[b""], [b"", b"", b""], [wire.MAGIC, b"", b""],
                                [wire.MAGIC, msgpack.packb(self.header()), b""], [b""] * 9])

    def deep_nesting(self) -> list[bytes]:
        nested = self.rng.choice(self.nested)
        if self.rng.random() < 0.5:
            return [wire.MAGIC, nested, msgpack.packb({})]
        return [wire.MAGIC, msgpack.packb(self.header(msg_type="events_request")), b"\x81\xa7pattern" + nested]

    def ext_types(self) -> list[bytes]:
        ext = msgpack.ExtType(self.rng.randrange(128), self.blob(16))
        h = self.header()
        fields = REQUESTS[str(h["msg_type"])]
        if self.rng.random() < 0.3:
            h[self.rng.choice(["msg_id", "msg_type", "sender", "ts_ns", "parent_id", "deadline_ns"])] = ext
        if self.rng.random() < 0.5:  # negative (reserved) types, e.g. -1 timestamps with bad data
            data = self.blob(12)
            raw = b"\xc7" + bytes((len(data),)) + struct.pack("b", self.rng.randrange(-128, 0)) + data
            return [wire.MAGIC, msgpack.packb(h), b"\x81\xa7service" + raw]
        return [wire.MAGIC, msgpack.packb(h), msgpack.packb({k: ext for k in fields} or {"x": ext})]

    def giant_values(self) -> list[bytes]:
        giant = self.rng.choice([(1 << 64) - 1, -(1 << 63), float("inf"), -1e308, 2**63, "s" * 1000])
        h = self.header(msg_type=self.rng.choice(["events_request", "scale_request", "status_request",
                                                  "lookup_request"]))
        body = {k: giant for k in ("since_seq", "limit", "pattern", "service", "replicas")}
        if self.rng.random() < 0.05:  # a long string, within the size limit
            body[self.rng.choice(list(body))] = self.big_string
        if self.rng.random() < 0.3:
            h["deadline_ns"] = giant
        return [wire.MAGIC, msgpack.packb(h), msgpack.packb(body)]

    def valid(self) -> list[bytes]:
        msg_type = self.rng.choice(["ping_request", "status_request", "list_request", "events_request",
                                    "leases_request"])
        deadline = self.rng.choice([None, 1, (1 << 64) - 1])
        h = self.header(msg_type=msg_type, **({} if deadline is None else {"deadline_ns": deadline}))
        return [wire.MAGIC, msgpack.packb(h), msgpack.packb({})]

    def mutated(self) -> list[bytes]:
        frames = self.message()
        for _ in range(self.rng.randrange(1, 4)):
            i = self.rng.randrange(len(frames))
            data = bytearray(frames[i])
            op = self.rng.randrange(3)
            pos = self.rng.randrange(len(data) + 1)
            if op == 0 and data:
                data[min(pos, len(data) - 1)] ^= 1 << self.rng.randrange(8)
            elif op == 1:
                data[pos:pos] = self.blob(4)
            else:
                del data[pos:pos + self.rng.randrange(1, 4)]
            frames[i] = bytes(data)
        return frames

    def routing_junk(self) -> list[bytes]:
        return [self.blob(8) for _ in range(self.rng.randrange(1, 10))] + self.message()

    def bad_header_fields(self) -> list[bytes]:
        key = self.rng.choice(["msg_id", "msg_type", "sender", "ts_ns", "parent_id", "deadline_ns", "status"])
        h = self.header(**{key: self.value()})
        if self.rng.random() < 0.2:
            del h[self.rng.choice(list(h))]
        return [wire.MAGIC, msgpack.packb(h), msgpack.packb({})]

    def oversized(self) -> list[bytes]:
        if self.rng.random() < 0.9:  # rare: large frames are costly to send
            return self.message()
        return self.message() + [self.big_frame] * 3  # over the protocol limit, under ZeroMQ's cap


def _status_loop(runtime_dir: object, stop: threading.Event, failures: list[str], calls: list[int]) -> None:
    """The well-behaved client: status and ping in a loop; every call must succeed in time."""
    try:
        with Client(runtime_dir=runtime_dir, timeout=CEILING_MS / 1000, name="polite") as client:
            while not stop.is_set():
                client.status()
                client.ping()
                calls[0] += 1
    except Exception as exc:
        failures.append(f"{type(exc).__name__}: {exc}")


def test_the_control_socket_survives_fuzzing(kernel: KernelHandle) -> None:
    print(f"fuzz seed {SEED} (MK_FUZZ_SEED), {FRAMES} messages (MK_FUZZ_FRAMES)")
    fuzz = Fuzzer(random.Random(SEED))
    where = f"(seed {SEED}; rerun with MK_FUZZ_SEED={SEED})"
    ctx = zmq.Context()
    socks = []
    for _ in range(SOCKETS):
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(kernel.endpoints.control)
        socks.append(sock)
    sent, received = [0] * SOCKETS, [0] * SOCKETS
    codes: Counter[str] = Counter()

    def receive(i: int, block: bool) -> None:
        sock = socks[i]
        while True:
            if not sock.poll(CEILING_MS if block else 0):
                missing = sent[i] - received[i]
                assert not block, f"socket {i}: {missing} messages unanswered after {CEILING_MS} ms {where}"
                return
            frames = sock.recv_multipart()
            received[i] += 1
            start = frames.index(wire.MAGIC)  # replies to routing junk carry the junk back first
            header = msgpack.unpackb(frames[start + 1])
            assert header["status"] in ("ok", "error"), f"{header} {where}"
            if header["status"] == "error":
                codes[msgpack.unpackb(frames[start + 2])["code"]] += 1
            else:
                codes["ok"] += 1
            block = False

    stop, failures, calls = threading.Event(), [], [0]
    # Three threads of this process share the GIL (the fuzzer, the well-behaved client, the reader of
    # the daemon's output): hand it over more often than every 5 ms, or each waits on the others.
    switch = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    polite = threading.Thread(target=_status_loop, args=(kernel.runtime_dir, stop, failures, calls))
    polite.start()
    try:
        for n in range(FRAMES):
            i = n % SOCKETS
            socks[i].send_multipart(fuzz())
            sent[i] += 1
            if sent[i] - received[i] >= WINDOW:
                receive(i, block=True)
                while sent[i] - received[i] > WINDOW // 2:
                    receive(i, block=True)
            assert not failures, f"the well-behaved client failed: {failures[0]} {where}"
        for i in range(SOCKETS):
            while received[i] < sent[i]:
                receive(i, block=True)
    finally:
        sys.setswitchinterval(switch)
        stop.set()
        polite.join()
        for sock in socks:
            sock.close()
        ctx.term()
    print(f"kinds {dict(fuzz.stats)}\nreplies {dict(codes)}\nwell-behaved calls {calls[0]}")
    assert not failures, f"the well-behaved client failed: {failures[0]} {where}"
    assert received == sent, where
    assert kernel.proc.poll() is None, f"the daemon died {where}"
    assert calls[0] > 0, "the well-behaved client never completed a call"
    assert set(codes) <= {c.value for c in ErrorCode} | {"ok"}, where
    assert codes[ErrorCode.INTERNAL.value] == 0, f"the kernel reported internal errors {where}"
    with Client(runtime_dir=kernel.runtime_dir) as client:
        assert client.ping()["pid"] == kernel.proc.pid


def test_the_event_bus_survives_garbage(kernel: KernelHandle) -> None:
    rng = random.Random(SEED)
    where = f"(seed {SEED}; rerun with MK_FUZZ_SEED={SEED})"
    ctx = zmq.Context()
    subscriber = SyncSubscriber(ctx, kernel.endpoints.events_out, ["fuzz.ok"], timeout=CEILING_MS / 1000)
    pub = ctx.socket(zmq.XPUB)
    pub.linger = 0
    pub.setsockopt(zmq.SNDHWM, 0)  # queue rather than drop while the bus catches up: every event counts
    pub.connect(kernel.endpoints.events_in)
    try:
        assert pub.poll(CEILING_MS) and pub.recv()[:1] == b"\x01", "the event bus never subscribed"
        good = 0
        for n in range(BUS_FRAMES):
            if n % 10 == 0:
                pub.send_multipart(wire.encode(wire.Event("fuzz.ok", {"n": good}), sender="fuzz", topic="fuzz.ok"))
                good += 1
                continue
            frames = [rng.randbytes(rng.randrange(40)) for _ in range(rng.randrange(1, 6))]
            if rng.random() < 0.5:  # garbage that reaches the subscriber too
                frames[0] = b"fuzz.ok" + frames[0][:3]
                if rng.random() < 0.5:
                    frames[1:1] = [wire.MAGIC]
            pub.send_multipart(frames)
        seen = []
        while len(seen) < good:
            env = subscriber.next_event(timeout=CEILING_MS / 1000)
            assert env is not None, f"only {len(seen)} of {good} well-formed events arrived {where}"
            if env.topic == "fuzz.ok" and isinstance(env.message, wire.Event):
                seen.append(env.message.data.get("n"))
        assert seen == list(range(good)), where
    finally:
        pub.close()
        subscriber.close()
        ctx.term()
    # The kernel's own events still flow: a new subscriber gets its welcome.
    late = SyncSubscriber(zmq.Context.instance(), kernel.endpoints.events_out, ["kernel.*"], timeout=CEILING_MS / 1000)
    late.close()
    assert kernel.proc.poll() is None
