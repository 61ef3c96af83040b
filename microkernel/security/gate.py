"""The kernel's security wiring: the ZAP handler, the guards of the control endpoints, the tcp binds.

``runtime.Kernel`` creates one :class:`Gate` right after its ZeroMQ context, before any socket:
the ZAP handler must exist before a CURVE endpoint is bound (without one, libzmq would let every
CURVE client in).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import zmq

from protocols import messages as m
from protocols.errors import ErrorCode, MicrokernelError
from protocols.wire import Envelope
from microkernel.bus.control import ControlRouter
from microkernel.handlers import all_handlers
from microkernel.security import audit
from microkernel.security.authenticator import ZAP_DOMAIN, ZapHandler
from microkernel.security.entries import EntryCatalog
from microkernel.security.guard import Guard
from microkernel.security.keys import load_secret
from microkernel.security.settings import SecuritySettings

log = logging.getLogger("microkernel.security")

Handler = Callable[[Any, Envelope], Any]


class Gate:
    """Everything security the kernel owns for its lifetime; :meth:`close` it before the context."""

    def __init__(self, settings: SecuritySettings, ctx: zmq.Context) -> None:
        self.settings = settings
        self.catalog = EntryCatalog()
        self.events_tcp = ""  # the bound tcp events endpoint (the actual port when configured as '*')
        audit.enable()
        self._audit_file = audit.open_file(settings.audit_log) if settings.audit_log else None
        self.zap: ZapHandler | None = None
        self._keys: tuple[bytes, bytes] | None = None
        if settings.tcp:
            self._keys = load_secret(settings.server_secret_key)
            self.zap = ZapHandler(ctx, settings.authorized_keys)

    def guard(self, configured_entries: Callable[[], Iterable[str | None]], *, remote: bool = False) -> Guard:
        """The guard of the ipc control endpoint, or (``remote``) of the tcp one."""
        return Guard(self.settings, remote=remote, catalog=self.catalog, configured_entries=configured_entries,
                     prepare=self.make_curve_server if remote else None)

    def tcp_router(self, ctx: zmq.Context, kernel: Any, *, max_size: int, limits: Any,
                   entries: Callable[[], Iterable[str | None]]) -> ControlRouter | None:
        """The control router of ``security.control_tcp`` (CURVE, roles per key), or None without one."""
        if not self.settings.control_tcp:
            return None
        router = ControlRouter(ctx, self.settings.control_tcp, handlers=self.tcp_handlers(all_handlers()),
                               kernel=kernel, max_size=max_size, limits=limits,
                               guard=self.guard(entries, remote=True))
        log.info("control also served on %s (CURVE)", router.socket.sock.getsockopt_string(zmq.LAST_ENDPOINT))
        return router

    def make_curve_server(self, sock: zmq.Socket) -> None:
        """Make the next bind of ``sock`` a CURVE server endpoint checked by our ZAP handler."""
        if self._keys is None or self.zap is None:
            raise RuntimeError("a tcp endpoint without CURVE keys")  # config validation prevents this
        public, secret = self._keys
        sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
        try:  # refuse connections outright should the ZAP handler ever be missing (draft option)
            sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        except (zmq.ZMQError, AttributeError):
            pass

    def bind_events(self, xpub: zmq.Socket) -> None:
        """Also publish events on ``security.events_tcp`` (after the ipc bind: options apply per bind)."""
        if not self.settings.events_tcp:
            return
        self.make_curve_server(xpub)
        xpub.bind(self.settings.events_tcp)
        self.events_tcp = xpub.getsockopt_string(zmq.LAST_ENDPOINT)
        log.info("events also published on %s (CURVE)", self.events_tcp)

    def tcp_handlers(self, handlers: Mapping[type, Handler]) -> dict[type, Handler]:
        """The handlers of the tcp endpoint: the same, but ``events_request`` names the tcp event endpoint."""
        routed = dict(handlers)
        inner = routed.get(m.EventsRequest)
        if inner is not None:
            def events(kernel: Any, env: Envelope) -> Any:
                if not self.events_tcp:
                    raise MicrokernelError(ErrorCode.UNAVAILABLE,
                                           "this kernel publishes no events over tcp (set security.events_tcp)")
                reply = inner(kernel, env)
                return dataclasses.replace(reply, endpoint=self.events_tcp)

            routed[m.EventsRequest] = events
        return routed

    def close(self) -> None:
        if self.zap is not None:
            self.zap.close()
        if self._audit_file is not None:
            audit.close_file(self._audit_file)
