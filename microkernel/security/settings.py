"""The ``[security]`` table: tcp endpoints, CURVE keys and roles, validated like the rest of the config.

A tcp endpoint is refused unless CURVE is configured (the server's secret key file and a directory
of authorized client keys), and the key file must be private; the errors name the key, as for
every other setting.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from microkernel.config_reader import Table, choices, show, suggest
from microkernel.security.keys import KeyFileError, load_authorized, load_secret
from microkernel.security.roles import ROLE_NAMES, Role

SECURITY_KEYS: Final = (
    "control_tcp", "events_tcp", "server_secret_key", "authorized_keys", "ipc_role", "default_role", "roles",
    "audit_log",
)  # fmt: skip
_TCP_RE = re.compile(r"tcp://(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.*-]+):(?:\d{1,5}|\*)")


@dataclass(frozen=True, slots=True, kw_only=True)
class SecuritySettings:
    """The ``[security]`` table (paths as given; relative ones resolve from the daemon's working directory)."""

    control_tcp: str = ""
    """Also serve the control plane on this tcp endpoint (CURVE only), e.g. ``tcp://0.0.0.0:7071``."""
    events_tcp: str = ""
    """Also publish events on this tcp endpoint (CURVE only), e.g. ``tcp://0.0.0.0:7072``."""
    server_secret_key: str = ""
    """The kernel's secret key file (``mkctl keygen --name server``), mode 0600, owned by the daemon's user."""
    authorized_keys: str = ""
    """Directory of authorized client public keys (``NAME.key``); the file name is the key's name."""
    ipc_role: Role = Role.ADMIN
    """The role of every client on the ipc control socket (the runtime dir's permissions decide who that is)."""
    default_role: Role = Role.READER
    """The role of an authorized tcp key not listed in ``roles``."""
    roles: dict[str, Role] = field(default_factory=dict)
    """Role per client key name, e.g. ``{ alice = "operator", ci = "reader" }``."""
    audit_log: str = ""
    """Also append the audit lines to this file (they always go to the daemon's log)."""

    @property
    def curve(self) -> bool:
        """Whether CURVE is configured (both key settings present)."""
        return bool(self.server_secret_key and self.authorized_keys)

    @property
    def tcp(self) -> bool:
        """Whether the kernel listens on tcp at all."""
        return bool(self.control_tcp or self.events_tcp)

    def role_of(self, key_name: str) -> Role:
        """The role of the authorized key called ``key_name``."""
        return self.roles.get(key_name, self.default_role)


def parse_security(table: Table | None) -> SecuritySettings:
    """Validate the ``[security]`` table (None: defaults, ipc only)."""
    if table is None:
        return SecuritySettings()
    table.check_keys(SECURITY_KEYS)
    endpoints = {key: _endpoint(table, key) for key in ("control_tcp", "events_tcp")}
    secret = table.string("server_secret_key", "")
    authorized = table.string("authorized_keys", "")
    for key, value in endpoints.items():
        if value and not (secret and authorized):
            absent = "security.server_secret_key" if not secret else "security.authorized_keys"
            raise table.error(key, f"tcp endpoints are refused unless CURVE is configured: {absent} is not set "
                                   "(create the server's key pair with `mkctl keygen --name server`)")
    if secret:
        try:
            load_secret(secret)
        except KeyFileError as exc:
            raise table.error("server_secret_key", exc.reason) from None
    if authorized:
        if not Path(authorized).is_dir():
            raise table.error("authorized_keys", f"{authorized} is not a directory (it holds the clients' NAME.key files)")
        _, problems = load_authorized(authorized)
        if problems:
            raise table.error("authorized_keys", problems[0])
    return SecuritySettings(
        control_tcp=endpoints["control_tcp"],
        events_tcp=endpoints["events_tcp"],
        server_secret_key=secret,
        authorized_keys=authorized,
        ipc_role=_role(table, "ipc_role", Role.ADMIN),
        default_role=_role(table, "default_role", Role.READER),
        roles=_roles(table),
        audit_log=_audit_log(table),
    )


def _audit_log(table: Table) -> str:
    value = table.string("audit_log", "")
    if value and not Path(value).parent.is_dir():
        raise table.error("audit_log", f"the directory of {value} does not exist")
    return value


def _endpoint(table: Table, key: str) -> str:
    value = table.string(key, "")
    if value and not _TCP_RE.fullmatch(value):
        raise table.error(key, f"expected a tcp endpoint such as 'tcp://0.0.0.0:7071', got {show(value)}")
    return value


def _role(table: Table, key: str, default: Role) -> Role:
    value = table.data.get(key, default.value)
    if not isinstance(value, str) or value not in ROLE_NAMES:
        raise table.error(key, f"expected one of {choices(ROLE_NAMES)}, got {show(value)}{suggest(value, ROLE_NAMES)}")
    return Role(value)


def _roles(table: Table) -> dict[str, Role]:
    roles = table.table("roles")
    if roles is None:
        return {}
    return {name: _role(roles, name, Role.READER) for name in roles.data}
