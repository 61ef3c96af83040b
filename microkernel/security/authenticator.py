"""CURVE authentication on the kernel's own loop: a ZAP handler, and a socket that knows who sent what.

ZeroMQ asks the ZAP handler (RFC 27, ``inproc://zeromq.zap.01`` in the kernel's context) about
every new connection to a CURVE endpoint. The handler accepts a client whose public key is in the
authorized-keys directory and answers with the key's name as the *user id*; libzmq then stamps
that name on every message of the connection (the ``User-Id`` property), which
:class:`PeerSocket` reads. Unknown keys are refused (the client never gets a reply) and audited.
New ``.key`` files are picked up without a restart: the directory is re-read when its
modification time changes (checked once per new connection).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import zmq
from zmq.utils import z85

from protocols.transport import AsyncSocket
from microkernel.security import audit
from microkernel.security.keys import load_authorized

log = logging.getLogger("microkernel.security")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = "microkernel"
_ZAP_VERSION = b"1.0"
# A refused client reconnects on its own: one audit line per (address, key) per this many seconds.
REFUSAL_QUIET_S = 60.0
_MAX_REMEMBERED_REFUSALS = 4096


class ZapHandler:
    """Answers ZAP requests for the kernel's CURVE endpoints; must be bound before any of them."""

    def __init__(self, ctx: zmq.Context, authorized_dir: str) -> None:
        self.authorized_dir = authorized_dir
        self._refusals: dict[tuple[bytes, bytes | None], tuple[float, int]] = {}
        self._mtime = self._dir_mtime()
        self.keys = self._load()
        sock = ctx.socket(zmq.REP)
        sock.linger = 0
        sock.bind(ZAP_ENDPOINT)
        self.socket = AsyncSocket(sock, self._on_request)

    def _dir_mtime(self) -> float | None:
        try:
            return os.stat(self.authorized_dir).st_mtime
        except OSError:
            return None

    def _load(self) -> dict[bytes, str]:
        keys, problems = load_authorized(self.authorized_dir)
        for problem in problems:
            log.warning("authorized_keys: skipping %s", problem)
        log.info("CURVE: %d authorized client key(s) in %s", len(keys), self.authorized_dir)
        return keys

    def _lookup(self, public: bytes) -> str | None:
        # One stat per new connection (not per message): a key file added or removed since we last
        # looked takes effect for the next connection.
        mtime = self._dir_mtime()
        if mtime != self._mtime:
            self._mtime = mtime
            self.keys = self._load()
        return self.keys.get(public)

    def _on_request(self, frames: list[Any]) -> None:
        if len(frames) < 6:  # not a ZAP request; a REP socket must still answer something
            self.socket.send([_ZAP_VERSION, frames[1] if len(frames) > 1 else b"", b"400", b"malformed request", b"", b""])
            return
        version, request_id, domain, address, _identity, mechanism = frames[:6]
        credentials = frames[6:]
        try:
            status, text, user = self._decide(version, domain, address, mechanism, credentials)
        except Exception:  # a REP socket must answer every request, or ZAP stalls for good
            log.exception("ZAP handler failed; refusing the connection")
            status, text, user = b"500", b"internal error", b""
        self.socket.send([_ZAP_VERSION, request_id, status, text, user, b""])

    def _decide(self, version: bytes, domain: bytes, address: bytes, mechanism: bytes,
                credentials: list[bytes]) -> tuple[bytes, bytes, bytes]:
        if version != _ZAP_VERSION:
            return b"400", b"unsupported ZAP version", b""
        if domain != ZAP_DOMAIN.encode():
            # Not one of our CURVE endpoints (an ipc socket asking about a NULL connection):
            # the runtime directory's permissions guard those.
            if mechanism == b"NULL":
                return b"200", b"OK", b""
            return b"400", b"unknown domain", b""
        if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
            self._refused(address, None, f"mechanism {mechanism.decode(errors='replace')} is not CURVE")
            return b"400", b"CURVE required", b""
        public = z85.encode(credentials[0])
        name = self._lookup(public)
        if name is None:
            self._refused(address, public, "client key not in authorized_keys")
            return b"400", b"unknown client key", b""
        return b"200", b"OK", name.encode()

    def _refused(self, address: bytes, public: bytes | None, reason: str) -> None:
        now = time.monotonic()
        last, repeats = self._refusals.get((address, public), (float("-inf"), 0))
        if now - last < REFUSAL_QUIET_S:
            self._refusals[(address, public)] = (last, repeats + 1)
            return
        if len(self._refusals) >= _MAX_REMEMBERED_REFUSALS:
            self._refusals.clear()
        self._refusals[(address, public)] = (now, 0)
        audit.record(peer=f"tcp@{address.decode(errors='replace')}", role="", msg_type="connect", decision="refused",
                     reason=reason, key=None if public is None else public.decode(), repeats_since_last=repeats)

    def close(self) -> None:
        self.socket.close()


class PeerSocket(AsyncSocket):
    """An :class:`AsyncSocket` for a CURVE endpoint: ``peer`` is the key name of the message being handled.

    The control ROUTER's tcp endpoint reads each message with its frames' properties, which the
    ipc hot path does not pay for. ``peer`` is set before ``on_message`` is called and is only
    meaningful during that call.
    """

    peer: str = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.receive = self._receive_with_peer

    def _receive_with_peer(self, sock: zmq.Socket, flags: int) -> list[bytes]:
        parts = sock.recv_multipart(flags, copy=False)
        self.peer = _user_id(parts)
        return [part.bytes for part in parts]


def _user_id(parts: list[zmq.Frame]) -> str:
    # The ROUTER's own routing-id frame may not carry the connection's metadata; the frames the
    # peer sent do.
    for part in reversed(parts):
        try:
            value = part.get("User-Id")
        except zmq.ZMQError:
            continue
        if value:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return ""
