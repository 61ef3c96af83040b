"""The resource parts of the TOML configuration: per-service budgets, ``[kernel]`` memory keys, ``[gpu]``.

Split from :mod:`microkernel.config` (which calls in here) to keep each module to one concern. The
tables passed in are the loader's validating tables: ``table.data`` is the raw mapping,
``table.error(key, message)`` and ``table.reader.error(path, message)`` build a
:class:`~microkernel.config.ConfigError` with the dotted key and its line.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from microkernel.resources.admission import parse_pool
from microkernel.resources.budgets import ServiceResources
from microkernel.resources.cpus import CpuBudgetError, parse_cpus
from microkernel.resources.gpu import (
    ENFORCE_MODES,
    FREE_TIMEOUT_POLICIES,
    GPU_KEYS,
    GpuConfigError,
    GpuSettings,
    parse_declared_devices,
)
from microkernel.resources.leases import parse_gpu_spec
from microkernel.resources.memory import BudgetError, parse_memory_budget
from microkernel.resources.pressure import parse_threshold, read_host_memory
from microkernel.units import UnitError

__all__ = [
    "DEFAULT_MEMORY_POOL",
    "DEFAULT_MEMORY_PRESSURE",
    "DEFAULT_SAMPLE_INTERVAL",
    "FORBIDDEN_ENV",
    "check_env",
    "parse_gpu_settings",
    "parse_memory_pool",
    "parse_memory_pressure",
    "parse_service_resources",
]

DEFAULT_MEMORY_POOL = "80%"
DEFAULT_MEMORY_PRESSURE = 0.95
DEFAULT_SAMPLE_INTERVAL = 0.25

FORBIDDEN_ENV = ("CUDA_VISIBLE_DEVICES", "MK_GPU_LEASE", "MK_GPU_MEMORY_FRACTION")
"""Set by the kernel from the service's lease: a service's ``env`` may not override them."""

_Path = tuple[str | int, ...]


class _Reader(Protocol):
    def error(self, path: tuple[str, ...], message: str) -> Exception: ...
    def error_at(self, path: _Path, message: str) -> Exception: ...


class _Table(Protocol):
    reader: _Reader
    path: tuple[str, ...]
    data: Mapping[str, Any]

    def error(self, key: str | None, message: str) -> Exception: ...


def parse_service_resources(table: _Table, *, sampling: bool) -> ServiceResources:
    """``memory``, ``priority``, ``cpus`` and ``gpu`` of one ``[services.X]`` table.

    ``sampling`` is whether the kernel samples memory (``memory_sample_interval > 0``): without it a
    memory budget could not be enforced, so it is refused.
    """
    data = table.data
    memory = None
    if "memory" in data:
        try:
            memory = parse_memory_budget(data["memory"])
        except BudgetError as exc:
            path = (*table.path, "memory") if exc.key is None else (*table.path, "memory", exc.key)
            raise table.reader.error(path, exc.reason) from None
        if not sampling:
            raise table.error("memory", "memory budgets need sampling: set kernel.memory_sample_interval > 0")
    priority = data.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int) or not -(2**31) <= priority < 2**31:
        raise table.error("priority", f"expected an integer (lower is killed first under memory pressure), got {priority!r}")
    cpus = None
    if "cpus" in data:
        try:
            cpus = parse_cpus(data["cpus"])
        except CpuBudgetError as exc:
            raise table.error("cpus", exc.reason) from None
    gpu = None
    if "gpu" in data:
        try:
            gpu = parse_gpu_spec(data["gpu"])
        except GpuConfigError as exc:
            raise table.reader.error_at((*table.path, *exc.path), exc.reason) from None
    return ServiceResources(memory=memory, priority=priority, cpus=cpus, gpu=gpu)


def check_env(table: _Table, env: Mapping[str, str]) -> None:
    """Refuse variables the kernel derives from the service's lease."""
    for name in FORBIDDEN_ENV:
        if name in env:
            message = (f"{name} is set by the kernel from the service's GPU lease; declare "
                       '`gpu = { count = 1 }` instead (services without one get CUDA_VISIBLE_DEVICES="")')
            raise table.reader.error((*table.path, "env", name), message)


def parse_memory_pool(table: _Table, default: str | int) -> str | int:
    """``kernel.memory_pool``: a share of host RAM (``"80%"``) or a size; validated, kept as written."""
    value = table.data.get("memory_pool", default)
    try:
        parse_pool(value, read_host_memory().total, key="memory_pool")
    except UnitError as exc:
        raise table.error("memory_pool", exc.reason) from None
    return value


def parse_memory_pressure(table: _Table, default: float) -> float:
    """``kernel.memory_pressure``: the share of host RAM in use above which the guard kills."""
    value = table.data.get("memory_pressure", default)
    try:
        return parse_threshold(value, key="memory_pressure")
    except ValueError as exc:
        raise table.error("memory_pressure", str(exc).removeprefix("memory_pressure: ")) from None


def parse_gpu_settings(table: Any) -> GpuSettings:
    """The ``[gpu]`` table and its ``[[gpu.device]]`` array; ``None`` (absent) gives the defaults."""
    defaults = GpuSettings()
    if table is None:
        return defaults
    table.check_keys(GPU_KEYS)
    data = table.data
    devices = ()
    if "device" in data:
        try:
            devices = tuple(parse_declared_devices(data["device"]))
        except GpuConfigError as exc:
            raise table.reader.error_at(exc.path, exc.reason) from None
    enforce = table.string("enforce", defaults.enforce)
    if enforce not in ENFORCE_MODES:
        raise table.error("enforce", f"expected one of {', '.join(map(repr, ENFORCE_MODES))}, got {enforce!r}")
    on_free_timeout = table.string("on_free_timeout", defaults.on_free_timeout)
    if on_free_timeout not in FREE_TIMEOUT_POLICIES:
        choices = ", ".join(map(repr, FREE_TIMEOUT_POLICIES))
        raise table.error("on_free_timeout", f"expected one of {choices}, got {on_free_timeout!r}")
    return GpuSettings(
        nvml=table.boolean("nvml", defaults.nvml),
        probe_torch=table.boolean("probe_torch", defaults.probe_torch),
        probe_python=table.optional_string("probe_python", nonempty=True),
        probe_timeout=table.duration("probe_timeout", defaults.probe_timeout, positive=True),
        enforce=enforce,  # type: ignore[arg-type]  # checked against ENFORCE_MODES above
        audit_interval=table.duration("audit_interval", defaults.audit_interval, positive=True),
        audit_slack=table.size("audit_slack", defaults.audit_slack, minimum=0),
        free_timeout=table.duration("free_timeout", defaults.free_timeout),
        on_free_timeout=on_free_timeout,  # type: ignore[arg-type]  # checked above
        devices=devices,
    )
