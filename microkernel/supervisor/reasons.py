"""Why a replica exited: every exit carries one reason, shown to people and sent in events."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["EXIT_KINDS", "ExitReason"]

EXIT_KINDS: Final[frozenset[str]] = frozenset(
    {"exit", "signal", "oom", "budget", "heartbeat", "start_timeout", "stopped", "spawn_failed"}
)
"""``exit``/``signal`` come from the return code alone; the others are causes the kernel knows
(it killed the replica, or the kernel OOM killer did, or the spawn itself failed)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ExitReason:
    """Why a replica is gone.

    ``kind`` is one of :data:`EXIT_KINDS`. ``code`` is the exit status and ``signal`` the
    terminating signal number, when known; both are kept even when the kernel knows a better
    ``kind`` (a heartbeat kill still ends with ``signal(9)``, which is useful when debugging).
    """

    kind: str
    code: int | None = None
    signal: int | None = None
    detail: str = ""

    def __post_init__(self) -> None:
        if self.kind not in EXIT_KINDS:
            raise ValueError(f"unknown exit reason kind {self.kind!r}; expected one of {sorted(EXIT_KINDS)}")

    @classmethod
    def from_returncode(cls, rc: int, *, requested: str | None = None, detail: str = "") -> ExitReason:
        """Build the reason from a process return code (negative = killed by signal ``-rc``).

        ``requested`` is the cause the kernel already knows because it acted on it
        (``"stopped"``, ``"heartbeat"``, ``"start_timeout"``, ``"budget"``, ``"oom"``): it wins
        as ``kind``, while ``code``/``signal`` still record how the process actually ended.
        """
        if rc < 0:
            kind, code, sig = "signal", None, -rc
        else:
            kind, code, sig = "exit", rc, None
        return cls(kind=requested or kind, code=code, signal=sig, detail=detail)

    @property
    def normal(self) -> bool:
        """True for a clean ``exit(0)`` and for a requested stop (what ``transient`` does not restart)."""
        return self.kind == "stopped" or (self.kind == "exit" and self.code == 0)

    def __str__(self) -> str:
        if self.kind == "exit":
            return f"exit({self.code})"
        if self.kind == "signal":
            return f"signal({self.signal})"
        return self.kind

    def to_wire(self) -> dict[str, Any]:
        """The msgpack-native form used in events and replies; ``text`` is :meth:`__str__`."""
        return {
            "kind": self.kind,
            "code": self.code,
            "signal": self.signal,
            "detail": self.detail,
            "text": str(self),
        }

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> ExitReason:
        """Inverse of :meth:`to_wire` (``text`` is derived, so it is ignored)."""
        return cls(
            kind=data["kind"],
            code=data.get("code"),
            signal=data.get("signal"),
            detail=data.get("detail", ""),
        )
