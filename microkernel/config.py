"""The daemon's TOML configuration: schema, validation with line context, and the resulting specs.

Everything a user can get wrong is reported as a :class:`ConfigError` that names the dotted key
and, when it can be found, the line — ``kernel.toml:12: services.echo.replicas: expected an
integer >= 0, got 'three'`` — because the person reading it is usually an operator looking at a
failed ``systemctl start``.
"""

from __future__ import annotations

import datetime
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Final

from microkernel.config_resources import (
    DEFAULT_MEMORY_POOL,
    DEFAULT_MEMORY_PRESSURE,
    DEFAULT_SAMPLE_INTERVAL,
    check_env,
    parse_gpu_settings,
    parse_memory_pool,
    parse_memory_pressure,
    parse_service_resources,
)
from microkernel.config_observability import LogSettings, MetricsSettings, parse_logs, parse_metrics
from microkernel.limits import LimitSettings, parse_limits
from microkernel.security.settings import SecuritySettings, parse_security
from microkernel.resources.gpu import GpuSettings
from microkernel.supervisor.distributed import BACKENDS, DistributedSpec
from microkernel.supervisor.policy import DependencyCycle
from microkernel.supervisor.policy import start_order as _start_order
from microkernel.supervisor.spec import BackoffSpec, GroupSpec, ReadyMode, RestartType, ServiceSpec, Strategy
from microkernel.config_reader import ConfigError
from microkernel.config_reader import Path as _Path
from microkernel.config_reader import Reader as _Reader
from microkernel.config_reader import Table as _Table
from microkernel.config_reader import choices as _choices
from microkernel.config_reader import show as _show
from microkernel.config_reader import suggest as _suggest
from microkernel.config_reader import syntax_error as _syntax_error
from protocols.endpoints import default_runtime_dir

__all__ = [
    "LOG_LEVELS",
    "SERVICE_NAME_RE",
    "ConfigError",
    "KernelConfig",
    "KernelSettings",
    "load_config",
    "parse_config",
]

LOG_LEVELS: Final[tuple[str, ...]] = ("debug", "info", "warning", "error")
LOG_FORMATS: Final[tuple[str, ...]] = ("text", "json")

SERVICE_NAME_RE: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
"""Service and group names (use ``fullmatch``): they end up in file names and event topics."""
_NAME_RULE = "use 1-63 lowercase letters, digits, '_' or '-', starting with a letter or digit"

_ENTRY_RE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
_ENTRY_POINT_RE = re.compile(r"[A-Za-z0-9_.-]+")

_TOP_KEYS = ("kernel", "services", "groups", "gpu", "logs", "metrics", "limits", "security")
_KERNEL_KEYS = (
    "runtime_dir", "heartbeat_interval", "heartbeat_liveness", "max_message_size",
    "event_history", "shutdown_timeout", "log_level", "thread_pool_size", "start_concurrency",
    "memory_pool", "memory_pressure", "memory_sample_interval", "standby",
    "log_format", "log_file",
)  # fmt: skip
_SERVICE_KEYS = (
    "entry", "command", "replicas", "restart", "depends_on", "start_timeout", "stop_timeout",
    "env", "cwd", "autostart", "intensity", "period", "backoff", "ready", "heartbeat",
    "python", "config", "memory", "priority", "cpus", "gpu", "distributed",
)  # fmt: skip
_DISTRIBUTED_KEYS = ("backend", "port", "master_addr")
_BACKOFF_KEYS = ("initial", "factor", "max", "reset_after")
_GROUP_KEYS = ("strategy", "services", "intensity", "period")


# The dataclass defaults, read rather than repeated (the entry is required but irrelevant here).
_SERVICE_DEFAULTS: Final = ServiceSpec(name="defaults", entry="defaults")


