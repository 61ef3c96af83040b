"""The supervisor: runs every replica, notices its exit, and applies the restart policy.

Each replica slot is driven by one task (``_replica_main``) that spawns the process, waits for
readiness (a message, never a timer; the start timeout is only a ceiling, extendable by
progress messages), then *awaits the child's exit* — there is no polling loop — and decides
what happens next: restart (after an exponential backoff), give up (``failed``, when the restart
intensity is exceeded), or stay down (``temporary``/``transient`` policies, or a requested stop).

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
from protocols.board import BOARD_ENV, SLOT_ENV, HeartbeatBoard
from protocols.endpoints import KernelEndpoints, ipc_path
from protocols.errors import ErrorCode, MicrokernelError
from microkernel.bus.events import EventBus
from microkernel.bus.heartbeat import Liveness
from microkernel.config import KernelConfig
from microkernel.resources.leases import LeaseError
from microkernel.resources.manager import Placement, ResourceManager, holder_of
from microkernel.resources.monitor import Target
from microkernel.sentinel import MARKER_VAR, Sentinel
from microkernel.supervisor.backoff import Backoff
from microkernel.supervisor.intensity import RestartWindow
from microkernel.supervisor.distributed import free_port, rank_environment
from microkernel.supervisor.launch import argv_for, environment_for, standby_environment
from microkernel.supervisor.policy import should_restart, siblings_to_restart
from microkernel.supervisor.process import SpawnError, kill_tree, spawn
from microkernel.supervisor.reasons import ExitReason
from microkernel.supervisor.records import ReplicaRecord, ServiceRecord
from microkernel.supervisor.spec import GroupSpec, ReadyMode, ServiceSpec
from microkernel.supervisor.standby import Standby
from microkernel.supervisor.states import ReplicaState

log = logging.getLogger("microkernel.supervisor")
S = ReplicaState

MAX_PROGRESS_EXTENSION_S = 3600.0


class GroupState:
    """A supervision group and its shared restart-intensity window."""

    def __init__(self, spec: GroupSpec) -> None:
        self.spec = spec
        self.window = RestartWindow(spec.intensity, spec.period)


class Supervisor:
    """Owns every ServiceRecord and the tasks that drive their replicas."""

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

    # --- the replica driver --------------------------------------------------------------------

    def _launch(self, rec: ServiceRecord, rep: ReplicaRecord) -> None:
        if rep.task is not None and not rep.task.done():
            return
        rep.stop_requested = False
        rep.kill_reason = None
        rep.kill_detail = ""
        rep.wakeup = asyncio.Event()
        rep.task = self._spawn_task(self._replica_main(rec, rep), name=f"replica:{rep.name}")

    def _deps_up(self, spec: ServiceSpec) -> bool:
        return all(self.services[d].up_event.is_set() for d in spec.depends_on)

    async def _wait_for_dependencies(self, rec: ServiceRecord, rep: ReplicaRecord) -> bool:
        """Wait until every dependency has a ready replica; False if stopped meanwhile."""
        while not self._deps_up(rec.spec):
            missing = [d for d in rec.spec.depends_on if not self.services[d].up_event.is_set()]
            if rep.state is not S.WAITING:
                self._set(rec, rep, S.WAITING, f"waiting for {', '.join(missing)}")
            dep_ready = asyncio.ensure_future(self.services[missing[0]].up_event.wait())
            stop = asyncio.ensure_future(rep.wakeup.wait())
            try:
                await asyncio.wait({dep_ready, stop}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                dep_ready.cancel()
                stop.cancel()
            if rep.stop_requested or self.shutting_down:
                return False
        return True

    async def _replica_main(self, rec: ServiceRecord, rep: ReplicaRecord) -> None:
        spec = rec.spec
        try:
            while not rep.stop_requested and not self.shutting_down:
                if spec.depends_on and not await self._wait_for_dependencies(rec, rep):
                    break
                reason = await self._run_once(rec, rep)
                if rep.stop_requested or self.shutting_down:
                    break
                if not should_restart(spec.restart, reason):
                    log.info("%s exited with %s; restart=%s, not restarting", rep.name, reason, spec.restart.value)
                    return
                now = time.monotonic()
                if not rec.window.add(now):
                    await self._fail_service(
                        rec, rep, f"more than {spec.intensity} restarts in {spec.period:g}s (last exit: {reason})"
                    )
                    return
                group = self.groups.get(spec.group) if spec.group else None
                if group is not None and not group.window.add(now):
                    self._spawn_task(self._escalate(group, rec, reason), name=f"escalate:{group.spec.name}")
                    return
                facts = rep.exit_facts
                if facts is not None and facts.released and not await self.resources.wait_gpu_freed(
                    rec.name, rep.index, facts
                ):
                    await self._fail_service(rec, rep, "the device memory of its last process was not freed in time")
                    return
                rep.restarts += 1
                rec.restarts += 1
                for sibling in siblings_to_restart(group.spec if group else None, spec.name):
                    self._spawn_task(self.restart(sibling, cause=f"{spec.name} exited ({reason})"),
                                     name=f"strategy-restart:{sibling}")
                delay = rep.backoff.on_exit(rep.started_mono, now)
                if delay > 0:
                    self._set(rec, rep, S.BACKOFF, f"restarting in {delay:.2f}s")
                    self.bus.emit(m.ServiceBackoff, service=rec.name, replica=rep.index, delay_s=delay,
                                  consecutive=rep.backoff.consecutive)
                    try:
                        async with asyncio.timeout(delay):
                            await rep.wakeup.wait()
                    except TimeoutError:
                        pass
        except asyncio.CancelledError:
            raise
        except Exception:  # a supervisor bug must not take the kernel down
            log.exception("supervising %s failed", rep.name)
        finally:
            if rep.state in (S.EXITED, S.BACKOFF, S.WAITING) and (rep.stop_requested or self.shutting_down):
                self._set(rec, rep, S.STOPPED)

    async def _run_once(self, rec: ServiceRecord, rep: ReplicaRecord) -> ExitReason:
        """Spawn one incarnation, wait for readiness (bounded), then for its exit."""
        spec = rec.spec
        rep.incarnation += 1
        rep.kill_reason = None
        rep.endpoint = None
        rep.methods = []
        rep.ready_event = asyncio.Event()
        rep.ready_at_ns = None
        rep.kill_detail = ""
        rep.exit_facts = None
        self._set(rec, rep, S.STARTING, "queued for a start slot" if self._start_slots.locked() else "spawning")
        self.bus.emit(m.ServiceStarting, service=rec.name, replica=rep.index, incarnation=rep.incarnation)
        placement = await self._place(rec, rep)
        if isinstance(placement, ExitReason):
            return self._exited(rec, rep, placement, pid=0, uptime=0.0)
        if not await self._acquire_start_slot(rep):
            self.resources.abandon(placement)
            reason = ExitReason(kind="stopped", detail="stopped before it was spawned")
            return self._exited(rec, rep, reason, pid=0, uptime=0.0)
        try:
            return await self._spawn_and_supervise(rec, rep, placement)
        finally:
            self._free_start_slot(rep)

    async def _place(self, rec: ServiceRecord, rep: ReplicaRecord) -> Placement | ExitReason:
        """The replica's resources (its GPU lease may be waited for); an ExitReason when there are none."""
        spec = rec.spec
        res = spec.resources
        if not self.resources.needs_waiting(res):
            return self.resources.place_now(spec.name, rep.index, res)
        if res.gpu is not None:
            rep.detail = "waiting for a GPU lease"
        placing = asyncio.ensure_future(
            self.resources.place(spec.name, rep.index, rep.incarnation, res, timeout=spec.start_timeout)
        )
        stop = asyncio.ensure_future(rep.wakeup.wait())
        try:
            await asyncio.wait({placing, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not placing.done():
                placing.cancel()
                await asyncio.wait({placing})
        if placing.cancelled():
            return ExitReason(kind="stopped", detail="stopped while waiting for its resources")
        exc = placing.exception()
        if isinstance(exc, LeaseError):
            log.warning("%s: no GPU lease: %s", rep.name, exc.reason)
            return ExitReason(kind="spawn_failed", detail=f"no GPU lease: {exc.reason}")
        if isinstance(exc, OSError):
            log.error("%s: cannot set up its cgroup: %s", rep.name, exc)
            return ExitReason(kind="spawn_failed", detail=f"cannot set up its cgroup: {exc}")
        placement = placing.result()
        if rep.stop_requested or self.shutting_down:
            self.resources.abandon(placement)
            return ExitReason(kind="stopped", detail="stopped while waiting for its resources")
        return placement

    async def _acquire_start_slot(self, rep: ReplicaRecord) -> bool:
        """Wait for one of the ``start_concurrency`` slots; False if the replica was stopped meanwhile."""
        if not self._start_slots.locked():
            await self._start_slots.acquire()
        else:
            acquire = asyncio.ensure_future(self._start_slots.acquire())
            stop = asyncio.ensure_future(rep.wakeup.wait())
            try:
                await asyncio.wait({acquire, stop}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
                if not acquire.done():
                    acquire.cancel()
            if not acquire.done() or acquire.cancelled():
                return False
        if rep.stop_requested or self.shutting_down:
            self._start_slots.release()
            return False
        rep.holds_start_slot = True
        return True

    def _free_start_slot(self, rep: ReplicaRecord) -> None:
        if rep.holds_start_slot:
            rep.holds_start_slot = False
            self._start_slots.release()

    async def _spawn_and_supervise(self, rec: ServiceRecord, rep: ReplicaRecord, placement: Placement) -> ExitReason:
        spec = rec.spec
        rep.detail = "spawning"
        extra = dict(self.sentinel.marker_env)
        if spec.heartbeat and self._free_slots:
            assert self.board is not None
            rep.board_slot = self._free_slots.pop()
            rep.board_seen_ns = 0
            self.board.claim(rep.board_slot, owner=rep.incarnation)
            extra[BOARD_ENV] = self.board.path
            extra[SLOT_ENV] = str(rep.board_slot)
        if spec.distributed is not None:
            if rec.rendezvous_port is None:
                rec.rendezvous_port = spec.distributed.port or free_port(spec.distributed.master_addr)
            extra.update(rank_environment(spec.distributed, rank=rep.index, world_size=rec.desired,
                                          port=rec.rendezvous_port))
        env, endpoint = environment_for(
            spec,
            replica=rep.index,
            incarnation=rep.incarnation,
            runtime_dir=self.runtime_dir,
            endpoints=self.endpoints,
            heartbeat_interval=self.settings.heartbeat_interval,
            max_message_size=self.settings.max_message_size,
            log_level=self.settings.log_level,
            extra={**extra, **placement.env},
            defaults=placement.defaults,
        )
        rep.started_at_ns = time.time_ns()
        rep.started_mono = time.monotonic()
        rep.pid = None
        key = rep.key
        # Registered before the spawn is awaited: on a busy loop the child can send ready_request
        # before this coroutine resumes, and it must find its replica.
        self.live[key] = rep
        try:
            argv = argv_for(spec)
            proc = None
            if self.standby is not None:
                proc = self.standby.take(argv, env, spec.cwd, cpus=placement.cpus, cgroup=placement.cgroup)
            if proc is None:
                proc = await spawn(argv, env=env, cwd=spec.cwd, cpus=placement.cpus, cgroup=placement.cgroup)
            self._prepare_standby()
        except (SpawnError, OSError, ValueError) as exc:
            self.live.pop(key, None)
            self.resources.abandon(placement)
            self._release_slot(rep)
            reason = ExitReason(kind="spawn_failed", detail=str(exc))
            log.error("%s could not be started: %s", rep.name, exc)
            return self._exited(rec, rep, reason, pid=0, uptime=0.0)
        rep.proc = proc
        rep.pid = proc.pid
        self.resources.spawned(key, proc.pid, placement)
        if rep.stop_requested or self.shutting_down:
            # A stop arrived while we were spawning: it found no process to kill, so we do it.
            rep.kill_reason = rep.kill_reason or "stopped"
            self._spawn_task(kill_tree(proc, grace=spec.stop_timeout), name=f"kill:{rep.name}")
        self.sentinel.track(proc.pid)
        # Liveness is tracked from the first heartbeat: before it (interpreter start, imports on a
        # loaded machine) the start timeout is what bounds a replica that never comes up.
        self.bus.emit(m.ServiceStarted, service=rec.name, replica=rep.index, incarnation=rep.incarnation, pid=proc.pid)
        exit_wait = asyncio.ensure_future(proc.wait())
        try:
            if spec.ready is ReadyMode.SPAWN:
                self._free_start_slot(rep)
                self._set(rec, rep, S.RUNNING)
                self.bus.emit(m.ServiceReady, service=rec.name, replica=rep.index, incarnation=rep.incarnation,
                              pid=proc.pid, endpoint="", startup_ms=0.0)
            else:
                if rep.state is S.STARTING:  # (readiness may already have been announced)
                    rep.detail = "waiting for readiness"
                await self._await_readiness(rep, proc, exit_wait, spec)
                self._free_start_slot(rep)
            returncode = await exit_wait
        finally:
            if not exit_wait.done():  # cancelled (kernel teardown): make sure it dies
                exit_wait.cancel()
            # Also when it exited on its own: whatever it left behind in its group dies with it.
            await kill_tree(proc, grace=0)
            rep.exit_facts = self.resources.exited(key, proc.pid, placement)
            self._release_slot(rep)
            self.live.pop(key, None)
            self.liveness.forget(key)
            self.sentinel.untrack(proc.pid)
            path = ipc_path(endpoint)
            if path is not None:
                try:
                    path.unlink()
                except OSError:
                    pass
        requested, detail = rep.kill_reason, rep.kill_detail
        if requested is None and rep.exit_facts is not None and rep.exit_facts.oom:
            requested, detail = "oom", "killed by the kernel's OOM killer at its cgroup's memory.max"
        reason = ExitReason.from_returncode(returncode, requested=requested, detail=detail)
        uptime = time.monotonic() - rep.started_mono
        return self._exited(rec, rep, reason, pid=proc.pid, uptime=uptime)

    def _release_slot(self, rep: ReplicaRecord) -> None:
        if rep.board_slot is not None and self.board is not None:
            self.board.release(rep.board_slot)
            self._free_slots.append(rep.board_slot)
        rep.board_slot = None

    def _read_board(self) -> None:
        """Feed the beats recorded on the heartbeat board into the liveness bookkeeping."""
        board = self.board
        if board is None:
            return
        for key, rep in self.live.items():
            slot = rep.board_slot
            if slot is None:
                continue
            beat_ns = board.last_beat(slot)
            if beat_ns > rep.board_seen_ns:
                rep.board_seen_ns = beat_ns
                self.liveness.beat(key, beat_ns / 1e9)  # same clock as time.monotonic()

    async def _await_readiness(
        self, rep: ReplicaRecord, proc: asyncio.subprocess.Process, exit_wait: asyncio.Future[int], spec: ServiceSpec
    ) -> None:
        rep.start_deadline = time.monotonic() + spec.start_timeout
        ready = asyncio.ensure_future(rep.ready_event.wait())
        try:
            while True:
                left = rep.start_deadline - time.monotonic()
                if left <= 0:
                    log.warning("%s did not become ready within its start timeout; killing it", rep.name)
                    rep.kill_reason = rep.kill_reason or "start_timeout"
                    self._spawn_task(kill_tree(proc, grace=min(spec.stop_timeout, 5.0)), name=f"kill:{rep.name}")
                    return
                # The timeout is a ceiling only; the deadline may have moved (progress messages).
                done, _ = await asyncio.wait({ready, exit_wait}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                if done:
                    return
        finally:
            ready.cancel()

    def _exited(self, rec: ServiceRecord, rep: ReplicaRecord, reason: ExitReason, *, pid: int, uptime: float) -> ExitReason:
        rep.last_exit = reason
        rep.proc = None
        stopping = rep.stop_requested or self.shutting_down
        will_restart = not stopping and should_restart(rec.spec.restart, reason)
        self._set(rec, rep, S.EXITED, str(reason))
        level = logging.INFO if reason.normal or stopping else logging.WARNING
        log.log(level, "%s (pid %s) exited: %s after %.1fs", rep.name, pid, reason, uptime)
        self.bus.emit(m.ServiceExited, service=rec.name, replica=rep.index, incarnation=rep.incarnation, pid=pid,
                      reason=reason.to_wire(), uptime_s=uptime, will_restart=will_restart)
        return reason

    async def _fail_service(self, rec: ServiceRecord, rep: ReplicaRecord, why: str) -> None:
        log.error("service %s failed: %s", rec.name, why)
        rec.failed = True
        self._set(rec, rep, S.FAILED, why)
        others = [r for r in rec.replicas if r is not rep]
        await asyncio.gather(*(self._stop_replica(rec, r) for r in others))
        self.resources.release_slots(rec.name, range(len(rec.replicas)))
        rec.refresh()
        self.bus.emit(m.ServiceFailed, service=rec.name, reason=why)

    async def _escalate(self, group: GroupState, culprit: ServiceRecord, reason: ExitReason) -> None:
        why = (f"group {group.spec.name!r}: more than {group.spec.intensity} restarts in "
               f"{group.spec.period:g}s (last: {culprit.name} {reason})")
        log.error("escalating: %s", why)
        self.bus.emit(m.SupervisorEscalated, group=group.spec.name, service=culprit.name, reason=why)
        for name in group.spec.services:
            rec = self.services[name]
            async with rec.lock:
                await self._stop_service_locked(rec)
                self.resources.release_slots(name, range(len(rec.replicas)))
                rec.failed = True
                rec.refresh()
            self.bus.emit(m.ServiceFailed, service=name, reason=why)

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
        while True:
            # A timer is right here: liveness is by definition the absence of messages.
            await asyncio.sleep(interval / 2)
            self._read_board()
            for key in self.liveness.expired(time.monotonic()):
                rep = self.live.get(key)
                if rep is not None:
                    log.warning("%s missed %d heartbeats; killing it", rep.name, self.settings.heartbeat_liveness)
                    self.kill_replica(rep, "heartbeat")

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

    def status(self, names: Iterable[str] | None = None) -> list[dict[str, Any]]:
        recs = self.services.values() if names is None else [self.service(n) for n in names]
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
