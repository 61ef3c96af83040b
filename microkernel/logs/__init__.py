"""Replica stdout/stderr capture into rotated per-service files, and reading them back.

``manager`` (the kernel's :class:`ServiceLogs`), ``capture`` (one child's pipes), ``files`` (one
service's file and its rotation), ``lines`` (the record format), ``tail`` (reading, in the thread
pool).
"""

from __future__ import annotations

from microkernel.logs.manager import ServiceLogs

__all__ = ["ServiceLogs"]
