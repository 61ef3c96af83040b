"""The closed set of error codes that travel on the wire, and the exceptions that carry them.

Inside the project errors are typed exceptions; on the wire they are an ``ErrorCode`` plus a
human reason. The conversion happens in exactly one place per socket (the kernel's control
router, a service's data-plane dispatcher, the client's reply handling).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    """Every error a peer can receive. Closed: adding one is a protocol minor-version change."""

    MALFORMED = "malformed"  # the frames or the msgpack could not be parsed
    UNKNOWN_TYPE = "unknown_type"  # msg_type is not in the registry
    VERSION_MISMATCH = "version_mismatch"  # protocol major version differs
    INVALID_FIELD = "invalid_field"  # a field is missing or has the wrong type/value
    INVALID_CONFIG = "invalid_config"  # a reloaded configuration file is invalid; the running one stays
    TOO_LARGE = "too_large"  # the message exceeds the receiver's size limit
    UNKNOWN_SERVICE = "unknown_service"  # no such service in the kernel's configuration
    UNKNOWN_METHOD = "unknown_method"  # the service has no such RPC handler
    NOT_READY = "not_ready"  # the service exists but no replica is ready
    BAD_STATE = "bad_state"  # the request does not fit the current state
    DEADLINE_EXCEEDED = "deadline_exceeded"  # the request's deadline passed before completion
    TIMEOUT = "timeout"  # the caller gave up waiting (client-side)
    OVERLOADED = "overloaded"  # back-pressure: the receiver's queue is full
    RATE_LIMITED = "rate_limited"  # the sender exceeded its request rate; details.retry_after_ms says when to retry
    FORBIDDEN = "forbidden"  # the sender is not allowed to do this
    HANDLER_ERROR = "handler_error"  # the service's handler raised
    UNAVAILABLE = "unavailable"  # the kernel or service could not be reached
    SHUTTING_DOWN = "shutting_down"  # the receiver is stopping and takes no new work
    NOT_FOUND = "not_found"  # the named object (a key, a model, a job) does not exist
    CORRUPTED = "corrupted"  # stored data failed its integrity check; nothing was returned
    INTERNAL = "internal"  # a bug on the receiving side; the reason says more


class MicrokernelError(Exception):
    """An error with a wire code. Raise it anywhere; the socket boundary turns it into a reply."""

    def __init__(self, code: ErrorCode | str, reason: str, details: dict[str, Any] | None = None) -> None:
        try:
            self.code = ErrorCode(code)
        except ValueError:
            self.code = ErrorCode.INTERNAL
        self.reason = reason
        self.details = details or {}
        super().__init__(f"{self.code.value}: {reason}")


class ProtocolError(MicrokernelError):
    """Inbound frames violated the protocol (raised by ``protocols.wire.decode``)."""


class RemoteError(MicrokernelError):
    """The peer answered with an error reply."""


class CallTimeout(MicrokernelError):
    """No reply arrived within the caller's timeout."""

    def __init__(self, reason: str) -> None:
        super().__init__(ErrorCode.TIMEOUT, reason)
