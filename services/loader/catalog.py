"""The loader's book of models: (name, version) entries, their states, and each name's default.

Pure bookkeeping (no torch, no I/O), so the rules are unit-tested on their own: a name's first
loaded version becomes its default; unloading the default hands it to the highest remaining
version; a failed entry stays listed (with its error) until it is loaded again or unloaded.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from protocols.errors import ErrorCode, MicrokernelError

__all__ = ["Catalog", "Entry", "State", "check_name"]

_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


class State:
    """The states of an entry (plain strings on the wire)."""

    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


def check_name(name: Any) -> str:
    """A model name: one store-key segment (``[A-Za-z0-9._-]+``), since weights default to ``models/<name>``."""
    if not isinstance(name, str) or not _NAME.match(name) or name in (".", ".."):
        raise MicrokernelError(ErrorCode.INVALID_FIELD, f"model name must match [A-Za-z0-9._-]+, got {name!r}")
    return name


def check_version(version: Any) -> int | None:
    """None or a positive integer."""
    if version is None:
        return None
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise MicrokernelError(ErrorCode.INVALID_FIELD, f"version must be a positive integer, got {version!r}")
    return version


@dataclass(eq=False)
class Entry:
    """One loaded (or loading, or failed) version of a model."""

    name: str
    version: int
    arch: str
    source: str  # "store:<key>@<version>" or "file:<path>"
    state: str = State.LOADING
    device: str = "cpu"
    bytes: int = 0
    params: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    code: ErrorCode = ErrorCode.HANDLER_ERROR  # the failure's error code, for callers waiting on the load
    done: asyncio.Event = field(default_factory=asyncio.Event)
    # Set by the loader once ready: the segment, its layout and the placed model.
    segment: Any = None
    layout: Any = None
    model: Any = None

    def row(self, default: bool) -> dict[str, Any]:
        """This entry as ``list()`` shows it."""
        row = {"name": self.name, "version": self.version, "default": default, "arch": self.arch,
               "bytes": self.bytes, "params": self.params, "device": self.device, "state": self.state,
               "source": self.source}
        if self.error is not None:
            row["error"] = self.error
        return row


class Catalog:
    """Entries by (name, version), and the default version of each name."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, int], Entry] = {}
        self._defaults: dict[str, int] = {}

    def __iter__(self) -> Iterator[Entry]:
        """Entries by name, then version."""
        return iter(sorted(self._entries.values(), key=lambda e: (e.name, e.version)))

    def versions(self, name: str) -> list[int]:
        """The versions of ``name`` in the catalog, ascending."""
        return sorted(v for n, v in self._entries if n == name)

    def next_version(self, name: str) -> int:
        """One above the highest version of ``name`` (1 for a new name)."""
        versions = self.versions(name)
        return versions[-1] + 1 if versions else 1

    def default(self, name: str) -> int | None:
        """The default version of ``name``, None when it has none."""
        return self._defaults.get(name)

    def add(self, entry: Entry) -> Entry:
        """Add a loading entry; it replaces a failed one of the same version (a retry)."""
        key = (entry.name, entry.version)
        old = self._entries.get(key)
        if old is not None and old.state != State.FAILED:
            raise MicrokernelError(ErrorCode.BAD_STATE, f"model {entry.name!r} version {entry.version} is already {old.state}")
        self._entries[key] = entry
        self._defaults.setdefault(entry.name, entry.version)
        return entry

    def find(self, name: str, version: int | None = None) -> Entry:
        """The entry of ``name`` at ``version`` (its default when None); NOT_FOUND names what exists."""
        if version is None:
            version = self._defaults.get(name)
            if version is None:
                raise MicrokernelError(ErrorCode.NOT_FOUND, f"model {name!r} is not loaded (loaded: {self._names()})")
        entry = self._entries.get((name, version))
        if entry is None:
            have = self.versions(name)
            detail = f"loaded versions: {have}" if have else f"loaded: {self._names()}"
            raise MicrokernelError(ErrorCode.NOT_FOUND, f"model {name!r} version {version} is not loaded ({detail})")
        return entry

    def set_default(self, name: str, version: int) -> None:
        """Make ``version`` the default of ``name`` (it must be in the catalog)."""
        self.find(name, version)
        self._defaults[name] = version

    def remove(self, entry: Entry) -> None:
        """Take ``entry`` out; a removed default passes to the highest remaining version."""
        self._entries.pop((entry.name, entry.version), None)
        if self._defaults.get(entry.name) == entry.version:
            rest = self.versions(entry.name)
            if rest:
                self._defaults[entry.name] = rest[-1]
            else:
                del self._defaults[entry.name]

    def rows(self) -> list[dict[str, Any]]:
        """Every entry as ``list()`` shows it, by name then version."""
        return [e.row(self._defaults.get(e.name) == e.version) for e in self]

    def _names(self) -> str:
        names = sorted({n for n, _ in self._entries})
        return ", ".join(names) or "none"
