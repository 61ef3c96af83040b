"""The ``[logs]`` and ``[metrics]`` tables: where replica output goes, and the Prometheus endpoint.

.. code-block:: toml

    [logs]
    dir = "/var/log/microkernel"   # default: <runtime_dir>/logs
    max_bytes = "10MiB"            # rotate a service's file when it would grow past this
    backups = 5                    # keep <service>.log.1 ... <service>.log.5

    [metrics]
    enabled = true                 # default false: nothing listens
    address = "127.0.0.1"          # a non-loopback address is allowed, with a warning in the log
    port = 9464
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from microkernel.config_reader import Table, show

__all__ = ["LOGS_KEYS", "METRICS_KEYS", "LogSettings", "MetricsSettings", "parse_logs", "parse_metrics"]

LOGS_KEYS: Final = ("dir", "max_bytes", "backups")
METRICS_KEYS: Final = ("enabled", "address", "port")

LOGS_SUBDIR: Final = "logs"
MIN_LOG_BYTES: Final = 4096
"""Below this a rotation would happen every few lines."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LogSettings:
    """The ``[logs]`` table: per-service stdout/stderr files and their rotation."""

    dir: str = ""
    """Directory of the ``<service>.log`` files; empty means ``<runtime_dir>/logs``."""
    max_bytes: int = 10 * 1024 * 1024
    """A service's file is rotated before it would grow past this many bytes."""
    backups: int = 5
    """Rotated files kept (``<service>.log.1`` is the newest); 0 keeps none."""

    def directory(self, runtime_dir: str | Path) -> Path:
        """Where the files live for a kernel whose runtime directory is ``runtime_dir``."""
        return Path(self.dir) if self.dir else Path(runtime_dir) / LOGS_SUBDIR


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsSettings:
    """The ``[metrics]`` table: the Prometheus text endpoint (off unless ``enabled``)."""

    enabled: bool = False
    address: str = "127.0.0.1"
    port: int = 9464

    @property
    def loopback(self) -> bool:
        """True when only this host can reach the endpoint."""
        if self.address == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.address).is_loopback
        except ValueError:
            return False

    @property
    def url(self) -> str:
        """The scrape URL."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}/metrics"


def parse_logs(table: Table | None) -> LogSettings:
    """Validate ``[logs]``; an absent table gives the defaults."""
    defaults = LogSettings()
    if table is None:
        return defaults
    table.check_keys(LOGS_KEYS)
    directory = table.string("dir", defaults.dir)
    if "\0" in directory:
        raise table.error("dir", "a path must not contain a NUL character")
    if directory and not Path(directory).is_absolute():
        raise table.error("dir", f"expected an absolute path (the daemon may run anywhere), got {show(directory)}")
    return LogSettings(
        dir=directory,
        max_bytes=table.size("max_bytes", defaults.max_bytes, minimum=MIN_LOG_BYTES),
        backups=table.integer("backups", defaults.backups, minimum=0),
    )


def parse_metrics(table: Table | None) -> MetricsSettings:
    """Validate ``[metrics]``; an absent table gives the defaults (disabled)."""
    defaults = MetricsSettings()
    if table is None:
        return defaults
    table.check_keys(METRICS_KEYS)
    address = table.string("address", defaults.address, nonempty=True)
    if address != "localhost":
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise table.error("address", f"expected an IP address such as '127.0.0.1' or '::1', got {show(address)}") from None
    port = table.integer("port", defaults.port, minimum=1)
    if port > 65535:
        raise table.error("port", f"expected a TCP port (1..65535), got {port}")
    return MetricsSettings(enabled=table.boolean("enabled", defaults.enabled), address=address, port=port)
