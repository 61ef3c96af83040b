"""What ``mkctl`` prints: tables, event lines and JSON conversion, as pure functions.

Everything here takes plain data (reply dicts, envelopes) and returns strings or JSON-ready
values, so the output format is unit-tested without a kernel.
"""

from __future__ import annotations

import base64
import json
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from protocols import wire
from protocols.wire import RawArray

from microkernel.client_events import event_seq

__all__ = [
    "BinaryMode",
    "dump_json",
    "event_line",
    "event_record",
    "format_duration",
    "format_exit",
    "kernel_line",
    "list_table",
    "lookup_text",
    "ping_line",
    "render_table",
    "service_detail",
    "status_table",
    "to_jsonable",
]

BinaryMode = Literal["summary", "base64"]
EMPTY = "-"
_MAX_PIDS_SHOWN = 4


# --- JSON --------------------------------------------------------------------------------------


def _nbytes(value: Any) -> int:
    return memoryview(value).nbytes


def _binary(data: Any, binary: BinaryMode) -> dict[str, Any]:
    out: dict[str, Any] = {"$bytes": _nbytes(data)}
    if binary == "base64":
        out["$base64"] = base64.b64encode(memoryview(data).tobytes()).decode("ascii")
    return out


def to_jsonable(value: Any, binary: BinaryMode = "summary") -> Any:
    """A JSON-ready copy of a decoded msgpack value (an RPC result, an event body).

    numpy arrays become (nested) lists and numpy scalars plain numbers. Binary data becomes
    ``{"$bytes": N}`` (``binary="summary"``, for terminals) or ``{"$bytes": N, "$base64": "…"}``
    (``binary="base64"``, lossless). Map keys become strings. Anything else unknown is shown
    by ``str()`` rather than failing the whole output.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        # JSON has no NaN/Infinity; keep them readable instead of emitting invalid JSON.
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v, binary) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, binary) for v in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _binary(value, binary)
    if isinstance(value, RawArray):  # an ndarray received without numpy installed
        out = {"$array": {"dtype": value.dtype, "shape": list(value.shape)}}
        out.update(_binary(value.data, binary))
        return out
    if hasattr(value, "dtype") and hasattr(value, "tolist"):  # numpy array or scalar, duck-typed
        return to_jsonable(value.tolist(), binary)
    return str(value)


def dump_json(value: Any, *, binary: BinaryMode = "summary", indent: int | None = 2) -> str:
    """``value`` as a JSON document (see ``to_jsonable`` for the conversions)."""
    return json.dumps(to_jsonable(value, binary), indent=indent, ensure_ascii=False, sort_keys=False)


# --- small pieces ------------------------------------------------------------------------------


def format_duration(seconds: float | None) -> str:
    """A compact uptime: ``850ms``, ``12.3s``, ``5m12s``, ``2h03m``, ``3d04h``; ``-`` if unknown."""
    if seconds is None or seconds < 0 or not math.isfinite(seconds):
        return EMPTY
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    s = int(seconds)
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_exit(last_exit: Mapping[str, Any] | None) -> str:
    """An exit reason map as text: ``exit(1)``, ``signal(9)``, ``heartbeat`` …; ``-`` if none."""
    if not last_exit:
        return EMPTY
    text = last_exit.get("text")
    if text:
        return str(text)
    kind = last_exit.get("kind", "?")
    if kind == "exit":
        return f"exit({last_exit.get('code')})"
    if kind == "signal":
        return f"signal({last_exit.get('signal')})"
    return str(kind)


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns separated by two spaces, no trailing blanks."""
    cells = [[str(h) for h in headers]] + [[EMPTY if c is None or c == "" else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


# --- status / list / lookup / ping -------------------------------------------------------------


_ALIVE = frozenset({"starting", "running", "ready", "stopping"})


def _pids(replicas: Sequence[Mapping[str, Any]]) -> str:
    pids = [str(r["pid"]) for r in replicas if r.get("pid") and r.get("state") in _ALIVE]
    if len(pids) > _MAX_PIDS_SHOWN:
        pids = pids[:_MAX_PIDS_SHOWN - 1] + [f"+{len(pids) - _MAX_PIDS_SHOWN + 1}"]
    return ",".join(pids) or EMPTY


def _service_uptime(replicas: Sequence[Mapping[str, Any]]) -> float | None:
    # The youngest live replica: a replica that keeps restarting shows up as a short uptime.
    ups = [r["uptime_s"] for r in replicas if r.get("state") in _ALIVE and r.get("uptime_s") is not None]
    return min(ups) if ups else None


def _service_last_exit(replicas: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    # Exit maps carry no time; the replica started most recently exited most recently.
    exited = [r for r in replicas if r.get("last_exit")]
    if not exited:
        return None
    return max(exited, key=lambda r: r.get("started_at_ns") or 0)["last_exit"]


def kernel_line(kernel: Mapping[str, Any]) -> str:
    """One line about the kernel itself, above the status table."""
    parts = [f"microkerneld {kernel.get('version', '?')}", f"pid {kernel.get('pid', '?')}",
             f"up {format_duration(kernel.get('uptime_s'))}"]
    if kernel.get("runtime_dir"):
        parts.append(str(kernel["runtime_dir"]))
    return "  ".join(parts)


def status_table(services: Sequence[Mapping[str, Any]]) -> str:
    """NAME STATE READY RESTARTS PID(S) UPTIME LAST-EXIT, one row per service."""
    if not services:
        return "no services configured"
    rows = []
    for s in services:
        replicas = s.get("replicas") or []
        rows.append([
            s.get("name"),
            s.get("state"),
            f"{s.get('ready_replicas', 0)}/{s.get('desired_replicas', 0)}",
            s.get("restarts", 0),
            _pids(replicas),
            format_duration(_service_uptime(replicas)),
            format_exit(_service_last_exit(replicas)),
        ])
    return render_table(["NAME", "STATE", "READY", "RESTARTS", "PID(S)", "UPTIME", "LAST-EXIT"], rows)


def brief_table(services: Sequence[Mapping[str, Any]]) -> str:
    """NAME STATE READY RESTARTS, one row per service (a brief status)."""
    if not services:
        return "no services configured"
    rows = [[s.get("name"), s.get("state"), f"{s.get('ready_replicas', 0)}/{s.get('desired_replicas', 0)}",
             s.get("restarts", 0)] for s in services]
    return render_table(["NAME", "STATE", "READY", "RESTARTS"], rows)


def service_detail(service: Mapping[str, Any]) -> str:
    """One service: its summary lines, then a table of its replicas."""
    depends = ", ".join(service.get("depends_on") or ()) or EMPTY
    lines = [
        f"{service.get('name')}: {service.get('state')}  "
        f"{service.get('ready_replicas', 0)}/{service.get('desired_replicas', 0)} ready  "
        f"restarts {service.get('restarts', 0)}",
        f"  entry: {service.get('entry') or EMPTY}  group: {service.get('group') or EMPTY}  depends on: {depends}",
    ]
    replicas = service.get("replicas") or []
    if not replicas:
        return "\n".join(lines + ["  no replicas"])
    rows = [
        [
            r.get("replica"),
            r.get("incarnation"),
            r.get("state"),
            r.get("pid") if r.get("state") in _ALIVE else None,
            format_duration(r.get("uptime_s")) if r.get("state") in _ALIVE else EMPTY,
            r.get("restarts", 0),
            format_exit(r.get("last_exit")),
            r.get("endpoint"),
        ]
        for r in replicas
    ]
    table = render_table(["REPLICA", "INCARNATION", "STATE", "PID", "UPTIME", "RESTARTS", "LAST-EXIT", "ENDPOINT"], rows)
    return "\n".join(lines) + "\n\n" + table


def list_table(services: Sequence[Mapping[str, Any]]) -> str:
    """The configured services: NAME ENTRY REPLICAS RESTART GROUP DEPENDS-ON AUTOSTART."""
    if not services:
        return "no services configured"
    rows = []
    for s in services:
        command = s.get("command")
        entry = s.get("entry") or (" ".join(command) if isinstance(command, list) else command)
        rows.append([
            s.get("name"),
            entry,
            s.get("replicas"),
            s.get("restart"),
            s.get("group"),
            ",".join(s.get("depends_on") or ()) or EMPTY,
            "yes" if s.get("autostart", True) else "no",
        ])
    return render_table(["NAME", "ENTRY", "REPLICAS", "RESTART", "GROUP", "DEPENDS-ON", "AUTOSTART"], rows)


def lookup_text(reply: Mapping[str, Any]) -> str:
    """Where a service is served: replica counts, methods and endpoints."""
    lines = [f"{reply.get('service')}: {reply.get('ready', 0)}/{reply.get('replicas', 0)} replicas ready"]
    lines.append("  methods: " + (", ".join(reply.get("methods") or ()) or EMPTY))
    lines.extend(f"  {ep}" for ep in reply.get("endpoints") or ())
    return "\n".join(lines)


def ping_line(reply: Mapping[str, Any], rtt_s: float) -> str:
    """``microkerneld 0.1.0 pid 123 up 5m12s  rtt 0.21ms``."""
    return (f"microkerneld {reply.get('version', '?')} pid {reply.get('pid', '?')} "
            f"up {format_duration(reply.get('uptime_s'))}  rtt {rtt_s * 1000:.2f}ms")


# --- events ------------------------------------------------------------------------------------


def _value_text(value: Any) -> str:
    if isinstance(value, Mapping) and ("text" in value or "kind" in value):
        return format_exit(value)  # an exit reason
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str):
        return value if value and not any(c.isspace() or c in '="' for c in value) else json.dumps(value, ensure_ascii=False)
    return json.dumps(to_jsonable(value), ensure_ascii=False, separators=(",", ":"))


def _clock(ts_ns: int) -> str:
    if ts_ns <= 0:
        return "--:--:--.---"
    seconds, ns = divmod(ts_ns, 1_000_000_000)
    return time.strftime("%H:%M:%S", time.localtime(seconds)) + f".{ns // 1_000_000:03d}"


def event_line(env: wire.Envelope) -> str:
    """``12:00:01.123 service.ready echo[0] pid=123 … seq=7``: local time, topic, subject, fields."""
    data = dict(wire.body_of(env.message))
    seq = event_seq(env)
    data.pop("seq", None)
    service = data.pop("service", None)
    parts = [_clock(env.header.ts_ns), env.topic or env.msg_type]
    if service is not None:
        replica = data.pop("replica", None)
        parts.append(f"{service}[{replica}]" if replica is not None else str(service))
    parts.extend(f"{k}={_value_text(v)}" for k, v in data.items() if v is not None and v != "")
    if seq is not None:
        parts.append(f"seq={seq}")
    return " ".join(parts)


def event_record(env: wire.Envelope, binary: BinaryMode = "base64") -> dict[str, Any]:
    """An event as one JSON object: ``{seq, topic, ts_ns, sender, data}``."""
    return {
        "seq": event_seq(env),
        "topic": env.topic or env.msg_type,
        "ts_ns": env.header.ts_ns,
        "sender": env.header.sender,
        "data": to_jsonable(wire.body_of(env.message), binary),
    }
