"""The audit log: one JSON line per security decision, on the logger ``microkernel.audit``.

Written for every denied request, every accepted request that needs ``operator`` or ``admin``,
and every tcp connection refused by CURVE authentication. Reads (``status``, ``list`` …) and the
replicas' own messages are not audited: they would drown the lines that matter.

A line (after the daemon's usual log prefix)::

    audit {"time": "2026-11-22T08:30:00.123Z", "peer": "tcp:alice", "role": "operator",
           "msg_type": "stop_request", "service": "echo", "decision": "allowed"}
"""

from __future__ import annotations

import datetime
import json
import logging
from typing import Any

audit_log = logging.getLogger("microkernel.audit")


def enable() -> None:
    """Let audit lines through even when the daemon logs only warnings (they are the record)."""
    if audit_log.level == logging.NOTSET or audit_log.level > logging.INFO:
        audit_log.setLevel(logging.INFO)


def open_file(path: str) -> logging.Handler:
    """Also append audit lines to ``path`` (``security.audit_log``); remove the handler with :func:`close_file`."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    audit_log.addHandler(handler)
    return handler


def close_file(handler: logging.Handler) -> None:
    audit_log.removeHandler(handler)
    handler.close()


def record(*, peer: str, role: str, msg_type: str, decision: str, service: str | None = None,
           reason: str | None = None, **extra: Any) -> dict[str, Any]:
    """Write one audit line; returns its fields (tests read them back from the log)."""
    fields: dict[str, Any] = {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "peer": peer,
        "role": role,
        "msg_type": msg_type,
        "service": service,
        "decision": decision,
    }
    if reason:
        fields["reason"] = reason
    fields.update(extra)
    level = logging.INFO if decision == "allowed" else logging.WARNING
    audit_log.log(level, "audit %s", json.dumps(fields, separators=(", ", ": "), default=str))
    return fields


def parse_line(line: str) -> dict[str, Any] | None:
    """The fields of an audit line found in ``line`` (a daemon log line), or None."""
    start = line.find("audit {")
    if start < 0:
        return None
    try:
        value = json.loads(line[start + len("audit "):])
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