@dataclass(frozen=True, slots=True, kw_only=True)
class KernelSettings:
    """The ``[kernel]`` table: daemon-wide settings (durations in seconds, sizes in bytes)."""

    runtime_dir: str = field(default_factory=lambda: str(default_runtime_dir()))
    heartbeat_interval: float = 1.0
    heartbeat_liveness: int = 3
    max_message_size: int = 64 * 1024 * 1024
    event_history: int = 1024
    shutdown_timeout: float = 30.0
    log_level: str = "info"
    thread_pool_size: int = 4
    start_concurrency: int = field(default_factory=lambda: max(4, 2 * (os.cpu_count() or 1)))
    """How many replicas may be between spawn and readiness at once (a start storm of hundreds
    of interpreters on a few cores would otherwise push them all past their start timeouts)."""
    memory_pool: str | int = DEFAULT_MEMORY_POOL
    """Admission pool for hard memory budgets: a share of host RAM (``"80%"``) or a size."""
    memory_pressure: float = DEFAULT_MEMORY_PRESSURE
    """Fraction of host RAM in use above which the pressure guard kills a victim."""
    memory_sample_interval: float = DEFAULT_SAMPLE_INTERVAL
    """Seconds between two samples of every replica's process tree; 0 disables sampling."""
    standby: bool = True
    """Keep one service runner pre-started (interpreter up, SDK imported) for the next replica."""
    log_format: str = "text"
    """The daemon's own log lines: ``"text"`` or ``"json"`` (one object per line)."""
    log_file: str = ""
    """The daemon's own log file; empty means stderr (the journal under systemd). SIGUSR1 reopens it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class KernelConfig:
    """A validated configuration: kernel settings plus service and group specs in config order."""

    kernel: KernelSettings = field(default_factory=KernelSettings)
    services: dict[str, ServiceSpec] = field(default_factory=dict)
    groups: dict[str, GroupSpec] = field(default_factory=dict)
    gpu: GpuSettings = field(default_factory=GpuSettings)
    logs: LogSettings = field(default_factory=LogSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    security: SecuritySettings = field(default_factory=SecuritySettings)
    source: str = "<string>"

    def start_order(self) -> list[str]:
        """Service names with every service after its dependencies (ties keep config order)."""
        return _start_order(self.services)

    def stop_order(self) -> list[str]:
        """The reverse of :meth:`start_order`: dependents stop before what they depend on."""
        return self.start_order()[::-1]

    def group_of(self, service: str) -> GroupSpec | None:
        """The group ``service`` belongs to, if any."""
        group = self.services[service].group
        return None if group is None else self.groups[group]


def load_config(path: str | os.PathLike[str]) -> KernelConfig:
    """Read and validate the TOML file at ``path``; unreadable files are a :class:`ConfigError` too."""
    source = os.fspath(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror or exc}", source=source) from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError("not valid UTF-8", line=line, source=source) from exc
    return parse_config(text, source=source)


def parse_config(text: str, *, source: str = "<string>") -> KernelConfig:
    """Parse and validate TOML ``text``; ``source`` names it in error messages."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _syntax_error(exc, source, text) from exc
    reader = _Reader(text, source)
    top = _Table(reader, (), document)
    top.check_keys(_TOP_KEYS)
    kernel = _parse_kernel(top.table("kernel"))
    gpu = parse_gpu_settings(top.table("gpu"))
    logs = parse_logs(top.table("logs"))
    metrics = parse_metrics(top.table("metrics"))
    limits = parse_limits(top.table("limits"))
    security = parse_security(top.table("security"))
    services_table = top.table("services") or _Table(reader, ("services",), {})
    sampling = kernel.memory_sample_interval > 0
    services = {name: _parse_service(services_table, name, sampling=sampling) for name in services_table.data}
    groups_table = top.table("groups") or _Table(reader, ("groups",), {})
    groups = {name: _parse_group(groups_table, name, services) for name in groups_table.data}
    _check_dependencies(reader, services)
    services = _assign_groups(reader, services, groups)
    return KernelConfig(kernel=kernel, services=services, groups=groups, gpu=gpu, logs=logs, metrics=metrics,
                        limits=limits, security=security, source=source)


# --- sections --------------------------------------------------------------------------------


