"""Authorization of control requests: who is asking, which role they have, and what the request needs.

One :class:`Guard` per control endpoint. The control router calls :meth:`Guard.check` once per
decoded request, before its handler runs; a denial becomes a ``forbidden`` error reply. Peers:

* ipc clients have ``security.ipc_role`` (``admin`` unless configured otherwise): whoever can
  open the socket in the 0700 runtime directory;
* tcp clients have the role of their CURVE key's name (``security.roles``, else
  ``security.default_role``); the name comes from the ZAP handler, never from the message;
* the kernel's own replicas are recognised on ipc by the token the kernel gave them
  (:mod:`microkernel.security.tokens`); a tcp client can never be one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from protocols.credentials import split_token
from protocols.transport import AsyncSocket
from protocols.wire import Envelope
from microkernel.security import audit
from microkernel.security.authenticator import PeerSocket
from microkernel.security.entries import EntryCatalog
from microkernel.security.roles import REQUIREMENTS, SERVICE, Role, requirement
from microkernel.security.settings import SecuritySettings
from microkernel.security.tokens import is_replica


class Guard:
    """Decides, per request on one endpoint (``remote``: the tcp one), whether its sender may send it."""

    def __init__(
        self,
        settings: SecuritySettings,
        *,
        remote: bool,
        catalog: EntryCatalog,
        configured_entries: Callable[[], Iterable[str | None]],
        prepare: Callable[[Any], None] | None = None,
    ) -> None:
        self.settings = settings
        self.remote = remote
        self.catalog = catalog
        self.configured_entries = configured_entries
        self._prepare = prepare
        # On ipc everyone has the same role: the request types it may send without an audit line
        # (reads; the service messages for an admin) are answered by one set lookup (the control
        # router makes it before calling ``check``).
        self.free: frozenset[str] = frozenset() if remote else frozenset(
            msg_type for msg_type, req in REQUIREMENTS.items()
            if req.needs is Role.READER or (req.needs == SERVICE and settings.ipc_role is Role.ADMIN)
        )

    @property
    def socket_class(self) -> type[AsyncSocket]:
        """The socket wrapper the endpoint needs: tcp messages are read with their sender's key name."""
        return PeerSocket if self.remote else AsyncSocket

    def prepare(self, sock: Any) -> None:
        """Socket options before the bind (CURVE server on the tcp endpoint)."""
        if self._prepare is not None:
            self._prepare(sock)

    def check(self, env: Envelope, socket: Any) -> str | None:
        """None when the request may proceed, else the reason of the ``forbidden`` reply (audited)."""
        if env.header.msg_type in self.free:
            return None
        req = requirement(env.msg_type)
        needs, action = req.needs, req.action
        if env.msg_type == "add_service_request":
            msg = env.message
            needs, action = self.catalog.needs(msg.entry, msg.command, msg.options, self.configured_entries())
        if self.remote:
            key = getattr(socket, "peer", "")
            role = self.settings.role_of(key) if key else Role.READER
            peer = f"tcp:{key or '?'}"
        else:
            role = self.settings.ipc_role
            peer = f"ipc:{split_token(env.header.sender)[0] or '?'}"
        role_name = role.value
        if needs == SERVICE:
            allowed = not self.remote and (role is Role.ADMIN or self._replica(env))
        else:
            assert isinstance(needs, Role)
            allowed = role.allows(needs)
            if not allowed and req.replica_may and not self.remote and self._replica(env):
                allowed, role_name = True, SERVICE  # a replica's own lease requests
        if allowed:
            if needs in (Role.OPERATOR, Role.ADMIN):
                audit.record(peer=peer, role=role_name, msg_type=env.msg_type, service=_target(env.message),
                             decision="allowed")
            return None
        if needs == SERVICE:
            reason = f"only the kernel's own service replicas may {action}"
        else:
            reason = f"role {role.value} may not {action}; needs {needs}"
        audit.record(peer=peer, role=role.value, msg_type=env.msg_type, service=_target(env.message), decision="denied",
                     reason=reason)
        return reason

    def _replica(self, env: Envelope) -> bool:
        identity = env.routing[0] if env.routing else b""
        return is_replica(identity, env.header.sender)


def _target(message: Any) -> str | None:
    """The service a request is about, if any (``service`` or, for add/remove, ``name``)."""
    for attr in ("service", "name"):
        value = getattr(message, attr, None)
        if isinstance(value, str):
            return value
    return None
