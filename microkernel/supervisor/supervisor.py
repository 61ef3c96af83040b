"""The supervisor: runs every replica, notices its exit, and applies the restart policy.

Each replica slot is driven by one task (see ``driver.py``) that spawns the process, waits for
readiness (a message, never a timer; the start timeout is only a ceiling, extendable by
progress messages), then *awaits the child's exit* — there is no polling loop — and decides
what happens next: restart (after an exponential backoff), give up (``failed``, when the restart
intensity is exceeded), or stay down (``temporary``/``transient`` policies, or a requested stop).
This module holds the records, the service messages, the commands and the views.

Commands on one service serialise on that service's lock; commands on different services run
concurrently. There is no global lock.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from protocols import messages as m
from protocols.board import HeartbeatBoard
from protocols.endpoints import KernelEndpoints
from protocols.errors import ErrorCode, MicrokernelError
from microkernel.bus.events import EventBus
from microkernel.bus.heartbeat import Liveness
from microkernel.config import KernelConfig
from microkernel.resources.manager import ResourceManager, holder_of
from microkernel.resources.monitor import Target
from microkernel.sentinel import MARKER_VAR, Sentinel
from microkernel.supervisor.backoff import Backoff
from microkernel.supervisor.driver import GroupState, ReplicaDriver
from microkernel.supervisor.membership import ServiceMembership
from microkernel.supervisor.intensity import RestartWindow
from microkernel.supervisor.launch import standby_environment
from microkernel.supervisor.process import kill_tree
from microkernel.supervisor.records import ReplicaRecord, ServiceRecord
from microkernel.supervisor.spec import ServiceSpec
from microkernel.supervisor.standby import Standby
from microkernel.supervisor.states import ReplicaState

log = logging.getLogger("microkernel.supervisor")
S = ReplicaState

MAX_PROGRESS_EXTENSION_S = 3600.0


class Supervisor(ReplicaDriver, ServiceMembership):
    """Owns every ServiceRecord and the tasks that drive their replicas (services may come and go: reload)."""

    def __init__(
        self,
        config: KernelConfig,
        *,
        bus: EventBus,
        sentinel: Sentinel,
        endpoints: KernelEndpoints,
        runtime_dir: Path,
        resources: ResourceManager,
        board: HeartbeatBoard | None = None,
    ) -> None:
        self.config = config
        self.resources = resources
        self.settings = config.kernel
        self.bus = bus
        self.sentinel = sentinel
        self.endpoints = endpoints
        self.runtime_dir = runtime_dir
        self.services: dict[str, ServiceRecord] = {}
        self.groups = {name: GroupState(g) for name, g in config.groups.items()}
        self.liveness: Liveness[tuple[str, int, int]] = Liveness(
            self.settings.heartbeat_interval, self.settings.heartbeat_liveness
        )
        self.live: dict[tuple[str, int, int], ReplicaRecord] = {}
        self.board = board
        self._free_slots = list(range(board.slots - 1, -1, -1)) if board is not None else []
        self.shutting_down = False
        self._start_slots = asyncio.Semaphore(self.settings.start_concurrency)
        self._tasks: set[asyncio.Task[Any]] = set()
        self.standby: Standby | None = None
        if self.settings.standby:
            self.standby = Standby(sys.executable, pinned_keys=(MARKER_VAR,))
            self.standby.on_spawned = sentinel.track  # type: ignore[method-assign]
            self.standby.on_ready = self._standby_ready  # type: ignore[method-assign]
            self.standby.on_gone = sentinel.untrack  # type: ignore[method-assign]
        for name in config.start_order():
            self._add_service(config.services[name])

    # --- bookkeeping ---------------------------------------------------------------------------

    def _add_service(self, spec: ServiceSpec) -> ServiceRecord:
        rec = ServiceRecord(spec=spec, window=RestartWindow(spec.intensity, spec.period), desired=spec.replicas)
        for i in range(spec.replicas):
            rec.replicas.append(self._new_replica(spec, i))
        self.services[spec.name] = rec
        return rec

    @staticmethod
    def _new_replica(spec: ServiceSpec, index: int) -> ReplicaRecord:
        return ReplicaRecord(service=spec.name, index=index, backoff=Backoff(spec.backoff))

    def service(self, name: str) -> ServiceRecord:
        """The record of ``name``; UNKNOWN_SERVICE with the configured names otherwise."""
        rec = self.services.get(name)
        if rec is None:
            known = ", ".join(sorted(self.services)) or "none"
            raise MicrokernelError(ErrorCode.UNKNOWN_SERVICE, f"no service named {name!r} (configured: {known})")
        return rec

    def _spawn_task(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("supervisor task %s failed", task.get_name(), exc_info=task.exception())

    def _set(self, rec: ServiceRecord, rep: ReplicaRecord, state: ReplicaState, detail: str = "") -> None:
        rep.set_state(state, detail)
        rec.refresh()

    def replica_for(self, service: str, replica: int, incarnation: int) -> ReplicaRecord:
        """The live replica a service message claims to come from; BAD_STATE if it is stale."""
        rep = self.live.get((service, replica, incarnation))
        if rep is None:
            raise MicrokernelError(
                ErrorCode.BAD_STATE, f"{service}[{replica}] incarnation {incarnation} is not a live replica"
            )
        return rep

    # --- service messages ----------------------------------------------------------------------

    def on_heartbeat(self, service: str, replica: int, incarnation: int) -> None:
        key = (service, replica, incarnation)
        if key in self.live:
            self.liveness.beat(key, time.monotonic())

    def on_ready(self, msg: m.ReadyRequest) -> str:
        rep = self.replica_for(msg.service, msg.replica, msg.incarnation)
        rec = self.services[msg.service]
        if rep.state is not S.STARTING:
            raise MicrokernelError(ErrorCode.BAD_STATE, f"{rep.name} announced readiness while {rep.state.value}")
        if rec.spec.heartbeat and rep.key not in self.liveness:
            self.liveness.beat(rep.key, time.monotonic())  # ready implies alive: start the clock
        rep.endpoint = msg.endpoint
        rep.methods = sorted(msg.methods)
        rep.ready_at_ns = time.time_ns()
        self._set(rec, rep, S.READY)
        rep.ready_event.set()
        startup_ms = (rep.ready_at_ns - (rep.started_at_ns or rep.ready_at_ns)) / 1e6
        rep.pid = rep.pid or msg.pid
        log.info("%s ready in %.0f ms (pid %s)", rep.name, startup_ms, rep.pid)
        self.bus.emit(m.ServiceReady, service=rec.name, replica=rep.index, incarnation=rep.incarnation,
                      pid=rep.pid or 0, endpoint=msg.endpoint, startup_ms=startup_ms)
        return rep.state.value

    def on_progress(self, msg: m.ProgressRequest) -> float:
        rep = self.replica_for(msg.service, msg.replica, msg.incarnation)
        now = time.monotonic()
        if msg.extend_s > 0 and rep.state is S.STARTING:
            extension = min(msg.extend_s, MAX_PROGRESS_EXTENSION_S)
            rep.start_deadline = max(rep.start_deadline, now + extension)
        self.bus.emit(m.ServiceProgress, service=rep.service, replica=rep.index, incarnation=rep.incarnation,
                      message=msg.message)
        return max(0.0, rep.start_deadline - now)

    # --- stopping ------------------------------------------------------------------------------

    async def _stop_replica(self, rec: ServiceRecord, rep: ReplicaRecord) -> None:
        rep.stop_requested = True
        rep.wakeup.set()
        proc = rep.proc
        if proc is not None and proc.returncode is None:
            rep.kill_reason = rep.kill_reason or "stopped"
            if rep.state in (S.STARTING, S.RUNNING, S.READY):
                self._set(rec, rep, S.STOPPING)
            self.bus.emit(m.ServiceStopping, service=rec.name, replica=rep.index, incarnation=rep.incarnation,
                          pid=proc.pid, grace_s=rec.spec.stop_timeout)
            await kill_tree(proc, grace=rec.spec.stop_timeout)
        if rep.task is not None:
            await asyncio.wait({rep.task})
        if rep.state in (S.EXITED, S.BACKOFF, S.WAITING, S.STOPPING):
            self._set(rec, rep, S.STOPPED)

    async def _stop_service_locked(self, rec: ServiceRecord) -> None:
        await asyncio.gather(*(self._stop_replica(rec, r) for r in rec.replicas))

    # --- commands ------------------------------------------------------------------------------

    def _standby_ready(self, pid: int) -> None:
        self.bus.emit(m.StandbyReady, pid=pid)

    def _prepare_standby(self) -> None:
        if self.standby is not None and not self.shutting_down:
            self.standby.prepare(standby_environment(self.sentinel.marker_env))

    async def start_all(self) -> None:
        """Start every autostart service; dependencies gate each replica, not this call.

        A service whose hard memory budget does not fit the pool is not started at all (its
        replicas say why); the others start.
        """
        self._prepare_standby()
        for name, rec in self.services.items():
            if rec.spec.autostart:
                try:
                    self.resources.admit(name, rec.spec.resources, range(rec.desired))
                except MicrokernelError as exc:
                    log.error("not starting %s: %s", name, exc.reason)
                    for rep in rec.replicas:
                        rep.detail = f"not started: {exc.reason}"
                    continue
                for rep in rec.replicas[: rec.desired]:
                    self._launch(rec, rep)

    async def start(self, name: str, *, wait_until: float | None = None) -> str:
        rec = self.service(name)
        if self.shutting_down:
            raise MicrokernelError(ErrorCode.SHUTTING_DOWN, "the kernel is shutting down")
        async with rec.lock:
            self.resources.admit(name, rec.spec.resources, range(rec.desired))
            if rec.failed:
                rec.failed = False
                rec.window.reset()
                for r in rec.replicas:
                    r.backoff.reset()
                    if r.state is S.FAILED:
                        self._set(rec, r, S.STOPPED)
            for rep in rec.replicas[: rec.desired]:
                self._launch(rec, rep)
        if wait_until is not None:
            await self.wait_up(rec, wait_until)
        return rec.aggregate_state()

    async def stop(self, name: str) -> str:
        rec = self.service(name)
        async with rec.lock:
            await self._stop_service_locked(rec)
            self.resources.release_slots(name, range(len(rec.replicas)))
            rec.refresh()
        self.bus.emit(m.ServiceStopped, service=name)
        return rec.aggregate_state()

    async def restart(self, name: str, *, wait_until: float | None = None, cause: str = "requested") -> str:
        rec = self.service(name)
        log.info("restarting %s (%s)", name, cause)
        async with rec.lock:
            self.resources.admit(name, rec.spec.resources, range(rec.desired))
            await self._stop_service_locked(rec)
            if self.shutting_down:
                return rec.aggregate_state()
            rec.failed = False
            for rep in rec.replicas[: rec.desired]:
                if rep.state is S.FAILED:
                    self._set(rec, rep, S.STOPPED)
                self._launch(rec, rep)
        if wait_until is not None:
            await self.wait_up(rec, wait_until)
        return rec.aggregate_state()

    async def scale(self, name: str, replicas: int, *, wait_until: float | None = None) -> int:
        if replicas < 0:
            raise MicrokernelError(ErrorCode.INVALID_FIELD, f"replicas must be >= 0, got {replicas}")
        rec = self.service(name)
        async with rec.lock:
            previous = rec.desired
            running = any(r.task is not None and not r.task.done() for r in rec.replicas) or (
                rec.spec.autostart and not rec.failed and previous == 0
            )
            if running and not self.shutting_down:
                self.resources.admit(name, rec.spec.resources, range(replicas))
            rec.desired = replicas
            while len(rec.replicas) < replicas:
                rec.replicas.append(self._new_replica(rec.spec, len(rec.replicas)))
            # A distributed service's world size is its replica count: every rank restarts with the new one.
            surplus = rec.replicas if rec.spec.distributed is not None and replicas != previous else rec.replicas[replicas:]
            await asyncio.gather(*(self._stop_replica(rec, r) for r in surplus))
            surplus = rec.replicas[replicas:]
            self.resources.release_slots(name, (r.index for r in surplus))
            del rec.replicas[replicas:]
            if running and not self.shutting_down:
                for rep in rec.replicas:
                    self._launch(rec, rep)
            rec.refresh()
        self.bus.emit(m.ServiceScaled, service=name, replicas=replicas, previous=previous)
        if wait_until is not None and replicas > previous:
            await self.wait_up(rec, wait_until)
        return previous

    async def wait_up(self, rec: ServiceRecord, until: float) -> None:
        """Wait (until the monotonic time ``until``) for all desired replicas to be up or the service to fail."""
        while True:
            if rec.failed or rec.up_count() >= rec.desired:
                return
            left = until - time.monotonic()
            if left <= 0:
                return
            changed = rec.changed
            try:
                async with asyncio.timeout(left):
                    await changed.wait()
            except TimeoutError:
                return

    def kill_replica(self, rep: ReplicaRecord, reason: str, detail: str = "") -> bool:
        """Kill a live replica's whole tree at once; its driver then applies the restart policy.

        False when there is nothing to kill (no process, already exited, stopping, or already
        being killed by the kernel).
        """
        proc = rep.proc
        if proc is None or proc.returncode is not None or rep.state is S.STOPPING or rep.kill_reason is not None:
            return False
        rep.kill_reason = reason
        rep.kill_detail = detail
        self._spawn_task(kill_tree(proc, grace=0), name=f"kill:{rep.name}")
        return True

    # --- what the resource monitor needs -------------------------------------------------------

    def sample_targets(self) -> list[Target]:
        """Every replica with a live process, for the resource monitor."""
        targets = []
        for key, rep in self.live.items():
            proc = rep.proc
            if proc is None or proc.returncode is not None or rep.pid is None:
                continue
            spec = self.services[rep.service].spec
            targets.append(Target(key=key, pid=rep.pid, resources=spec.resources,
                                  started_at_ns=rep.started_at_ns or 0))
        return targets

    def kill_for_resources(self, key: tuple[str, int, int], detail: str) -> bool:
        """Kill one replica over a budget, host pressure or a lease violation (exit reason ``budget``)."""
        rep = self.live.get(key)
        return rep is not None and self.kill_replica(rep, "budget", detail)

    async def watch_heartbeats(self) -> None:
        """Kill replicas that missed ``heartbeat_liveness`` consecutive heartbeats."""
        interval = self.settings.heartbeat_interval
        due = time.monotonic() + interval / 2
        while True:
            # A timer is right here: liveness is by definition the absence of messages.
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            now = time.monotonic()
            if now - due > interval:  # a hang is then noticed that much later: say so
                log.warning("the heartbeat check ran %.1f s late (the kernel's event loop was held up)", now - due)
            due = now + interval / 2
            self._read_board()
            now = time.monotonic()
            for key in self.liveness.expired(now):
                rep = self.live.get(key)
                if rep is not None:
                    seen = self.liveness.last_seen(key)
                    silence = f"silent for {now - seen:.1f} s" if seen is not None else "silent"
                    log.warning("%s missed %d heartbeats (%s); killing it", rep.name,
                                self.settings.heartbeat_liveness, silence)
                    self.kill_replica(rep, "heartbeat", silence)

    async def shutdown(self, deadline: float) -> None:
        """Stop every service, dependents before their dependencies, within ``deadline``."""
        self.shutting_down = True
        dependents: dict[str, list[str]] = {n: [] for n in self.services}
        for name, rec in self.services.items():
            for dep in rec.spec.depends_on:
                dependents[dep].append(name)
        done = {name: asyncio.Event() for name in self.services}

        async def stop_one(name: str) -> None:
            for d in dependents[name]:
                await done[d].wait()
            try:
                rec = self.services[name]
                async with rec.lock:
                    await self._stop_service_locked(rec)
            finally:
                done[name].set()

        stops = [asyncio.ensure_future(stop_one(n)) for n in reversed(list(self.services))]
        _, pending = await asyncio.wait(stops, timeout=max(0.1, deadline - time.monotonic())) if stops else ((), ())
        if pending:
            log.error("shutdown deadline passed; killing what is left")
            for t in pending:
                t.cancel()
            await self.kill_everything()
        await self.cancel_tasks()
        if self.standby is not None:
            await self.standby.close()

    async def kill_everything(self) -> None:
        procs = [r.proc for rec in self.services.values() for r in rec.replicas if r.proc is not None]
        await asyncio.gather(*(kill_tree(p, grace=0) for p in procs if p.returncode is None), return_exceptions=True)

    async def cancel_tasks(self) -> None:
        tasks = [t for t in self._tasks if not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)

    # --- views ---------------------------------------------------------------------------------

    def status(self, names: Iterable[str] | None = None, *, brief: bool = False) -> list[dict[str, Any]]:
        recs = self.services.values() if names is None else [self.service(n) for n in names]
        if brief:
            return [r.to_brief() for r in recs]
        return [r.to_status(self._replica_resources) for r in recs]

    def _replica_resources(self, rep: ReplicaRecord) -> dict[str, Any]:
        key = rep.key if rep.key in self.live else None
        return self.resources.replica_view(key, holder_of(rep.service, rep.index))

    def lookup(self, name: str) -> m.LookupReply:
        rec = self.service(name)
        ready = [r for r in rec.replicas if r.state is S.READY and r.endpoint]
        methods = sorted({meth for r in ready for meth in r.methods})
        return m.LookupReply(service=name, endpoints=[r.endpoint for r in ready if r.endpoint], methods=methods,
                             ready=len(ready), replicas=rec.desired)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for rec in self.services.values():
            for r in rec.replicas:
                out[r.state.value] = out.get(r.state.value, 0) + 1
        return out
