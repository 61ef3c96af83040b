"""Configuration reload: re-read the file the daemon was started with and apply only the difference.

``SIGHUP`` and ``mkctl reload`` (``reload_request``) end up in :meth:`Reloader.reload`:

1. the file is read and validated again (with the daemon's command-line overrides); an invalid
   file — TOML error, a bad value, a dependency cycle, a remaining service that depends on a
   removed one — is rejected with its :class:`~microkernel.config.ConfigError` text and nothing
   changes;
2. :func:`diff_configs` compares it with the running configuration: services added, removed,
   changed (any field but ``replicas``; every member of a group whose definition changed),
   scaled (only ``replicas`` changed), unchanged;
3. the supervisor applies it: new services are registered, removed and changed ones are handled
   dependents first (removed: stopped and forgotten; changed: restarted with the new spec if they
   were running), new ones are started (their memory budget admitted like at kernel start), scaled
   ones scaled. Unchanged services are not touched (same processes).

``[kernel]`` settings that can change live (log level, format, file; the shutdown timeout) are
applied; the others, and the other top-level tables, need a restart of the daemon and are reported
as warnings rather than silently ignored. Reloads are serialised.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from protocols import messages as m
from protocols.errors import ErrorCode, MicrokernelError
from microkernel.config import ConfigError, KernelConfig, load_config, parse_config
from microkernel.logsetup import LogSettings, daemon_logging

if TYPE_CHECKING:
    from microkernel.runtime import Kernel

log = logging.getLogger("microkernel.reload")

LIVE_KERNEL_SETTINGS = frozenset({"log_level", "log_format", "log_file", "shutdown_timeout"})
"""``[kernel]`` keys a reload applies to the running daemon; every other one needs a restart."""

_NOT_COMPARED = frozenset({"kernel", "services", "groups", "source"})


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigSource:
    """Where the daemon's configuration comes from: a file (or none) plus command-line overrides."""

    path: str | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    """``[kernel]`` settings given on the command line; they win over the file at every (re)load."""

    def load(self) -> KernelConfig:
        """Read and validate the configuration (blocking: file I/O); raises ConfigError."""
        config = load_config(self.path) if self.path else parse_config("", source="<defaults>")
        if self.overrides:
            config = dataclasses.replace(config, kernel=dataclasses.replace(config.kernel, **self.overrides))
        return config


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigDiff:
    """What differs between the running configuration and a new one."""

    added: tuple[str, ...] = ()
    """New services, in the new start order."""
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    """Services whose spec changed in anything but ``replicas``, or whose group's definition changed."""
    scaled: tuple[str, ...] = ()
    """Services whose only change is ``replicas``."""
    unchanged: tuple[str, ...] = ()
    live_settings: tuple[str, ...] = ()
    """``[kernel]`` keys that changed and are applied live."""
    restart_needed: tuple[str, ...] = ()
    """Dotted keys (``kernel.heartbeat_interval``) or tables (``gpu``) that changed but need a daemon restart."""

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.scaled or self.live_settings
                    or self.restart_needed)


def diff_configs(old: KernelConfig, new: KernelConfig) -> ConfigDiff:
    """Compare two validated configurations (pure)."""
    regrouped: set[str] = set()
    for name in set(old.groups) | set(new.groups):
        before, after = old.groups.get(name), new.groups.get(name)
        if before != after:
            for spec in (before, after):
                if spec is not None:
                    regrouped.update(spec.services)
    added = tuple(n for n in new.start_order() if n not in old.services)
    removed = tuple(n for n in old.services if n not in new.services)
    changed, scaled, unchanged = [], [], []
    for name, spec in new.services.items():
        previous = old.services.get(name)
        if previous is None:
            continue
        if name in regrouped or previous.differs_from(spec):
            changed.append(name)
        elif previous.replicas != spec.replicas:
            scaled.append(name)
        else:
            unchanged.append(name)
    live, restart = [], []
    for f in dataclasses.fields(old.kernel):
        if getattr(old.kernel, f.name) != getattr(new.kernel, f.name):
            (live if f.name in LIVE_KERNEL_SETTINGS else restart).append(f.name)
    restart = [f"kernel.{key}" for key in restart]
    for f in dataclasses.fields(old):
        if f.name not in _NOT_COMPARED and getattr(old, f.name, None) != getattr(new, f.name, None):
            restart.append(f.name)
    return ConfigDiff(added=added, removed=removed, changed=tuple(changed), scaled=tuple(scaled),
                      unchanged=tuple(unchanged), live_settings=tuple(live), restart_needed=tuple(restart))


