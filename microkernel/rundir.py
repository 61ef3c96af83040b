"""The runtime directory: private sockets, the single-instance lock and the pid file."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

from protocols.endpoints import CONTROL_SOCKET, EVENTS_IN_SOCKET, EVENTS_OUT_SOCKET, SERVICES_SUBDIR

LOCK_FILE = "kernel.lock"
PID_FILE = "kernel.pid"
# Unix socket paths are limited to 108 bytes including the terminator; leave room for
# service endpoint names under svc/.
MAX_RUNTIME_DIR_LEN = 60


class RuntimeDirError(Exception):
    """The runtime directory cannot be used (permissions, another kernel holds it, too long)."""


class RuntimeDir:
    """Creates the directory with mode 0700 and holds its lock for the kernel's lifetime."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).absolute()
        self._lock_fd: int | None = None

    def acquire(self) -> None:
        """Create/secure the directory, take the lock, write the pid file, clear stale sockets."""
        if len(str(self.path)) > MAX_RUNTIME_DIR_LEN:
            raise RuntimeDirError(
                f"runtime_dir {str(self.path)!r} is too long for ipc sockets (max {MAX_RUNTIME_DIR_LEN} characters)"
            )
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise RuntimeDirError(f"cannot create runtime_dir {self.path}: {exc.strerror}") from exc
        st = self.path.stat()
        if st.st_uid != os.getuid():
            raise RuntimeDirError(f"runtime_dir {self.path} belongs to uid {st.st_uid}, not to us ({os.getuid()})")
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.chmod(self.path, 0o700)  # sockets in it must not be reachable by other users
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                holder = self.read_pid()
                who = f" (pid {holder})" if holder else ""
                raise RuntimeDirError(f"another microkerneld{who} is running with runtime_dir {self.path}") from None
            raise
        self._lock_fd = fd
        (self.path / PID_FILE).write_text(f"{os.getpid()}\n")
        svc = self.path / SERVICES_SUBDIR
        svc.mkdir(mode=0o700, exist_ok=True)
        for name in (CONTROL_SOCKET, EVENTS_IN_SOCKET, EVENTS_OUT_SOCKET):
            self._unlink(self.path / name)
        for stale in svc.glob("*.sock"):
            self._unlink(stale)

    def read_pid(self) -> int | None:
        try:
            return int((self.path / PID_FILE).read_text().strip())
        except (OSError, ValueError):
            return None

    @staticmethod
    def _unlink(path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass

    def release(self) -> None:
        """Remove sockets and the pid file, then drop the lock."""
        for name in (CONTROL_SOCKET, EVENTS_IN_SOCKET, EVENTS_OUT_SOCKET, PID_FILE):
            self._unlink(self.path / name)
        for stale in (self.path / SERVICES_SUBDIR).glob("*.sock"):
            self._unlink(stale)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
