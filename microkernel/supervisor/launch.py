"""How a replica is started: its argv and its complete environment.

The kernel makes a service's place in the system real through the child's environment (names,
endpoints, heartbeat interval, configuration); the service SDK reads it back in
``services.runner``. Nothing else is shared between the daemon and its children.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from protocols.credentials import TOKEN_ENV
from protocols.endpoints import KernelEndpoints, service_endpoint
from microkernel.security.tokens import replica_token
from microkernel.supervisor.spec import ServiceSpec


def argv_for(spec: ServiceSpec) -> list[str]:
    """An entry runs under the service runner; a command runs as given."""
    if spec.entry is not None:
        return [spec.python or sys.executable, "-m", "services.runner", spec.entry]
    assert spec.command is not None
    return list(spec.command)


def environment_for(
    spec: ServiceSpec,
    *,
    replica: int,
    incarnation: int,
    runtime_dir: Path,
    endpoints: KernelEndpoints,
    heartbeat_interval: float,
    max_message_size: int,
    log_level: str,
    extra: Mapping[str, str] = (),  # type: ignore[assignment]
    defaults: Mapping[str, str] = (),  # type: ignore[assignment]
) -> tuple[dict[str, str], str]:
    """The child's environment and the data-plane endpoint it must bind.

    Precedence, lowest first: the daemon's environment, ``defaults`` (derived settings a service
    may override, such as thread counts), the service's ``env``, the ``MK_*`` variables, ``extra``
    (what the kernel decides, such as the GPU lease).
    """
    env = dict(os.environ)
    _output_unbuffered(env)
    env.update(defaults)
    env.update(spec.env)
    endpoint = service_endpoint(runtime_dir, spec.name, replica, incarnation)
    env.update(
        {
            "MK_SERVICE": spec.name,
            "MK_REPLICA": str(replica),
            "MK_INCARNATION": str(incarnation),
            "MK_RUNTIME_DIR": str(runtime_dir),
            "MK_CONTROL_ENDPOINT": endpoints.control,
            "MK_EVENTS_IN_ENDPOINT": endpoints.events_in,
            "MK_EVENTS_OUT_ENDPOINT": endpoints.events_out,
            "MK_ENDPOINT": endpoint,
            "MK_HEARTBEAT_INTERVAL": repr(heartbeat_interval),
            "MK_CONFIG": json.dumps(spec.config),
            "MK_MAX_MESSAGE_SIZE": str(max_message_size),
            "MK_KERNEL_PID": str(os.getpid()),
            "MK_LOG_LEVEL": log_level,
            # Lets the kernel tell this replica's control messages from forged ones (security/tokens.py).
            TOKEN_ENV: replica_token(spec.name, replica, incarnation),
        }
    )
    if spec.entry is not None:
        env["MK_ENTRY"] = spec.entry
        _entries_resolve_from_cwd(env)
    env.update(extra)
    return env, endpoint


def standby_environment(extra: Mapping[str, str] = ()) -> dict[str, str]:  # type: ignore[assignment]
    """The environment a warm standby starts with: what every entry replica gets at exec time."""
    env = dict(os.environ)
    _output_unbuffered(env)
    _entries_resolve_from_cwd(env)
    env.update(extra)
    return env


def _output_unbuffered(env: dict[str, str]) -> None:
    # A replica's stdout is a pipe to the kernel's log capture: block-buffered by default, so a
    # print() would show up in `mkctl logs` only kilobytes later (or be lost with a kill -9).
    # A service's own `env` may still set it; the warm standby starts with the same value.
    env.setdefault("PYTHONUNBUFFERED", "1")


def _entries_resolve_from_cwd(env: dict[str, str]) -> None:
    # Entries resolve like `python -m`: relative to where the daemon was started.
    path = env.get("PYTHONPATH", "")
    cwd = os.getcwd()
    if cwd not in path.split(os.pathsep):
        env["PYTHONPATH"] = cwd + (os.pathsep + path if path else "")
