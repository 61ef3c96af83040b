"""cgroup v2 memory limits for replicas, when the daemon has a delegated cgroup.

With a cgroup the kernel enforces ``memory.max`` itself (no 250 ms sampling window for a fast
allocation to slip through) and counts OOM kills per replica, so an exit can be reported as ``oom``
rather than a bare ``signal(9)``. Without one, sampling (:mod:`microkernel.resources.sampling`) is the
only enforcement; :func:`detect` says which, and why, for ``mkctl status``.

Layout under the daemon's cgroup ``<root>`` (under systemd: ``Delegate=yes`` in the unit)::

    <root>/kernel/                   the daemon itself, and its helper processes
    <root>/services/<svc>.<key>/     one leaf per replica: memory.max, memory.high, cgroup.procs

cgroup v2's "no internal processes" rule: a cgroup that enables a controller for its children in
``cgroup.subtree_control`` may not hold processes itself (the write fails with EBUSY). So
:meth:`CgroupManager.enable` first moves every process of ``<root>`` into the ``kernel`` leaf, then
enables ``+memory`` in ``<root>`` and in ``<root>/services``. It must run before any replica starts.

Everything goes through the cgroup filesystem interface (plain file reads and writes), so the
manager works on any directory laid out like a cgroup2 tree; the root is injectable.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CgroupError", "CgroupManager", "CgroupSupport", "detect", "own_cgroup"]

_DEFAULT_MOUNT = Path("/sys/fs/cgroup")
_KERNEL_LEAF = "kernel"
_SERVICES = "services"
_NAME_PART_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# Moving processes races with forks; each round moves what the previous one missed.
_MOVE_ROUNDS = 5


class CgroupError(RuntimeError):
    """A cgroup operation failed in a way the daemon should report (not a vanished process)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CgroupSupport:
    """Whether per-replica memory cgroups can be used, and if not, why (``reason``, for people).

    ``root`` is the daemon's cgroup directory (``None`` when there is no cgroup2 hierarchy),
    ``controllers`` what it offers (``cgroup.controllers``), ``memory_enabled`` whether ``+memory``
    is already on in its ``cgroup.subtree_control``.
    """

    available: bool
    reason: str = ""
    root: Path | None = None
    controllers: frozenset[str] = field(default_factory=frozenset)
    memory_enabled: bool = False

    def to_status(self) -> dict[str, Any]:
        """The msgpack-native form for status replies."""
        return {
            "available": self.available,
            "reason": self.reason,
            "root": None if self.root is None else str(self.root),
            "controllers": sorted(self.controllers),
            "memory_enabled": self.memory_enabled,
        }


def _mounts(mountinfo: Path) -> list[tuple[str, str, set[str]]]:
    """``(mount point, fs type, super options)`` of each line of a mountinfo file."""
    mounts = []
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        before, sep, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        # Mount points escape spaces and the like as octal (\040).
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4])
        mounts.append((point, tail[0], set(tail[2].split(","))))
    return mounts


def own_cgroup(*, proc_cgroup: str | os.PathLike[str] = "/proc/self/cgroup",
               mountinfo: str | os.PathLike[str] = "/proc/self/mountinfo") -> Path | None:
    """The directory of this process's cgroup v2, or ``None`` when there is no cgroup2 hierarchy.

    The hierarchy is wherever cgroup2 is mounted (``/sys/fs/cgroup``, or ``/sys/fs/cgroup/unified``
    on hybrid systems); the path inside it is the ``0::`` line of ``/proc/self/cgroup``.
    """
    mount = next((Path(p) for p, fstype, _ in _mounts(Path(mountinfo)) if fstype == "cgroup2"), None)
    if mount is None:
        return None
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("0::"):
            return mount / line[3:].strip().lstrip("/")
    return None


