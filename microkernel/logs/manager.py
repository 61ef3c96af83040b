"""The kernel's service logs: one file per service, the captures feeding them, the followers waiting.

:class:`ServiceLogs` is created with the kernel (it makes the logs directory, mode 0700) and used
from the loop only. The supervisor asks it for an :class:`~microkernel.logs.capture.OutputCapture`
before each spawn, hands the capture to it by pid once the child runs (:meth:`adopt`), points a
taken warm standby at its service (:meth:`assign`), and releases the capture when the replica's
tree is dead (:meth:`release`). The ``logs_request`` handler reads the files in the thread pool
(:mod:`microkernel.logs.tail`) and long-polls with :meth:`wait_written`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from microkernel.config_observability import LogSettings
from microkernel.logs.capture import OutputCapture
from microkernel.logs.files import LogFile
from microkernel.rundir import RuntimeDirError

__all__ = ["ServiceLogs"]

log = logging.getLogger("microkernel.logs")

DIR_MODE = 0o700


class ServiceLogs:
    """Per-service log files under ``settings.directory(runtime_dir)``.

    Raises :class:`~microkernel.rundir.RuntimeDirError` (the daemon exits with a clear message)
    when the directory cannot be created or made private.
    """

    def __init__(self, settings: LogSettings, *, runtime_dir: str | Path) -> None:
        self.settings = settings
        self.directory = settings.directory(runtime_dir)
        try:
            self.directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            # mkdir's mode is masked by the umask, and an existing directory keeps its own: make sure.
            os.chmod(self.directory, DIR_MODE)
        except OSError as exc:
            raise RuntimeDirError(f"cannot use the service logs directory {self.directory} (logs.dir): "
                                  f"{exc.strerror or exc}") from exc
        self.files: dict[str, LogFile] = {}
        self._captures: dict[int, OutputCapture] = {}
        self._dirty: set[LogFile] = set()
        self._flush_scheduled = False

    def path_of(self, service: str) -> Path:
        """``<dir>/<service>.log`` (service names are validated: no ``/``, no ``..``)."""
        return self.directory / f"{service}.log"

    def file(self, service: str) -> LogFile:
        """The (lazily created) log file of ``service``."""
        file = self.files.get(service)
        if file is None:
            file = self.files[service] = LogFile(self.path_of(service), max_bytes=self.settings.max_bytes,
                                                 backups=self.settings.backups)
        return file

    def open(self, service: str | None = None, replica: int | None = None) -> OutputCapture:
        """Pipes for a child about to be spawned; unassigned when ``service`` is None (a standby)."""
        capture = OutputCapture(asyncio.get_running_loop(), self._written)
        if service is not None and replica is not None:
            capture.assign(self.file(service), replica)
        return capture

    def adopt(self, pid: int, capture: OutputCapture) -> OutputCapture:
        """The child ``pid`` was spawned with ``capture``'s pipes: start reading them."""
        capture.started()
        self._captures[pid] = capture
        return capture

    def assign(self, pid: int, service: str, replica: int) -> OutputCapture | None:
        """The process ``pid`` (a warm standby just taken) is now ``service``'s replica ``replica``."""
        capture = self._captures.get(pid)
        if capture is not None:
            capture.assign(self.file(service), replica)
        return capture

    def release(self, pid: int, capture: OutputCapture | None = None) -> None:
        """The process ``pid`` and its tree are gone: drain and close its pipes.

        Pass the ``capture`` the caller got from :meth:`adopt` / :meth:`assign` when it has it: a
        new process that reused the pid in the meantime then keeps its own.
        """
        current = self._captures.get(pid)
        capture = current if capture is None else capture
        if current is capture:
            self._captures.pop(pid, None)
        if capture is None or capture.closed:
            return
        for record in capture.close():
            log.info("output of unassigned standby %d: %s", pid, record)
        self._flush()

    def forget(self, service: str) -> None:
        """``service`` was removed: close its file. The records stay on disk, and a service of
        that name added later appends to them."""
        file = self.files.pop(service, None)
        if file is not None:
            self._dirty.discard(file)
            file.close()

    def _written(self, file: LogFile) -> None:
        self._dirty.add(file)
        if not self._flush_scheduled:
            # One flush per loop iteration, after every reader that is ready has run.
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, set()
        for file in dirty:
            file.flush()

    async def wait_written(self, service: str, timeout: float) -> bool:
        """Wait (at most ``timeout`` s) until new records of ``service`` are in its file."""
        return await self.file(service).wait_written(timeout)

    def close(self) -> None:
        """Close every capture and file (at kernel exit)."""
        for pid in list(self._captures):
            self.release(pid)
        for file in self.files.values():
            file.close()
