"""Where a model's weights come from: a store key or a safetensors file on this host."""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from protocols.errors import ErrorCode, MicrokernelError
from services.store.safetensors import SafetensorsError, decode

__all__ = ["FileWeights", "is_file", "meta_config", "read_file"]


def is_file(weights: str) -> bool:
    """Whether ``weights`` names a file rather than a store key.

    Store keys are ``/``-separated ``[A-Za-z0-9._-]`` segments and never start with ``/``, ``.`` or
    ``~``; a path that does (or one ending in ``.safetensors``) is a file.
    """
    return weights.startswith(("/", "./", "../", "~")) or weights.endswith(".safetensors")


@dataclass(frozen=True, slots=True, kw_only=True)
class FileWeights:
    """A safetensors file mapped read-only: its arrays are views of the mapping (no copy)."""

    path: str
    arrays: dict[str, np.ndarray]
    metadata: dict[str, str]
    mapping: mmap.mmap | None

    def close(self) -> None:
        """Unmap the file (every array view must be dropped first)."""
        self.arrays.clear()
        if self.mapping is not None:
            try:
                self.mapping.close()
            except BufferError:
                pass  # a view is still referenced somewhere: the mapping goes when it does


def read_file(path: str) -> FileWeights:
    """Map and decode a safetensors file (blocking: run it in a thread)."""
    full = os.path.abspath(os.path.expanduser(path))
    try:
        with open(full, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
    except OSError as exc:
        raise MicrokernelError(ErrorCode.NOT_FOUND, f"weights file {path!r}: {exc.strerror or exc}") from None
    try:
        arrays, metadata = decode(mapping if mapping is not None else b"")
    except SafetensorsError as exc:
        if mapping is not None:
            mapping.close()
        raise MicrokernelError(ErrorCode.CORRUPTED, f"weights file {path!r} is not a valid safetensors file: {exc}") from None
    return FileWeights(path=full, arrays=arrays, metadata=metadata, mapping=mapping)


def meta_config(meta: Mapping[str, Any], origin: str) -> dict[str, Any]:
    """The model config recorded with the weights (a dict, or JSON text in file metadata)."""
    config = meta.get("config")
    if config is None:
        return {}
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except json.JSONDecodeError as exc:
            raise MicrokernelError(ErrorCode.INVALID_FIELD, f"{origin}: metadata 'config' is not JSON ({exc})") from None
    if not isinstance(config, dict):
        raise MicrokernelError(ErrorCode.INVALID_FIELD, f"{origin}: metadata 'config' must be a mapping, got {type(config).__name__}")
    return config
