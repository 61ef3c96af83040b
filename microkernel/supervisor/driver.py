"""The replica driver: one task per replica slot, from placement and spawn to exit and restart.

A slot's task (``_replica_main``) waits for its dependencies, takes a start slot, places the
replica (GPU lease, CPUs, cgroup), spawns it (from the warm standby when it can), waits for
readiness (a message; the start timeout is only a ceiling, extended by progress messages), then
*awaits the child's exit* — no polling loop — and applies the restart policy: backoff and
restart, ``failed`` when the restart intensity is exceeded, or stay down.

``ReplicaDriver`` is the part of :class:`~microkernel.supervisor.supervisor.Supervisor` that does
this; the supervisor adds the records, the commands and the views.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from protocols import messages as m
from protocols.board import BOARD_ENV, SLOT_ENV, HeartbeatBoard
from protocols.endpoints import KernelEndpoints, ipc_path
from microkernel.bus.events import EventBus
from microkernel.bus.heartbeat import Liveness
from microkernel.config import KernelConfig
from microkernel.logs import ServiceLogs
from microkernel.resources.leases import LeaseError
from microkernel.resources.manager import Placement, ResourceManager
from microkernel.sentinel import Sentinel
from microkernel.supervisor.intensity import RestartWindow
from microkernel.supervisor.distributed import free_port, rank_environment
from microkernel.supervisor.launch import argv_for, environment_for
from microkernel.supervisor.policy import should_restart, siblings_to_restart
from microkernel.supervisor.process import SpawnError, kill_tree, spawn
from microkernel.supervisor.reasons import ExitReason
from microkernel.supervisor.records import ReplicaRecord, ServiceRecord
from microkernel.supervisor.spec import GroupSpec, ReadyMode, ServiceSpec
from microkernel.supervisor.standby import Standby
from microkernel.supervisor.states import ReplicaState


log = logging.getLogger("microkernel.supervisor")
S = ReplicaState


class GroupState:
    """A supervision group and its shared restart-intensity window."""

    def __init__(self, spec: GroupSpec) -> None:
        self.spec = spec
        self.window = RestartWindow(spec.intensity, spec.period)


class ReplicaDriver:
    """Drives replica slots; the state it works on is set up by the Supervisor."""

    config: KernelConfig
    resources: ResourceManager
    settings: Any
    bus: EventBus
    sentinel: Sentinel
    endpoints: KernelEndpoints
    runtime_dir: Path
    services: dict[str, ServiceRecord]
    groups: dict[str, GroupState]
    liveness: Liveness[tuple[str, int, int]]
    live: dict[tuple[str, int, int], ReplicaRecord]
    board: HeartbeatBoard | None
    _free_slots: list[int]
    shutting_down: bool
    _start_slots: asyncio.Semaphore
    standby: Standby | None
    logs: ServiceLogs | None = None
    """Where replica stdout/stderr go; None (tests without a kernel): inherited from the daemon."""

    def attach_logs(self, logs: ServiceLogs) -> None:
        """Capture every replica's (and the warm standby's) output into ``logs`` from now on."""
        self.logs = logs
        if self.standby is not None:
            self.standby.logs = logs

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
        output = capture = None
        try:
            argv = argv_for(spec)
            proc = None
            if self.standby is not None:
                proc = self.standby.take(argv, env, spec.cwd, cpus=placement.cpus, cgroup=placement.cgroup)
                if proc is not None and self.logs is not None:
                    capture = self.logs.assign(proc.pid, rec.name, rep.index)  # its pipes now feed this service's file
            if proc is None:
                output = self.logs.open(rec.name, rep.index) if self.logs is not None else None
                proc = await spawn(argv, env=env, cwd=spec.cwd, cpus=placement.cpus, cgroup=placement.cgroup,
                                   stdout=None if output is None else output.stdout,
                                   stderr=None if output is None else output.stderr)
                if output is not None and self.logs is not None:
                    capture, output = self.logs.adopt(proc.pid, output), None
            self._prepare_standby()
        except (SpawnError, OSError, ValueError) as exc:
            if output is not None:
                output.close()
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
            if self.logs is not None:
                self.logs.release(proc.pid, capture)  # the tree is dead: drain its pipes, write a partial last line
            rep.exit_facts = self.resources.exited(key, proc.pid, placement)
            # Before the exit is reported: whoever sees ``service.exited`` finds its segments gone.
            await self.resources.reap_segments(proc.pid)
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