def detect(
    root: str | os.PathLike[str] | None = None,
    *,
    proc_cgroup: str | os.PathLike[str] = "/proc/self/cgroup",
    mountinfo: str | os.PathLike[str] = "/proc/self/mountinfo",
) -> CgroupSupport:
    """Find out whether the daemon can put replicas in memory-limited cgroups under ``root``.

    ``root`` defaults to the daemon's own cgroup (:func:`own_cgroup`). Available means: a cgroup2
    directory, the ``memory`` controller offered in it, and its ``cgroup.procs`` and
    ``cgroup.subtree_control`` writable (a delegated subtree), so :meth:`CgroupManager.enable` can
    turn the controller on for the children. Reads only; changes nothing.
    """
    if root is None:
        found = own_cgroup(proc_cgroup=proc_cgroup, mountinfo=mountinfo)
        if found is None:
            if not any(fstype == "cgroup2" for _, fstype, _ in _mounts(Path(mountinfo))):
                return CgroupSupport(available=False, reason="cgroup v1 only (no cgroup2 mount)")
            return CgroupSupport(available=False, reason=f"this process has no cgroup v2 entry in {proc_cgroup}")
        path = found
    else:
        path = Path(root)

    try:
        controllers = frozenset((path / "cgroup.controllers").read_text().split())
    except OSError as exc:
        return CgroupSupport(available=False, root=path, reason=f"{path} is not a cgroup v2 directory ({_why(exc)})")
    try:
        enabled = frozenset((path / "cgroup.subtree_control").read_text().split())
    except OSError as exc:
        return CgroupSupport(available=False, root=path, controllers=controllers,
                             reason=f"cannot read {path / 'cgroup.subtree_control'} ({_why(exc)})")
    memory_enabled = "memory" in enabled

    def support(reason: str = "") -> CgroupSupport:
        return CgroupSupport(available=not reason, reason=reason, root=path, controllers=controllers,
                             memory_enabled=memory_enabled)

    if "memory" not in controllers:
        if _memory_on_v1(Path(mountinfo)):
            return support(f"the memory controller is bound to cgroup v1, not offered in {path} (hybrid cgroup setup)")
        return support(f"the memory controller is not offered in {path} (not delegated by the parent cgroup)")
    unwritable = [str(path)] if not os.access(path, os.W_OK) else []
    unwritable += [name for name in ("cgroup.procs", "cgroup.subtree_control") if not os.access(path / name, os.W_OK)]
    if unwritable:
        return support(f"{path} is not delegated to this user ({', '.join(unwritable)} not writable; "
                       "under systemd set Delegate=yes)")
    return support()


def _memory_on_v1(mountinfo: Path) -> bool:
    return any(fstype == "cgroup" and "memory" in opts for _, fstype, opts in _mounts(mountinfo))


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


