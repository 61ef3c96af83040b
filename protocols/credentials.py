"""How a service replica proves to the kernel that it is the replica it claims to be.

The kernel puts a per-replica secret in the replica's environment (``MK_CONTROL_TOKEN``); the
service SDK appends it to the ``sender`` of the header of its control requests. The kernel checks
it against the replica's control identity (``svc:<service>.<replica>.<incarnation>``) before it
accepts the messages only a replica may send (``ready_request``, ``heartbeat``,
``progress_request``) from a connection whose role would not allow them otherwise. Shared by the
daemon and the SDK, so both agree on the variable and the format.
"""

from __future__ import annotations

TOKEN_ENV = "MK_CONTROL_TOKEN"
TOKEN_SEPARATOR = "#"


def with_token(sender: str, token: str | None) -> str:
    """The control ``sender`` carrying ``token`` (unchanged without one)."""
    return f"{sender}{TOKEN_SEPARATOR}{token}" if token else sender


def split_token(sender: str) -> tuple[str, str]:
    """``(sender, token)`` from a header sender; the token is ``""`` when there is none."""
    name, _, token = sender.partition(TOKEN_SEPARATOR)
    return name, token
