"""Which role adding a service needs: nothing a client sends may make the daemon run code of its choosing
unless the client is ``admin``.

An ``operator`` may add a service whose ``entry`` is one the kernel already runs (the entry of a
configured service) or a name (or target) in the ``microkernel.services`` entry-point group, i.e.
code an administrator installed. A ``command``, any other ``module:Class``, and the keys that
change what code a child runs (``python``, ``env``, ``cwd``) need ``admin``.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterable, Mapping
from typing import Any, Final

from microkernel.security.roles import Role

ENTRY_POINT_GROUP: Final = "microkernel.services"
CODE_KEYS: Final = ("python", "env", "cwd")
"""Service keys that decide which code a replica runs: an interpreter, LD_PRELOAD/PYTHONPATH, sys.path[0]."""


class EntryCatalog:
    """The entries an operator may use; the installed entry points are read once, on first use."""

    def __init__(self) -> None:
        self._installed: frozenset[str] | None = None

    def installed(self) -> frozenset[str]:
        """Names and targets (``module:Class``) of the ``microkernel.services`` entry points."""
        if self._installed is None:
            found: set[str] = set()
            for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                found.update((ep.name, ep.value))
            self._installed = frozenset(found)
        return self._installed

    def needs(self, entry: str | None, command: Any, options: Mapping[str, Any],
              configured: Iterable[str | None]) -> tuple[Role, str]:
        """The role an ``add_service_request`` needs, and why (for the ``forbidden`` reason)."""
        if command:
            return Role.ADMIN, "add a service with a command line"
        code_keys = [key for key in CODE_KEYS if options.get(key)]
        if code_keys:
            return Role.ADMIN, f"add a service with {', '.join(code_keys)} set"
        if entry is None:
            return Role.OPERATOR, "add services"
        if entry in set(configured) or entry in self.installed():
            return Role.OPERATOR, "add services"
        return Role.ADMIN, (f"add a service with entry {entry!r}, which is neither configured for a service "
                            f"nor in the {ENTRY_POINT_GROUP!r} entry-point group")