def _parse_kernel(table: _Table | None) -> KernelSettings:
    if table is None:
        return KernelSettings()
    table.check_keys(_KERNEL_KEYS)
    defaults = KernelSettings()
    log_level = table.string("log_level", defaults.log_level).lower()
    if log_level not in LOG_LEVELS:
        suggestion = _suggest(log_level, LOG_LEVELS)
        raise table.error("log_level", f"expected one of {_choices(LOG_LEVELS)}, got {_show(log_level)}{suggestion}")
    return KernelSettings(
        runtime_dir=table.string("runtime_dir", defaults.runtime_dir, nonempty=True),
        heartbeat_interval=table.duration("heartbeat_interval", defaults.heartbeat_interval, positive=True),
        heartbeat_liveness=table.integer("heartbeat_liveness", defaults.heartbeat_liveness, minimum=1),
        max_message_size=table.size("max_message_size", defaults.max_message_size, minimum=1),
        event_history=table.integer("event_history", defaults.event_history, minimum=0),
        shutdown_timeout=table.duration("shutdown_timeout", defaults.shutdown_timeout),
        log_level=log_level,
        thread_pool_size=table.integer("thread_pool_size", defaults.thread_pool_size, minimum=1),
        start_concurrency=table.integer("start_concurrency", defaults.start_concurrency, minimum=1),
        memory_pool=parse_memory_pool(table, defaults.memory_pool),
        memory_pressure=parse_memory_pressure(table, defaults.memory_pressure),
        memory_sample_interval=table.duration("memory_sample_interval", defaults.memory_sample_interval),
        standby=table.boolean("standby", defaults.standby),
        log_format=_parse_log_format(table, defaults.log_format),
        log_file=table.string("log_file", defaults.log_file),
    )


def _parse_log_format(table: _Table, default: str) -> str:
    value = table.string("log_format", default).lower()
    if value not in LOG_FORMATS:
        raise table.error("log_format", f"expected one of {_choices(LOG_FORMATS)}, got {_show(value)}{_suggest(value, LOG_FORMATS)}")
    return value


def _parse_service(services: _Table, name: str, *, sampling: bool = True) -> ServiceSpec:
    if not SERVICE_NAME_RE.fullmatch(name):
        raise services.error(name, f"invalid service name {name!r}: {_NAME_RULE}")
    table = services.required_table(name)
    table.check_keys(_SERVICE_KEYS)
    defaults = _SERVICE_DEFAULTS

    entry = table.optional_string("entry")
    command = table.string_list("command")
    if entry is not None and command is not None:
        raise table.error("command", "entry and command are both set; give exactly one")
    if entry is None and command is None:
        raise table.error(None, "missing entry or command; give exactly one")
    if entry is not None and not (_ENTRY_RE.fullmatch(entry) or _ENTRY_POINT_RE.fullmatch(entry)):
        raise table.error("entry", f"expected 'module:Class' or an entry-point name, got {_show(entry)}")
    if command is not None:
        if not command:
            raise table.error("command", 'expected a non-empty array of strings, e.g. ["python", "-m", "http.server"]')
        if not command[0] or any("\0" in arg for arg in command):
            raise table.error("command", "the program must be non-empty and no argument may contain a NUL character")
    python = table.optional_string("python", nonempty=True)
    if python is not None and entry is None:
        raise table.error("python", "python only applies to entry services; put the interpreter in command instead")

    env = table.string_map("env")
    check_env(table, env)
    resources = parse_service_resources(table, sampling=sampling)
    backoff_table = table.table("backoff")
    config_table = table.table("config")
    if config_table is not None:
        _check_plain_values(config_table, config_table.data, config_table.path)
    try:
        return ServiceSpec(
            name=name,
            entry=entry,
            command=command,
            replicas=table.integer("replicas", defaults.replicas, minimum=0),
            restart=table.choice("restart", RestartType, defaults.restart),
            depends_on=table.string_list("depends_on", unique=True) or (),
            start_timeout=table.duration("start_timeout", defaults.start_timeout, positive=True),
            stop_timeout=table.duration("stop_timeout", defaults.stop_timeout),
            env=env,
            cwd=table.optional_string("cwd", nonempty=True),
            autostart=table.boolean("autostart", defaults.autostart),
            intensity=table.integer("intensity", defaults.intensity, minimum=0),
            period=table.duration("period", defaults.period, positive=True),
            backoff=BackoffSpec() if backoff_table is None else _parse_backoff(backoff_table),
            ready=table.choice("ready", ReadyMode, ReadyMode.MESSAGE if entry else ReadyMode.SPAWN),
            heartbeat=table.boolean("heartbeat", entry is not None),
            config={} if config_table is None else dict(config_table.data),
            python=python,
            resources=resources,
            distributed=_parse_distributed(table),
        )
    except ValueError as exc:  # pragma: no cover - the checks above are meant to catch everything first
        raise table.error(None, str(exc)) from None


