"""Log lines of a service replica: ``ts level service[replica] message`` on stderr.

The kernel captures a child's stderr line by line, so every physical line carries the full
prefix — including the continuation lines of a traceback — and can be attributed on its own.
Records also get ``service`` and ``replica`` attributes so structured handlers a service adds
see them too.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

SERVICE_LOGGER_PREFIX = "microkernel.service."


class ReplicaFilter(logging.Filter):
    """Stamps ``service`` and ``replica`` on every record that does not carry them yet."""

    def __init__(self, service: str, replica: int) -> None:
        super().__init__()
        self.service = service
        self.replica = replica

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "service"):
            record.service = self.service
        if not hasattr(record, "replica"):
            record.replica = self.replica
        return True


class ReplicaFormatter(logging.Formatter):
    """``2026-01-02T03:04:05.678Z INFO echo[0] message`` (other loggers add ``name:``)."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        prefix = (
            f"{ts}.{int(record.msecs):03d}Z {record.levelname} "
            f"{getattr(record, 'service', '?')}[{getattr(record, 'replica', '?')}]"
        )
        if not record.name.startswith(SERVICE_LOGGER_PREFIX):
            prefix = f"{prefix} {record.name}:"  # library records say where they come from
        text = record.getMessage()
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text = f"{text}\n{record.exc_text}"
        if record.stack_info:
            text = f"{text}\n{self.formatStack(record.stack_info)}"
        lines = text.splitlines() or [""]
        # Continuation lines keep the prefix (so line-aware capture attributes them) plus a marker.
        return "\n".join([f"{prefix} {lines[0]}", *(f"{prefix} | {line}" for line in lines[1:])])


def parse_level(name: str) -> tuple[int, bool]:
    """A logging level from ``MK_LOG_LEVEL`` (name or number); ``(INFO, False)`` when invalid."""
    if name.strip().lstrip("-").isdigit():
        return int(name), True
    level = logging.getLevelName(name.strip().upper())
    if isinstance(level, int):
        return level, True
    return logging.INFO, False


def configure(service: str, replica: int, level_name: str, stream: TextIO | None = None) -> logging.Logger:
    """Route every log record of this process to ``stream`` (stderr) in the replica format.

    Returns the service's logger, ``microkernel.service.<service>``.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(ReplicaFormatter())
    handler.addFilter(ReplicaFilter(service, replica))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    level, valid = parse_level(level_name)
    root.setLevel(level)
    logger = logging.getLogger(SERVICE_LOGGER_PREFIX + service)
    # Also at the source, so handlers a service attaches to its own logger see the fields too.
    logger.addFilter(ReplicaFilter(service, replica))
    if not valid:
        logger.warning("MK_LOG_LEVEL=%r is not a logging level; using INFO", level_name)
    return logger
