"""Same-host shared memory: POSIX segments (files under /dev/shm), their names and their cleanup.

A segment is named ``mk.<kernel_pid>.<owner_pid>.<tag><random>``: ``kernel_pid`` comes from
``MK_KERNEL_PID`` (0 outside a kernel), ``owner_pid`` is the creating process, so the kernel can
unlink every name a dead replica left behind (``sweep``). Passing segments to peers is
``protocols.handover``'s job; ``empty`` makes arrays it hands over without a copy.

Linux only (``available()`` is False elsewhere; callers fall back to frames). numpy is imported
lazily (``empty`` and the array helpers need it); this module imports nothing of the project.
"""

from __future__ import annotations

import mmap
import os
import re
import secrets
import stat
import weakref
from typing import Any

SHM_DIR = "/dev/shm"
PREFIX = "mk"
DEFAULT_POOL_BYTES = 1 << 30
DEFAULT_THRESHOLD = 16 << 20
PAGE = mmap.PAGESIZE
_NAME = re.compile(r"mk\.[0-9]{1,10}\.[0-9]{1,10}\.[A-Za-z0-9_-]{1,80}")
_TAG = re.compile(r"[A-Za-z0-9_-]{0,32}")


def available() -> bool:
    """Whether shared-memory segments can be created here (Linux with a /dev/shm)."""
    return os.path.isdir(SHM_DIR) and hasattr(os, "posix_fallocate")


def kernel_pid() -> int:
    """The supervising kernel's pid from ``MK_KERNEL_PID``; 0 outside a kernel."""
    value = os.environ.get("MK_KERNEL_PID", "")
    return int(value) if value.isdigit() else 0


def new_name(tag: str = "") -> str:
    """A fresh segment name ``mk.<kernel_pid>.<pid>.<tag><random>`` owned by this process."""
    if not _TAG.fullmatch(tag):
        raise ValueError(f"segment tag {tag!r} may only hold letters, digits, '_' and '-' (at most 32)")
    return f"{PREFIX}.{kernel_pid()}.{os.getpid()}.{tag}{secrets.token_hex(8)}"


def valid_name(name: Any) -> bool:
    """Whether ``name`` is a segment name this module would create (no paths, no other files)."""
    return type(name) is str and _NAME.fullmatch(name) is not None


def path_of(name: str) -> str:
    """The file of segment ``name``; ``ValueError`` for anything but a segment name."""
    if not valid_name(name):
        raise ValueError(f"{name!r} is not a shared-memory segment name (mk.<kernel>.<owner>.<id>)")
    return os.path.join(SHM_DIR, name)


class SegmentMapping(mmap.mmap):
    """An mmap that remembers which segment file it maps (the wire hands those over without a copy)."""

    path: str | None = None  # set while this process owns the segment's name
    address: int = 0


def map_file(fd: int, size: int, writable: bool, populate: bool = False) -> SegmentMapping:
    """Map ``size`` bytes of an open segment file (shared; ``populate`` pre-faults the pages)."""
    flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    m = SegmentMapping(fd, size, flags=flags, prot=prot)
    m.address = address_of_mapping(m)
    return m


def address_of_mapping(m: mmap.mmap) -> int:
    """Where mapping ``m`` starts in this process's memory (offsets of arrays in it are relative to it)."""
    import ctypes

    if m.closed or len(m) == 0:
        return 0
    view = memoryview(m)
    try:
        # A read-only buffer cannot back a ctypes object; numpy reads the address of any buffer.
        if not view.readonly:
            return ctypes.addressof(ctypes.c_char.from_buffer(view))
        import numpy as np

        return int(np.frombuffer(view, dtype=np.uint8, count=1).ctypes.data)
    finally:
        view.release()


