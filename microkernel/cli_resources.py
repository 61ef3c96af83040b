"""What ``mkctl top``, ``mkctl leases`` and the resources line of ``mkctl status`` print (pure functions)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from microkernel.cli_format import EMPTY, format_duration, render_table
from microkernel.units import format_size

__all__ = ["leases_text", "resources_line", "top_table"]


def _size(n: int | None) -> str:
    return EMPTY if n is None else format_size(int(n))


def _memory(row: Mapping[str, Any]) -> str:
    rss, budget = row.get("rss"), row.get("rss_budget")
    if rss is None:
        return EMPTY
    return f"{_size(rss)} / {_size(budget)}" if budget else _size(rss)


def _gpu(row: Mapping[str, Any]) -> str:
    devices = row.get("gpu_devices") or 0
    if not devices:
        return EMPTY
    used = row.get("gpu_memory")
    budget = row.get("gpu_budget") or 0
    # Without NVML nobody can see device memory use: show the lease only.
    leased = _size(budget) if budget else f"{devices} GPU{'s' if devices != 1 else ''}"
    return f"{'?' if used is None else _size(used)} / {leased}"


def top_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """REPLICA STATE CPU% RSS/BUDGET THREADS GPU-MEM/LEASE RESTARTS UPTIME, one row per replica."""
    if not rows:
        return "no replicas"
    table = []
    for r in rows:
        cpu = r.get("cpu_percent")
        alive = r.get("pid") is not None
        table.append([
            f"{r.get('service')}[{r.get('replica')}]",
            r.get("state"),
            r.get("pid"),
            EMPTY if cpu is None else f"{cpu:.1f}",
            _memory(r),
            r.get("threads"),
            _gpu(r),
            ",".join(str(c) for c in r.get("cpus") or ()) or EMPTY,
            r.get("restarts", 0),
            format_duration(r.get("uptime_s")) if alive else EMPTY,
        ])  # fmt: skip
    headers = ["REPLICA", "STATE", "PID", "CPU%", "RSS / BUDGET", "THREADS", "GPU MEM / LEASE", "CPUS", "RESTARTS",
               "UPTIME"]  # fmt: skip
    return render_table(headers, table)


def leases_text(view: Mapping[str, Any]) -> str:
    """The inventory (devices with their use), the leases and the waiting requests."""
    devices = view.get("devices") or []
    lines = [f"GPU inventory: {len(devices)} device{'s' if len(devices) != 1 else ''} ({view.get('source', '?')})"]
    if view.get("source") != "nvml":
        skipped = view.get("skipped") or {}
        lines.extend(f"  {source}: {why}" for source, why in skipped.items())
    if devices:
        rows = [[d.get("uuid"), d.get("name"), _size(d.get("memory_total")),
                 "exclusive" if d.get("exclusive") else _size(d.get("used")), _size(d.get("free")),
                 ",".join(d.get("leases") or ()) or EMPTY] for d in devices]  # fmt: skip
        lines += ["", render_table(["DEVICE", "NAME", "MEMORY", "LEASED", "FREE", "LEASES"], rows)]
    leases = view.get("leases") or []
    if leases:
        rows = [[lease.get("id"), lease.get("holder"), lease.get("pid"), ",".join(lease.get("devices") or ()),
                 _size(lease.get("memory")) if lease.get("memory") else "whole", lease.get("mode"),
                 lease.get("priority")] for lease in leases]  # fmt: skip
        lines += ["", render_table(["LEASE", "HOLDER", "PID", "DEVICES", "MEMORY/DEVICE", "MODE", "PRIORITY"], rows)]
    else:
        lines += ["", "no leases"]
    waiters = view.get("waiters") or []
    if waiters:
        rows = [[w.get("position"), w.get("holder"), w.get("pid"), w.get("count"),
                 _size(w.get("memory")) if w.get("memory") else "whole", w.get("mode"), w.get("priority"),
                 EMPTY if w.get("timeout") is None else format_duration(w.get("timeout"))] for w in waiters]  # fmt: skip
        lines += ["", render_table(["WAITING", "HOLDER", "PID", "COUNT", "MEMORY/DEVICE", "MODE", "PRIORITY", "TIMEOUT"],
                                   rows)]  # fmt: skip
    return "\n".join(lines)


def resources_line(kernel: Mapping[str, Any]) -> str:
    """One line under the kernel line of ``mkctl status``: memory pool, sampling, cgroups, GPUs, pool."""
    res = kernel.get("resources") or {}
    memory = res.get("memory") or {}
    pool = memory.get("pool") or {}
    cgroups = res.get("cgroups") or {}
    gpu = res.get("gpu") or {}
    sampling = (f"sampling every {format_duration(memory.get('sample_interval_s'))}" if memory.get("sampling")
                else "sampling off")  # fmt: skip
    groups = "cgroups: on" if cgroups.get("available") else f"cgroups: off ({cgroups.get('reason') or 'unknown'})"
    parts = [
        f"memory pool {_size(pool.get('used'))} of {_size(pool.get('capacity'))}",
        sampling,
        groups,
        f"GPUs {gpu.get('devices', 0)} ({gpu.get('source', 'none')}), {gpu.get('leases', 0)} leased",
        f"thread pool {kernel.get('thread_pool_size', '?')}",
    ]
    return "resources: " + "  ".join(parts)
