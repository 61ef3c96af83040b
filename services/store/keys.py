"""What the store accepts as keys, versions and metadata; every refusal names the offending value."""

from __future__ import annotations

import json
import re
from typing import Any

from protocols.errors import ErrorCode, MicrokernelError

MAX_KEY_LENGTH = 512
MAX_META_BYTES = 1 << 20  # metadata lives in the index: keep it small
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_PREFIX = re.compile(r"[A-Za-z0-9._/-]*")


def invalid(reason: str) -> MicrokernelError:
    """An ``invalid_field`` error with ``reason``."""
    return MicrokernelError(ErrorCode.INVALID_FIELD, reason)


def check_key(key: Any) -> str:
    """Return ``key`` if it is a valid store key, else raise ``invalid_field`` saying why.

    A key is one or more segments of ``[A-Za-z0-9._-]`` separated by ``/``; no segment is ``.``
    or ``..``; at most 512 characters. So a key is always a safe relative path.
    """
    if not isinstance(key, str):
        raise invalid(f"store key must be a string, got {type(key).__name__}")
    if not key:
        raise invalid("store key is empty")
    if len(key) > MAX_KEY_LENGTH:
        raise invalid(f"store key {key[:40]!r}... is {len(key)} characters long (limit {MAX_KEY_LENGTH})")
    if key.startswith("/"):
        raise invalid(f"store key {key!r} is absolute; keys are relative, like 'models/charformer'")
    for segment in key.split("/"):
        if not segment:
            raise invalid(f"store key {key!r} has an empty segment (a doubled or trailing '/')")
        if segment in (".", ".."):
            raise invalid(f"store key {key!r} has a {segment!r} segment")
        if not _SEGMENT.fullmatch(segment):
            bad = sorted({c for c in segment if not _SEGMENT.fullmatch(c)})
            raise invalid(f"store key {key!r} has characters outside [A-Za-z0-9._-] and '/': {''.join(bad)!r}")
    return key


def check_prefix(prefix: Any) -> str:
    """A ``list`` prefix: any start of a key (``""`` lists everything)."""
    if not isinstance(prefix, str) or len(prefix) > MAX_KEY_LENGTH or not _PREFIX.fullmatch(prefix):
        raise invalid(f"list prefix {prefix!r} must be a string of [A-Za-z0-9._-/] up to {MAX_KEY_LENGTH} characters")
    return prefix


def check_version(version: Any, key: str) -> int | None:
    """``None`` (latest) or a positive integer."""
    if version is None:
        return None
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise invalid(f"version of {key!r} must be a positive integer or None, got {version!r}")
    return version


def _scalar(value: Any) -> Any:
    # A numpy scalar arrives as a 0-d array (e.g. a loss of dtype float32): store it as a number.
    if getattr(value, "shape", None) == () and hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON-like")


def check_meta(meta: Any, key: str) -> str:
    """``meta`` (a JSON-able dict, or None for ``{}``) as JSON text for the index."""
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise invalid(f"meta of {key!r} must be a dict, got {type(meta).__name__}")
    try:
        # NaN/inf are allowed (a diverged loss is still worth recording).
        text = json.dumps(meta, separators=(",", ":"), default=_scalar)
    except (TypeError, ValueError) as exc:
        raise invalid(f"meta of {key!r} must be JSON-like (str keys; str, numbers, bools, None, lists, dicts): {exc}") from None
    if len(text) > MAX_META_BYTES:
        raise invalid(f"meta of {key!r} is {len(text)} bytes as JSON (limit {MAX_META_BYTES})")
    return text
