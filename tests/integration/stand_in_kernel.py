"""A stand-in for the kernel made of real sockets, for testing services without the daemon.

``FakeKernel`` binds the kernel's three endpoints in a runtime directory (control ROUTER, event
XSUB that subscribes to everything, event XPUB answering the ``_mk.welcome.<token>`` handshake)
and is driven synchronously from the test thread: ``pump`` forwards events and records control
messages, ``wait_*`` pump until what they wait for arrived (timeouts are ceilings only).
``spawn`` starts ``python -m services.runner`` with the ``MK_*`` environment pointing at it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from protocols import messages, wire
from protocols.endpoints import KernelEndpoints, service_endpoint
from protocols.subscription import WELCOME_PREFIX

REPO = Path(__file__).resolve().parents[2]
CEILING = 20.0  # seconds; only ever a ceiling for a wait that ends on an event


class FakeKernel:
    """The kernel's sockets, driven synchronously from the test thread by ``pump``."""

    def __init__(self, runtime_dir: str) -> None:
        self.runtime_dir = runtime_dir
        self.endpoints = KernelEndpoints.in_runtime_dir(runtime_dir)
        self.ctx = zmq.Context()
        self.control = self.ctx.socket(zmq.ROUTER)
        self.control.linger = 0
        self.control.bind(self.endpoints.control)
        self.xsub = self.ctx.socket(zmq.XSUB)
        self.xsub.linger = 0
        self.xsub.bind(self.endpoints.events_in)
        self.xsub.send(b"\x01")  # subscribe to everything publishers send, like the kernel's proxy
        self.xpub = self.ctx.socket(zmq.XPUB)
        self.xpub.linger = 0
        self.xpub.setsockopt(zmq.XPUB_VERBOSE, 1)  # see every subscription, duplicates included
        self.xpub.bind(self.endpoints.events_out)
        self.poller = zmq.Poller()
        for sock in (self.control, self.xsub, self.xpub):
            self.poller.register(sock, zmq.POLLIN)
        self.inbox: list[tuple[bytes, wire.Envelope]] = []  # control messages, in arrival order
        self.events: list[wire.Envelope] = []
        self.subscriptions: list[str] = []

    def pump(self, timeout: float) -> None:
        """Process everything that arrives within ``timeout`` seconds of the first poll."""
        for sock, _ in self.poller.poll(max(1, int(timeout * 1000))):
            while sock.poll(0):
                frames = sock.recv_multipart(copy=False)
                if sock is self.control:
                    self.inbox.append((frames[0].bytes, wire.decode(frames)))
                elif sock is self.xsub:
                    self.events.append(wire.decode(frames, topic=True))
                    self.xpub.send_multipart(frames)
                else:
                    self._on_subscription(frames[0].bytes)

    def _on_subscription(self, raw: bytes) -> None:
        self.xsub.send(raw)  # forward upstream, as a proxy does
        if raw[:1] != b"\x01":
            return
        topic = raw[1:].decode()
        self.subscriptions.append(topic)
        if topic.startswith(WELCOME_PREFIX):
            self.xpub.send_multipart(wire.encode(messages.KernelWelcome(next_seq=0), sender="kernel", topic=topic))

    def wait_control(self, msg_type: str, *, after: int = 0, timeout: float = CEILING) -> tuple[int, bytes, wire.Envelope]:
        """The first control message of ``msg_type`` at inbox index >= ``after``."""
        deadline = time.monotonic() + timeout
        while True:
            for i in range(after, len(self.inbox)):
                identity, env = self.inbox[i]
                if env.msg_type == msg_type:
                    return i, identity, env
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {msg_type} within {timeout}s; got {[e.msg_type for _, e in self.inbox]}")
            self.pump(left)

    def wait_event(self, topic: str, timeout: float = CEILING) -> wire.Envelope:
        deadline = time.monotonic() + timeout
        while True:
            for env in self.events:
                if env.topic == topic:
                    return env
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no event {topic!r} within {timeout}s")
            self.pump(left)

    def reply(self, identity: bytes, request: wire.Envelope, message: Any) -> None:
        self.control.send_multipart(wire.encode_reply(request.header, message, sender="kernel", routing=[identity]))

    def publish(self, topic: str, data: dict[str, Any]) -> None:
        self.xpub.send_multipart(wire.encode(wire.Event(topic, data), sender="kernel", topic=topic))

    def close(self) -> None:
        self.ctx.destroy(linger=0)


@dataclass
class Child:
    """A runner process and where its output goes."""

    proc: subprocess.Popen[bytes]
    endpoint: str
    log_path: Path

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float = CEILING) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"runner did not exit within {timeout}s; output:\n{self.output()}") from None

    def kill(self) -> None:
        """Kill the whole process group (the replica and anything it spawned)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def runner_env(kernel: FakeKernel, service: str, *, config: dict[str, Any] | None = None,
               heartbeat: float = 0.05, **overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        MK_SERVICE=service,
        MK_REPLICA="0",
        MK_INCARNATION="1",
        MK_RUNTIME_DIR=kernel.runtime_dir,
        MK_CONTROL_ENDPOINT=kernel.endpoints.control,
        MK_EVENTS_IN_ENDPOINT=kernel.endpoints.events_in,
        MK_EVENTS_OUT_ENDPOINT=kernel.endpoints.events_out,
        MK_ENDPOINT=service_endpoint(kernel.runtime_dir, service, 0, 1),
        MK_HEARTBEAT_INTERVAL=repr(heartbeat),
        MK_CONFIG=json.dumps(config or {}),
        MK_MAX_MESSAGE_SIZE=str(4 << 20),
        MK_KERNEL_PID=str(os.getpid()),
        MK_LOG_LEVEL="INFO",
        PYTHONPATH=str(REPO),
    )
    env.update(overrides)
    return env


def spawn(kernel: FakeKernel, entry: str, service: str, **kw: Any) -> Child:
    env = runner_env(kernel, service, **kw)
    log_path = Path(kernel.runtime_dir) / f"{service}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "services.runner", entry], cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return Child(proc, env["MK_ENDPOINT"], log_path)


def make_ready(kernel: FakeKernel, child: Child) -> messages.ReadyRequest:
    """Wait for the replica's ready_request and acknowledge it."""
    _, identity, env = kernel.wait_control("ready_request")
    kernel.reply(identity, env, messages.ReadyReply(state="ready"))
    return env.message


class Caller:
    """A raw DEALER on a replica's data plane."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(endpoint)

    def send(self, method: str, /, *, deadline_ns: int | None = None, **args: Any) -> bytes:
        msg_id = wire.new_msg_id()
        self.sock.send_multipart(wire.encode(messages.RpcRequest(method=method, args=args), sender="test",
                                             msg_id=msg_id, deadline_ns=deadline_ns), copy=False)
        return msg_id

    def recv(self, timeout: float = CEILING) -> wire.Envelope:
        assert self.sock.poll(int(timeout * 1000)), f"no reply within {timeout}s"
        return wire.decode(self.sock.recv_multipart(copy=False))

    def call(self, method: str, /, **args: Any) -> wire.Envelope:
        msg_id = self.send(method, **args)
        env = self.recv()
        assert env.header.parent_id == msg_id
        return env

    def result(self, method: str, /, **args: Any) -> Any:
        env = self.call(method, **args)
        assert not env.is_error, env.message
        return env.message.result

    def error(self, method: str, /, **args: Any) -> messages.ErrorReply:
        env = self.call(method, **args)
        assert env.is_error, env.message
        return env.message

    def close(self) -> None:
        self.sock.close(linger=0)