def effective_config(old: KernelConfig, new: KernelConfig, services: Mapping[str, Any]) -> KernelConfig:
    """The configuration the daemon runs after a reload: the new services and groups (with the
    specs actually running, in ``services``), the live ``[kernel]`` settings from ``new`` and
    everything that needs a restart still from ``old`` — so the next reload reports it again."""
    kernel = dataclasses.replace(old.kernel, **{k: getattr(new.kernel, k) for k in LIVE_KERNEL_SETTINGS})
    kept = {f.name: getattr(old, f.name) for f in dataclasses.fields(old) if f.name not in _NOT_COMPARED}
    specs = {name: services[name] for name in new.services if name in services}
    return dataclasses.replace(new, kernel=kernel, services=specs, **kept)


def running_view(old: KernelConfig, new: KernelConfig, running: Mapping[str, Any]) -> KernelConfig:
    """``old`` as the supervisor actually runs it, to compare the new file with.

    Services added at run time (``add_service_request``) and absent from the new file are left out
    (a reload leaves them alone); one that is in the new file is compared with its running spec.
    A configured service removed at run time is left out too: if the file still has it, it is new.
    """
    specs = {name: spec for name, spec in running.items() if name in old.services or name in new.services}
    return dataclasses.replace(old, services=specs)


def check_run_time_services(running: Mapping[str, Any], old: KernelConfig, new: KernelConfig) -> None:
    """Refuse a new file that removes a service a run-time addition (kept by the reload) depends on."""
    kept = {name for name in running if name not in old.services and name not in new.services}
    for name in kept:
        for dep in running[name].depends_on:
            if dep not in new.services and dep not in kept:
                raise MicrokernelError(ErrorCode.INVALID_CONFIG,
                                       f"{new.source}: service {dep!r} cannot be removed: {name!r} (added at run time) "
                                       "depends on it (nothing was changed; the running configuration stays)")


def log_settings(config: KernelConfig) -> LogSettings:
    """The daemon's logging as configured."""
    k = config.kernel
    return LogSettings(level=k.log_level, format=k.log_format, file=k.log_file)


