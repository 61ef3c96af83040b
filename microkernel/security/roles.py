"""Roles and the one table of which role each control request needs.

Three roles, each including the rights of the one before: ``reader`` looks, ``operator`` also
starts, stops, scales and reloads, ``admin`` also shuts the kernel down and may make it run a
command line of its choosing. A fourth kind of right, ``service``, belongs to no client: it covers
what only a supervised replica sends (readiness, heartbeats, start progress).

Every control request type the kernel handles must be in :data:`REQUIREMENTS` (a unit test
checks it); a type missing here is treated as needing ``admin``, so a forgotten entry fails
closed.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final


class Role(StrEnum):
    """A client's role, weakest first."""

    READER = "reader"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANKS[self]

    def allows(self, needed: Role) -> bool:
        """Whether this role has the rights of ``needed``."""
        return _RANKS[self] >= _RANKS[needed]


_RANKS: Final = {Role.READER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}
ROLE_NAMES: Final[tuple[str, ...]] = tuple(role.value for role in Role)

SERVICE: Final = "service"
"""The requirement of messages only the kernel's own replicas send."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Requirement:
    """What a request type needs (a :class:`Role`, or :data:`SERVICE`) and what it does, for messages."""

    needs: Role | str
    action: str
    replica_may: bool = False
    """A supervised replica may send it whatever the role of its connection (leases, look-ups)."""


def _r(needs: Role | str, action: str, *, replica_may: bool = False) -> Requirement:
    return Requirement(needs=needs, action=action, replica_may=replica_may)


REQUIREMENTS: Final[dict[str, Requirement]] = {
    # reader: look at the kernel
    "ping_request": _r(Role.READER, "ping the kernel", replica_may=True),
    "status_request": _r(Role.READER, "read the status", replica_may=True),
    "list_request": _r(Role.READER, "list services", replica_may=True),
    "lookup_request": _r(Role.READER, "look up services", replica_may=True),
    "events_request": _r(Role.READER, "read events", replica_may=True),
    "leases_request": _r(Role.READER, "list leases", replica_may=True),
    "logs_request": _r(Role.READER, "read service logs", replica_may=True),
    # operator: change what runs, within the configured services
    "start_request": _r(Role.OPERATOR, "start services"),
    "stop_request": _r(Role.OPERATOR, "stop services"),
    "restart_request": _r(Role.OPERATOR, "restart services"),
    "scale_request": _r(Role.OPERATOR, "scale services"),
    "reload_request": _r(Role.OPERATOR, "reload the configuration"),
    "lease_acquire_request": _r(Role.OPERATOR, "acquire GPU leases", replica_may=True),
    "lease_release_request": _r(Role.OPERATOR, "release GPU leases", replica_may=True),
    "add_service_request": _r(Role.OPERATOR, "add services"),  # admin with a command: see entries.py
    "remove_service_request": _r(Role.OPERATOR, "remove services"),
    # admin: the kernel itself
    "shutdown_request": _r(Role.ADMIN, "shut the kernel down"),
    # service: only the kernel's own replicas
    "ready_request": _r(SERVICE, "announce a replica ready"),
    "heartbeat": _r(SERVICE, "send replica heartbeats"),
    "progress_request": _r(SERVICE, "report replica start progress"),
}

UNLISTED: Final = Requirement(needs=Role.ADMIN, action="send this request")


def requirement(msg_type: str) -> Requirement:
    """The requirement of ``msg_type``; unlisted types need ``admin`` (fail closed)."""
    return REQUIREMENTS.get(msg_type, UNLISTED)


def parse_role(value: str) -> Role | None:
    """The role named ``value``, or None when there is no such role."""
    try:
        return Role(value)
    except ValueError:
        return None