def _parse_distributed(service: _Table) -> DistributedSpec | None:
    """``distributed = true`` (defaults) or ``distributed = { backend, port, master_addr }``."""
    value = service.data.get("distributed", False)
    if value is False:
        return None
    if value is True:
        return DistributedSpec()
    table = service.required_table("distributed")
    table.check_keys(_DISTRIBUTED_KEYS)
    backend = table.string("backend", "gloo")
    if backend not in BACKENDS:
        raise table.error("backend", f"expected one of {', '.join(BACKENDS)}, got {_show(backend)}")
    port = table.integer("port", 0, minimum=0)
    if port > 65535:
        raise table.error("port", f"expected a TCP port (1..65535, or 0 to let the kernel pick), got {port}")
    return DistributedSpec(backend=backend, port=port or None,
                           master_addr=table.string("master_addr", "127.0.0.1", nonempty=True))


def _check_plain_values(table: _Table, value: object, path: _Path) -> None:
    """Reject TOML dates and times in free-form settings: they cannot travel to the service as msgpack."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_plain_values(table, item, (*path, key))
    elif isinstance(value, list):
        for item in value:
            _check_plain_values(table, item, path)
    elif isinstance(value, (datetime.date, datetime.time)):
        message = f"dates and times are not supported here; use a string, got {value.isoformat()!r}"
        raise table.reader.error(path, message)


def _parse_backoff(table: _Table) -> BackoffSpec:
    table.check_keys(_BACKOFF_KEYS)
    defaults = BackoffSpec()
    initial = table.duration("initial", defaults.initial)
    maximum = table.duration("max", defaults.max)
    if maximum < initial:
        raise table.error("max", f"must be >= backoff.initial ({initial:g}s), got {maximum:g}s")
    return BackoffSpec(
        initial=initial,
        factor=table.number("factor", defaults.factor, minimum=1.0),
        max=maximum,
        reset_after=table.duration("reset_after", defaults.reset_after),
    )


def _parse_group(groups: _Table, name: str, services: Mapping[str, ServiceSpec]) -> GroupSpec:
    if not SERVICE_NAME_RE.fullmatch(name):
        raise groups.error(name, f"invalid group name {name!r}: {_NAME_RULE}")
    table = groups.required_table(name)
    table.check_keys(_GROUP_KEYS)
    members = table.string_list("services", unique=True)
    if not members:
        raise table.error("services", "expected a non-empty array of service names")
    for member in members:
        if member not in services:
            raise table.error("services", f"unknown service {member!r}{_suggest(member, services)}")
    strategy = table.choice("strategy", Strategy, Strategy.ONE_FOR_ONE)
    if strategy is Strategy.REST_FOR_ONE:
        # rest_for_one restarts "those after me", which is only right if later members are the
        # ones that depend on earlier ones (as in OTP, where group order is start order).
        for index, member in enumerate(members):
            later = [dep for dep in services[member].depends_on if dep in members[index + 1 :]]
            if later:
                message = f"{member!r} is listed before its dependency {later[0]!r}"
                raise table.error("services", f"{message}; in a rest_for_one group dependencies must come first")
    defaults = GroupSpec(name=name)
    return GroupSpec(
        name=name,
        strategy=strategy,
        services=members,
        intensity=table.integer("intensity", defaults.intensity, minimum=0),
        period=table.duration("period", defaults.period, positive=True),
    )


def _check_dependencies(reader: _Reader, services: Mapping[str, ServiceSpec]) -> None:
    for name, spec in services.items():
        for dep in spec.depends_on:
            if dep == name:
                raise reader.error(("services", name, "depends_on"), "a service cannot depend on itself")
            if dep not in services:
                message = f"unknown service {dep!r}{_suggest(dep, services)}"
                raise reader.error(("services", name, "depends_on"), message)
    try:
        _start_order(services)
    except DependencyCycle as exc:
        raise reader.error(("services", exc.cycle[0], "depends_on"), str(exc)) from None


def _assign_groups(
    reader: _Reader, services: dict[str, ServiceSpec], groups: Mapping[str, GroupSpec]
) -> dict[str, ServiceSpec]:
    owner: dict[str, str] = {}
    for group in groups.values():
        for member in group.services:
            if member in owner:
                where = "twice in this group" if owner[member] == group.name else f"already in group {owner[member]!r}"
                raise reader.error(("groups", group.name, "services"), f"service {member!r} is {where}")
            owner[member] = group.name
    return {name: replace(spec, group=owner[name]) if name in owner else spec for name, spec in services.items()}


# --- validation plumbing -----------------------------------------------------------------------