class CgroupManager:
    """Creates, limits and removes one cgroup per replica under a delegated ``root``.

    Call :meth:`enable` once at start-up, then per replica: :meth:`create`, :meth:`set_memory`,
    :meth:`add` (or have the child join before exec), and at its exit :meth:`oom_kills` then
    :meth:`remove`. Blocking file I/O (cheap); OS errors other than the tolerated ones propagate.
    """

    __slots__ = ("_root",)

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self._root = Path(root)

    @property
    def root(self) -> Path:
        """The daemon's cgroup directory."""
        return self._root

    @property
    def kernel_leaf(self) -> Path:
        """Where :meth:`enable` moves the daemon's own processes."""
        return self._root / _KERNEL_LEAF

    @property
    def services_dir(self) -> Path:
        """The parent of the replica cgroups."""
        return self._root / _SERVICES

    def enable(self) -> None:
        """Move the root's processes into the ``kernel`` leaf and enable ``+memory`` for the replicas.

        Idempotent. Every process in the root moves (in a delegated cgroup they are all the
        daemon's), then ``+memory`` is written to the root's and to ``services/``'s
        ``cgroup.subtree_control``. Raises :class:`CgroupError` when the memory controller is not
        offered or a process could not be moved out (EBUSY: the no-internal-processes rule).
        """
        controllers = _read(self._root / "cgroup.controllers").split()
        if "memory" not in controllers:
            raise CgroupError(f"the memory controller is not offered in {self._root} (controllers: {controllers})")
        self.kernel_leaf.mkdir(exist_ok=True)
        moved: set[int] = set()
        for _ in range(_MOVE_ROUNDS):
            pending = [pid for pid in _pids(self._root) if pid not in moved]
            if not pending:
                break
            for pid in pending:
                moved.add(pid)
                self._move(self.kernel_leaf, pid, tolerate=(errno.ESRCH, errno.EINVAL))
        try:
            _write(self._root / "cgroup.subtree_control", "+memory")
            self.services_dir.mkdir(exist_ok=True)
            _write(self.services_dir / "cgroup.subtree_control", "+memory")
        except OSError as exc:
            left = _pids(self._root)
            hint = f"; processes still in {self._root}: {left} (no internal processes allowed)" if left else ""
            raise CgroupError(f"cannot enable the memory controller under {self._root}: {_why(exc)}{hint}") from exc

    def create(self, service: str, replica_key: str | int) -> Path:
        """Create (or reuse) the cgroup of one replica and return its path.

        ``replica_key`` should be unique per incarnation (e.g. ``"0.3"``: replica 0, incarnation
        3), so a replacement never inherits its predecessor's ``memory.events`` counters while the
        old cgroup is still being removed.
        """
        key = str(replica_key)
        for part, what in ((service, "service name"), (key, "replica key")):
            if not _NAME_PART_RE.fullmatch(part) or ".." in part:
                raise ValueError(f"invalid {what} for a cgroup directory: {part!r}")
        path = self.services_dir / f"{service}.{key}"
        path.mkdir(exist_ok=True)
        return path

    def set_memory(self, path: Path, high: int | None, max: int | None) -> None:
        """Write ``memory.high`` (throttle and reclaim above it) and ``memory.max`` (OOM-kill above it).

        ``None`` means no limit (``"max"``). Recommended: ``max`` = the hard budget and ``high``
        ``None``: a soft budget is a warning, while ``memory.high`` would slow the replica down.
        """
        limits = (("memory.high", high), ("memory.max", max))
        for name, value in limits:
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a byte count > 0 or None, got {value!r}")
        for name, value in limits:
            _write(path / name, "max" if value is None else str(value))

    def set_oom_group(self, path: Path, enabled: bool = True) -> None:
        """``memory.oom.group``: on an OOM kill, kill the whole replica tree, not one process of it."""
        _write(path / "memory.oom.group", "1" if enabled else "0")

    def add(self, path: Path, pid: int) -> None:
        """Move process ``pid`` (with all its threads) into the cgroup at ``path``.

        ``pid`` 0 means the writing process: a child can join its cgroup between fork and exec,
        before it can start anything that would escape the limit.
        """
        self._move(path, pid, tolerate=())

    def procs(self, path: Path) -> list[int]:
        """The pids in the cgroup at ``path`` (empty if it is gone)."""
        try:
            return _pids(path)
        except FileNotFoundError:
            return []

    def oom_kills(self, path: Path) -> int:
        """How many processes the kernel OOM-killed in this cgroup (``oom_kill`` of ``memory.events``).

        0 if the cgroup is gone: read it before :meth:`remove`.
        """
        try:
            text = _read(path / "memory.events")
        except FileNotFoundError:
            return 0
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name == "oom_kill":
                return int(value)
        return 0

    def remove(self, path: Path) -> bool:
        """Remove a replica's cgroup; False when it is still busy (processes not yet gone), True when
        it is removed or was already gone. Retry a busy one later."""
        try:
            path.rmdir()
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno in (errno.EBUSY, errno.ENOTEMPTY):
                return False
            raise
        return True

    def prune(self) -> list[Path]:
        """Remove the empty replica cgroups a previous daemon left behind; return those removed."""
        removed = []
        try:
            entries = sorted(p for p in self.services_dir.iterdir() if p.is_dir())
        except FileNotFoundError:
            return []
        for path in entries:
            if not self.procs(path) and self.remove(path):
                removed.append(path)
        return removed

    def _move(self, path: Path, pid: int, *, tolerate: Iterable[int]) -> None:
        try:
            _write(path / "cgroup.procs", str(pid))
        except OSError as exc:
            if exc.errno not in tuple(tolerate):
                raise

    def __repr__(self) -> str:
        return f"CgroupManager({str(self._root)!r})"


def _read(path: Path) -> str:
    return path.read_text()


def _pids(path: Path) -> list[int]:
    return [int(line) for line in _read(path / "cgroup.procs").split()]


def _write(path: Path, text: str) -> None:
    # No O_CREAT: cgroupfs files exist or the controller is off, and creating a regular file there
    # would fail with a misleading EACCES. One write(2) per value, as cgroupfs requires.
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