class Reloader:
    """Applies configuration reloads to a running kernel, one at a time."""

    def __init__(self, kernel: Kernel, source: ConfigSource) -> None:
        self.kernel = kernel
        self.source = source
        self._lock = asyncio.Lock()
        self.reloads = 0

    async def reload(self, cause: str) -> m.ReloadReply:
        """Re-read the configuration and apply the difference; the reply says what was done.

        Raises ``MicrokernelError``: ``invalid_config`` (nothing changed), ``bad_state`` (the daemon
        was started without a configuration file), ``shutting_down``.
        """
        if self.source.path is None:
            raise MicrokernelError(ErrorCode.BAD_STATE, "microkerneld was started without --config: "
                                   "there is no configuration file to re-read")
        kernel = self.kernel
        async with self._lock:  # one reload at a time; the next one sees this one's result
            if kernel.supervisor.shutting_down:
                raise MicrokernelError(ErrorCode.SHUTTING_DOWN, "the kernel is shutting down")
            log.info("reloading %s (%s)", self.source.path, cause)
            kernel.notifier.reloading()
            try:
                loop = asyncio.get_running_loop()
                try:
                    new = await loop.run_in_executor(None, self.source.load)
                except ConfigError as exc:
                    log.error("reload rejected, the running configuration stays: %s", exc)
                    raise MicrokernelError(ErrorCode.INVALID_CONFIG,
                                           f"{exc} (nothing was changed; the running configuration stays)") from None
                try:
                    reply = await self._apply(kernel.config, new)
                except MicrokernelError as exc:
                    if exc.code is ErrorCode.INVALID_CONFIG:
                        log.error("reload rejected, the running configuration stays: %s", exc.reason)
                    raise
            finally:
                kernel.notifier.ready(kernel.status_line())
        self.reloads += 1
        return reply

    async def _apply(self, old: KernelConfig, new: KernelConfig) -> m.ReloadReply:
        kernel = self.kernel
        sup = kernel.supervisor
        running = {name: rec.spec for name, rec in sup.services.items()}
        check_run_time_services(running, old, new)
        old = running_view(old, new, running)
        diff = diff_configs(old, new)
        warnings = [f"{key} changed but needs a restart of microkerneld to apply; keeping the running value"
                    for key in diff.restart_needed]
        for text in warnings:
            log.warning("reload: %s", text)
        started: list[str] = []
        stopped: list[str] = []
        restarted: list[str] = []
        updated: list[str] = []
        scaled: list[str] = []
        switched_on: list[str] = []
        # New services are registered first: a changed service may now depend on one of them.
        for name in diff.added:
            sup.register_service(new.services[name])
        sup.set_groups(new.groups)
        # Dependents before what they depend on, as in a shutdown (the supervisor keeps its
        # services in a start order, run-time additions last).
        removed, changed = set(diff.removed), set(diff.changed)
        for name in reversed(list(running)):
            self._check_not_stopping()
            if name in removed:
                await sup.remove_service(name)
                stopped.append(name)
            elif name in changed:
                try:
                    if await sup.replace_service(new.services[name]):
                        restarted.append(name)
                    elif new.services[name].autostart and not old.services[name].autostart:
                        switched_on.append(name)  # autostart turned on: start it like a new service
                    else:
                        updated.append(name)
                except MicrokernelError as exc:
                    warnings.append(f"{name}: kept running with its previous spec: {exc.reason}")
                    log.warning("reload: %s", warnings[-1])
        for name in (*diff.added, *switched_on):
            self._check_not_stopping()
            if not new.services[name].autostart:
                updated.append(name)
                continue
            try:
                await sup.launch_service(name)
                started.append(name)
            except MicrokernelError as exc:
                updated.append(name)
                warnings.append(f"{name}: not started: {exc.reason}")
                log.error("reload: %s", warnings[-1])
        for name in diff.scaled:
            self._check_not_stopping()
            spec = new.services[name]
            sup.set_spec(spec)
            try:
                await sup.scale(name, spec.replicas)
                scaled.append(name)
            except MicrokernelError as exc:
                warnings.append(f"{name}: not scaled to {spec.replicas}: {exc.reason}")
                log.warning("reload: %s", warnings[-1])
        sup.reorder(new.start_order())
        running = {name: rec.spec for name, rec in sup.services.items()}
        kernel.apply_config(effective_config(old, new, running))
        if diff.live_settings:
            try:
                daemon_logging.apply(log_settings(kernel.config))
                log.info("reload: applied %s", ", ".join(f"kernel.{k}" for k in diff.live_settings))
            except OSError as exc:
                warnings.append(f"kernel.log_file: cannot open {kernel.config.kernel.log_file!r}: {exc.strerror or exc}; "
                                "logging stays where it was")
                log.error("reload: %s", warnings[-1])
        log.info("reload done: started %s, stopped %s, restarted %s, scaled %s, %d unchanged",
                 started or "none", stopped or "none", restarted or "none", scaled or "none", len(diff.unchanged))
        kernel.bus.emit(m.KernelReloaded, source=self.source.path or "", started=started, stopped=stopped,
                        restarted=restarted, scaled=scaled)
        return m.ReloadReply(source=self.source.path or "", started=started, stopped=stopped, restarted=restarted,
                             scaled=scaled, updated=updated, unchanged=len(diff.unchanged), warnings=warnings)

    def _check_not_stopping(self) -> None:
        if self.kernel.supervisor.shutting_down:
            raise MicrokernelError(ErrorCode.SHUTTING_DOWN, "the kernel began shutting down during the reload")
