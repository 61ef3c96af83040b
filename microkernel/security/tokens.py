"""Per-replica control tokens: an HMAC of the replica's control identity under a per-daemon secret.

Nothing is stored per replica: the kernel derives the token when it starts a replica (it goes into
the child's environment, see ``supervisor/launch.py``) and derives it again to check a message.
The secret lives only in the daemon's memory and changes with every daemon start.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from protocols.credentials import split_token

_SECRET = secrets.token_bytes(32)
SERVICE_IDENTITY_PREFIX = b"svc:"


def replica_token(service: str, replica: int, incarnation: int) -> str:
    """The token of replica ``<service>.<replica>.<incarnation>`` (hex, 128 bits)."""
    identity = f"svc:{service}.{replica}.{incarnation}".encode()
    return _digest(identity)


def _digest(identity: bytes) -> str:
    return hmac.new(_SECRET, identity, hashlib.sha256).hexdigest()[:32]


def is_replica(identity: bytes, sender: str) -> bool:
    """Whether a message from routing id ``identity`` with header ``sender`` comes from our replica."""
    if not identity.startswith(SERVICE_IDENTITY_PREFIX):
        return False
    _, token = split_token(sender)
    return bool(token) and hmac.compare_digest(token, _digest(identity))
