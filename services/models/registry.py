"""The ``Architecture`` contract and the name → architecture registry.

An architecture is a plain value: how to build a ``torch.nn.Module`` from a config, how to run a
batch of request inputs through it, and sample inputs. It is found by, in order:

1. an import path ``"package.module:attribute"`` (the attribute is an ``Architecture``);
2. a name registered in this process with :func:`register` (the shipped ``charformer`` is one);
3. an entry point of the ``microkernel.models`` group (installed plug-in packages).

.. code-block:: toml

    # a plug-in package's pyproject.toml
    [project.entry-points."microkernel.models"]
    tinylm = "mypkg.tinylm:ARCHITECTURE"
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from protocols.errors import ErrorCode, MicrokernelError

if TYPE_CHECKING:
    import torch

__all__ = ["ENTRY_POINT_GROUP", "Architecture", "build_model", "merge_config", "names", "register", "resolve"]

ENTRY_POINT_GROUP = "microkernel.models"

# Built in without an installed distribution (a source checkout): name -> import path.
_BUILTIN: dict[str, str] = {"charformer": "services.models.charformer:ARCHITECTURE"}
_registered: dict[str, Architecture] = {}
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


@dataclass(frozen=True, slots=True, kw_only=True)
class Architecture:
    """A model family: construction, batched inference and sample inputs.

    ``build(config)`` gets the config with ``default_config`` merged in. ``infer_batch(model,
    inputs, config)`` maps a batch of msgpack-native inputs to one result each and runs under
    ``torch.inference_mode()``; the model-specific pre/post-processing lives there.
    """

    name: str
    default_config: dict[str, Any]
    build: Callable[[dict[str, Any]], torch.nn.Module]
    infer_batch: Callable[[torch.nn.Module, list[Any], dict[str, Any]], list[Any]]
    example_inputs: Callable[[int], list[Any]]


def register(arch: Architecture) -> None:
    """Make ``arch`` resolvable by its name in this process (overrides an entry point of that name)."""
    if not isinstance(arch, Architecture):
        raise TypeError(f"register() needs an Architecture, got {type(arch).__name__}")
    _registered[arch.name] = arch


def _checked(obj: Any, origin: str) -> Architecture:
    if not isinstance(obj, Architecture):
        raise MicrokernelError(ErrorCode.INVALID_FIELD,
                               f"model {origin!r} is a {type(obj).__name__}, not a services.models.Architecture")
    return obj


def _load_import_path(path: str) -> Architecture:
    module_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise MicrokernelError(ErrorCode.NOT_FOUND, f"model {path!r}: cannot import module {module_name!r} ({exc})") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise MicrokernelError(ErrorCode.NOT_FOUND, f"model {path!r}: module {module_name!r} has no attribute {attr!r}") from None
    return _checked(obj, path)


def _entry_point(name: str) -> Architecture | None:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            try:
                return _checked(ep.load(), f"{name} (entry point {ep.value})")
            except ImportError as exc:
                raise MicrokernelError(ErrorCode.NOT_FOUND, f"model {name!r}: its entry point {ep.value!r} failed to import ({exc})") from None
    return None


def resolve(name: str) -> Architecture:
    """The architecture called ``name``: an import path, a registered name or an entry point.

    Raises ``MicrokernelError`` ``not_found`` (naming the known models) when nothing matches.
    """
    if not isinstance(name, str) or not name:
        raise MicrokernelError(ErrorCode.INVALID_FIELD, f"model must be a non-empty string, got {name!r}")
    if ":" in name:
        if not _IMPORT_PATH.match(name):
            raise MicrokernelError(ErrorCode.INVALID_FIELD, f"model {name!r} is not an import path of the form 'package.module:attribute'")
        return _load_import_path(name)
    if name in _registered:
        return _registered[name]
    arch = _entry_point(name)
    if arch is None and name in _BUILTIN:
        arch = _load_import_path(_BUILTIN[name])
    if arch is None:
        known = ", ".join(names()) or "none"
        raise MicrokernelError(ErrorCode.NOT_FOUND, f"unknown model {name!r} (known: {known}; or give an import path 'package.module:attribute')")
    _registered[name] = arch
    return arch


def names() -> list[str]:
    """Every architecture name resolvable without an import path."""
    found = set(_registered) | set(_BUILTIN) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return sorted(found)


def merge_config(arch: Architecture, config: dict[str, Any] | None) -> dict[str, Any]:
    """``arch.default_config`` updated with ``config``; unknown keys are an ``invalid_field`` error."""
    config = dict(config or {})
    unknown = sorted(set(config) - set(arch.default_config))
    if unknown:
        raise MicrokernelError(ErrorCode.INVALID_FIELD,
                               f"model {arch.name!r} has no config key(s) {', '.join(unknown)} "
                               f"(known: {', '.join(sorted(arch.default_config))})")
    return {**arch.default_config, **config}


def build_model(arch: Architecture, config: dict[str, Any] | None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build a fresh model of ``arch`` and return it with its merged config."""
    merged = merge_config(arch, config)
    return arch.build(merged), merged
