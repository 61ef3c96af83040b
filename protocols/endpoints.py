"""Where the kernel's sockets live.

Shared by the daemon, the client and the service SDK so that all three agree on the
default runtime directory and on the endpoint names inside it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

RUNTIME_DIR_ENV = "MICROKERNEL_RUNTIME_DIR"
ENDPOINT_ENV = "MICROKERNEL_ENDPOINT"

CONTROL_SOCKET = "control.sock"
EVENTS_IN_SOCKET = "events-in.sock"
EVENTS_OUT_SOCKET = "events.sock"
SERVICES_SUBDIR = "svc"


def default_runtime_dir() -> Path:
    """The runtime directory used when none is configured.

    ``$MICROKERNEL_RUNTIME_DIR`` wins, then ``$XDG_RUNTIME_DIR/microkernel``, then
    ``/tmp/microkernel-<uid>``.
    """
    explicit = os.environ.get(RUNTIME_DIR_ENV)
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "microkernel"
    return Path(f"/tmp/microkernel-{os.getuid()}")


@dataclass(frozen=True, slots=True)
class KernelEndpoints:
    """The three kernel endpoints: control ROUTER, event XSUB (publish in), event XPUB (subscribe)."""

    control: str
    events_in: str
    events_out: str

    @classmethod
    def in_runtime_dir(cls, runtime_dir: str | os.PathLike[str]) -> "KernelEndpoints":
        base = Path(runtime_dir)
        return cls(
            control=f"ipc://{base / CONTROL_SOCKET}",
            events_in=f"ipc://{base / EVENTS_IN_SOCKET}",
            events_out=f"ipc://{base / EVENTS_OUT_SOCKET}",
        )


def service_endpoint(runtime_dir: str | os.PathLike[str], service: str, replica: int, incarnation: int) -> str:
    """The data-plane endpoint a service replica binds by default."""
    return f"ipc://{Path(runtime_dir) / SERVICES_SUBDIR / f'{service}.{replica}.{incarnation}.sock'}"


def ipc_path(endpoint: str) -> Path | None:
    """The filesystem path behind an ``ipc://`` endpoint, or None for other transports."""
    if endpoint.startswith("ipc://"):
        return Path(endpoint[len("ipc://"):])
    return None
