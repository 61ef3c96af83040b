"""Changing which services the supervisor runs while it runs: add, remove, replace, regroup.

A configuration reload (``microkernel.reload``) is expressed in these steps. Each takes the
service's own lock, like every other command on a service, so a reload never blocks commands on
services it does not touch. ``ServiceMembership`` is the part of
:class:`~microkernel.supervisor.supervisor.Supervisor` that does this.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from protocols import messages as m
from protocols.errors import ErrorCode, MicrokernelError
from microkernel.bus.events import EventBus
from microkernel.logs import ServiceLogs
from microkernel.resources.manager import ResourceManager
from microkernel.supervisor.driver import GroupState
from microkernel.supervisor.intensity import RestartWindow
from microkernel.supervisor.records import ReplicaRecord, ServiceRecord, status_changes
from microkernel.supervisor.spec import GroupSpec, ServiceSpec

log = logging.getLogger("microkernel.supervisor")


class ServiceMembership:
    """Adds, removes and replaces services at run time; the state it works on is the Supervisor's."""

    services: dict[str, ServiceRecord]
    groups: dict[str, GroupState]
    resources: ResourceManager
    bus: EventBus
    shutting_down: bool
    logs: ServiceLogs | None

    if TYPE_CHECKING:  # provided by the Supervisor and its ReplicaDriver
        def _add_service(self, spec: ServiceSpec) -> ServiceRecord: ...
        def _new_replica(self, spec: ServiceSpec, index: int) -> ReplicaRecord: ...
        def _launch(self, rec: ServiceRecord, rep: ReplicaRecord) -> None: ...
        def service(self, name: str) -> ServiceRecord: ...
        async def _stop_service_locked(self, rec: ServiceRecord) -> None: ...

    def _refuse_when_stopping(self) -> None:
        if self.shutting_down:
            raise MicrokernelError(ErrorCode.SHUTTING_DOWN, "the kernel is shutting down")

    @staticmethod
    def is_active(rec: ServiceRecord) -> bool:
        """Whether the service should be running: a replica is being driven, or it failed (an
        autostart service that gave up is expected to run once its spec is fixed)."""
        driving = any(r.task is not None and not r.task.done() for r in rec.replicas)
        return driving or (rec.failed and rec.spec.autostart)

    def register_service(self, spec: ServiceSpec) -> ServiceRecord:
        """Add a service that was not configured before, without starting it."""
        self._refuse_when_stopping()
        if spec.name in self.services:
            raise MicrokernelError(ErrorCode.BAD_STATE, f"service {spec.name!r} already exists")
        return self._add_service(spec)

    async def launch_service(self, name: str) -> None:
        """Start a registered service like at kernel start: admit its memory budget, then its replicas.

        Raises ``MicrokernelError(BAD_STATE)`` when its budget does not fit (nothing is started).
        """
        self._refuse_when_stopping()
        rec = self.service(name)
        async with rec.lock:
            try:
                self.resources.admit(name, rec.spec.resources, range(rec.desired))
            except MicrokernelError as exc:
                for rep in rec.replicas:
                    rep.detail = f"not started: {exc.reason}"
                raise
            for rep in rec.replicas[: rec.desired]:
                self._launch(rec, rep)

    async def remove_service(self, name: str) -> None:
        """Stop every replica of ``name`` (SIGTERM, SIGKILL after its grace), release its memory
        reservations and forget it. Its leases are released as its processes exit.

        Refused (``BAD_STATE``) while another service depends on it: remove or change that one first.
        """
        rec = self.service(name)
        dependents = [n for n, other in self.services.items() if name in other.spec.depends_on]
        if dependents:
            raise MicrokernelError(ErrorCode.BAD_STATE,
                                   f"service {name!r} cannot be removed: {', '.join(map(repr, dependents))} depend(s) on it")
        async with rec.lock:
            await self._stop_service_locked(rec)
            self.resources.release_slots(name, range(len(rec.replicas)))
            rec.refresh()
        if self.services.get(name) is rec and not self.shutting_down:
            del self.services[name]
            status_changes.value += 1
            if self.logs is not None:
                self.logs.forget(name)  # its processes are gone: nothing writes to its file any more
        self.bus.emit(m.ServiceStopped, service=name)

    async def replace_service(self, spec: ServiceSpec) -> bool:
        """Run ``spec`` instead of the service's current spec; True when it was (re)started.

        A running service is restarted with the new spec: its memory budget is admitted first, so
        a new budget that does not fit raises ``MicrokernelError(BAD_STATE)`` and leaves the
        running replicas alone. A stopped one only gets the new spec, for its next start. The
        replica count follows the new spec when it changed there, else stays as scaled at run time.
        """
        rec = self.service(spec.name)
        async with rec.lock:
            active = self.is_active(rec) and not self.shutting_down
            old = rec.spec
            desired = spec.replicas if spec.replicas != old.replicas else rec.desired
            if active:
                self.resources.admit(spec.name, spec.resources, range(desired))
            await self._stop_service_locked(rec)
            self.resources.release_slots(spec.name, range(desired if active else 0, len(rec.replicas)))
            rec.spec = spec
            rec.window = RestartWindow(spec.intensity, spec.period)
            rec.desired = desired
            rec.replicas = [self._new_replica(spec, i) for i in range(desired)]
            rec.failed = False
            rec.rendezvous_port = None
            rec.refresh()
            if active and not self.shutting_down:
                for rep in rec.replicas:
                    self._launch(rec, rep)
        log.info("%s: new spec applied (%s)", spec.name, "restarted" if active else "not running, not started")
        return active

    def set_spec(self, spec: ServiceSpec) -> None:
        """Record a spec that differs only in ``replicas`` (the count itself is applied by scaling)."""
        self.service(spec.name).spec = spec

    def set_groups(self, groups: Mapping[str, GroupSpec]) -> None:
        """Install the new groups; a group whose spec did not change keeps its restart window."""
        kept = {name: state for name, state in self.groups.items() if name in groups and state.spec == groups[name]}
        self.groups = {name: kept.get(name) or GroupState(spec) for name, spec in groups.items()}

    def reorder(self, order: Iterable[str]) -> None:
        """Put the records in ``order`` (the new start order); names not listed keep their place at the end."""
        names = [n for n in order if n in self.services]
        rest = [n for n in self.services if n not in set(names)]
        self.services = {n: self.services[n] for n in (*names, *rest)}
        status_changes.value += 1

    def active_services(self) -> list[str]:
        """Names of the services that should be running (see :meth:`is_active`)."""
        return [name for name, rec in self.services.items() if self.is_active(rec)]


__all__ = ["ServiceMembership"]
