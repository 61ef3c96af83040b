"""The daemon's own logs: text or JSON lines, on stderr or in a file that SIGUSR1 reopens.

Under systemd the default (stderr) ends up in the journal, which timestamps and rotates by
itself. With ``[kernel] log_file`` the daemon writes there instead; logrotate's usual
move-then-signal works: after the file was renamed, ``kill -USR1`` makes the daemon open a new
file at the configured path, and the next lines go to it.

The service replicas' own stdout/stderr are a separate matter (per-service files).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Final, TextIO

TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"

log = logging.getLogger("microkernel.logs")


@dataclass(frozen=True, slots=True, kw_only=True)
class LogSettings:
    """Where and how the daemon logs: ``level`` (debug…error), ``format`` (text|json), ``file`` ("" = stderr)."""

    level: str = "info"
    format: str = "text"
    file: str = ""


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (ISO 8601, UTC), ``level``, ``logger``, ``msg``, and ``exc`` if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class ReopenableFileHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Appends to a file; :meth:`reopen` closes it and opens the path again (after a rotation)."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        super().__init__(self._open())

    def _open(self) -> TextIO:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        return os.fdopen(fd, "a", encoding="utf-8", buffering=1)

    def reopen(self) -> None:
        """Open the path again; on failure keep writing to the old file (and say so there)."""
        try:
            stream = self._open()
        except OSError as exc:
            log.error("cannot reopen the log file %s: %s; still writing to the previous one", self.path, exc)
            return
        self.acquire()
        try:
            old, self.stream = self.stream, stream
        finally:
            self.release()
        old.close()

    def close(self) -> None:
        self.acquire()
        try:
            if self.stream and not self.stream.closed:
                self.stream.close()
        finally:
            self.release()
        super().close()


class DaemonLogging:
    """Installs and re-installs the root handler of the daemon's logs."""

    def __init__(self) -> None:
        self.handler: logging.Handler | None = None
        self.settings: LogSettings | None = None

    def apply(self, settings: LogSettings) -> None:
        """(Re)configure the root logger; a new file or format replaces the handler."""
        root = logging.getLogger()
        root.setLevel(settings.level.upper())
        current = self.settings
        if self.handler is not None and current is not None and (current.file, current.format) == (settings.file, settings.format):
            self.settings = settings
            return
        handler: logging.Handler = ReopenableFileHandler(settings.file) if settings.file else logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter() if settings.format == "json" else logging.Formatter(TEXT_FORMAT))
        root.addHandler(handler)
        if self.handler is not None:
            root.removeHandler(self.handler)
            self.handler.close()
        self.handler = handler
        self.settings = settings

    def reopen(self) -> bool:
        """Reopen the log file (SIGUSR1); False when logging to stderr (nothing to reopen)."""
        if isinstance(self.handler, ReopenableFileHandler):
            self.handler.reopen()
            log.info("reopened the log file %s", self.handler.path)
            return True
        log.info("SIGUSR1: logging to stderr, no log file to reopen")
        return False

    def close(self) -> None:
        if self.handler is not None:
            logging.getLogger().removeHandler(self.handler)
            self.handler.close()
            self.handler = None


daemon_logging = DaemonLogging()
"""The daemon process's one logging set-up (``microkerneld`` applies it; the kernel reopens/reapplies it)."""