class Segment:
    """A POSIX shared-memory segment (a file under /dev/shm) mapped into this process."""

    def __init__(self, name: str, size: int, mapping: SegmentMapping | None) -> None:
        self.name = name
        self.size = size
        self._mapping = mapping

    @classmethod
    def create(cls, size: int, *, tag: str = "", populate: bool = True) -> Segment:
        """Create and map a new segment of ``size`` bytes, owned by this process.

        The memory is reserved at once (``posix_fallocate``): a full /dev/shm fails here with
        ``OSError(ENOSPC)`` instead of killing the process with SIGBUS on first write.
        """
        if type(size) is not int or size <= 0:
            raise ValueError(f"segment size must be a positive integer, got {size!r}")
        name = new_name(tag)
        path = path_of(name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
            mapping = map_file(fd, size, True, populate)
        except BaseException:
            os.close(fd)
            unlink_path(path)
            raise
        os.close(fd)  # the mapping holds its own descriptor
        mapping.path = path
        return cls(name, size, mapping)

    @classmethod
    def attach(cls, name: str, *, writable: bool = False) -> Segment:
        """Map an existing segment by name (read-only unless ``writable``); does not unlink it."""
        path = path_of(name)
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
                raise ValueError(f"segment {name} is not a non-empty regular file")
            mapping = map_file(fd, st.st_size, writable)
        finally:
            os.close(fd)
        return cls(name, st.st_size, mapping)

    @property
    def buffer(self) -> memoryview:
        """The whole mapping."""
        if self._mapping is None or self._mapping.closed:
            raise ValueError(f"segment {self.name} is closed")
        return memoryview(self._mapping)

    def close(self) -> None:
        """Unmap (views of ``buffer`` must be released first, else ``BufferError``)."""
        if self._mapping is not None:
            self._mapping.close()
            self._mapping = None

    def unlink(self) -> None:
        """Remove the name; mappings stay valid until closed."""
        unlink_path(path_of(self.name))
        if self._mapping is not None:
            self._mapping.path = None

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Segment {self.name} {self.size} bytes{'' if self._mapping is not None else ' closed'}>"


def unlink_path(path: str) -> bool:
    """Remove ``path``; False when it did not exist (someone else unlinked it first)."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def _unlink_owned(path: str, owner: int) -> None:
    if os.getpid() == owner:  # not from a forked child that inherited the array
        unlink_path(path)


def empty(shape: int | tuple[int, ...], dtype: Any = "float32", *, tag: str = "a") -> Any:
    """A writable numpy array backed by a fresh segment; the wire hands it to same-host peers
    without copying (store readers fill it straight from a file).

    Once sent, treat it as read-only: receivers map the same pages. Its segment's name is
    unlinked when the array (every view of it) is gone; receivers keep their own mappings.
    """
    import numpy as np

    dt = np.dtype(dtype)
    shape_t = (shape,) if isinstance(shape, int) else tuple(shape)
    count = 1
    for d in shape_t:
        count *= d
    nbytes = count * dt.itemsize
    if nbytes == 0:
        return np.empty(shape_t, dtype=dt)
    seg = Segment.create(nbytes, tag=tag, populate=False)
    mapping = seg._mapping
    assert mapping is not None and mapping.path is not None
    weakref.finalize(mapping, _unlink_owned, mapping.path, os.getpid())
    return np.frombuffer(mapping, dtype=dt, count=count).reshape(shape_t)


def mapping_of(obj: Any) -> SegmentMapping | None:
    """The owned segment mapping ``obj`` (an array, memoryview, or views of them) lives in, if any."""
    seen = 0
    while obj is not None and seen < 64:
        t = type(obj)
        if t is SegmentMapping:
            return obj if obj.path is not None and not obj.closed else None
        if t is memoryview:
            obj = obj.obj
        else:
            obj = getattr(obj, "base", None)
        seen += 1
    return None


def address_of(obj: Any) -> int:
    """The address of the first byte of an array or bytes-like object."""
    iface = getattr(obj, "__array_interface__", None)
    if iface is not None:
        return int(iface["data"][0])
    import numpy as np

    return int(np.frombuffer(obj, dtype=np.uint8).ctypes.data) if memoryview(obj).nbytes else 0


def env_bytes(var: str, default: int) -> int:
    """A byte count from environment variable ``var`` (``default`` when unset or not a number)."""
    value = os.environ.get(var, "").strip()
    return int(value) if value.isdigit() else default


def threshold_from_env() -> int | None:
    """``MK_SHM_THRESHOLD``: payloads of at least this many bytes go by shared memory to same-host
    peers (default 16 MiB); ``off`` (or a non-Linux host) disables it."""
    value = os.environ.get("MK_SHM_THRESHOLD", "").strip().lower()
    if value in ("off", "none", "no", "false") or not available():
        return None
    return int(value) if value.isdigit() else DEFAULT_THRESHOLD


# --- cleanup -----------------------------------------------------------------------------------


def sweep(*, kernel_pid: int, owner_pid: int | None = None) -> int:
    """Unlink the segments of ``kernel_pid`` (those of ``owner_pid`` only, when given); returns the count.

    The kernel calls it when a replica exits (its segments are then unreachable garbage, and
    receivers' mappings stay valid) and at daemon start/stop.
    """
    prefix = f"{PREFIX}.{int(kernel_pid)}." + ("" if owner_pid is None else f"{int(owner_pid)}.")
    count = 0
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return 0
    for name in names:
        if name.startswith(prefix) and valid_name(name):
            count += unlink_path(os.path.join(SHM_DIR, name))
    return count


def sweep_orphans() -> int:
    """Unlink segments whose owner process no longer exists (any kernel); returns the count."""
    count = 0
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return 0
    for name in names:
        if not valid_name(name):
            continue
        if not _running(int(name.split(".")[2])):
            count += unlink_path(os.path.join(SHM_DIR, name))
    return count


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process. A zombie is not: it has died and only waits to be reaped
    (a killed kernel's replicas, before whoever inherits them reaps them), and it will never use
    or unlink its segments again."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # somebody else's process; it exists
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # "pid (comm) state ...": comm may hold spaces and parentheses, the state follows the last ")".
            return stat.read().rpartition(b")")[2][1:2] != b"Z"
    except FileNotFoundError:
        return not os.path.isdir("/proc/self")  # gone since the signal (without procfs: trust the signal)
    except OSError:
        return True
