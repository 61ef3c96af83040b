"""The kernel: one asyncio loop, one TaskGroup, the control router, the event bus, the supervisor."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import zmq

from protocols import messages as m
from protocols import wire
from protocols.board import HeartbeatBoard
from protocols.endpoints import KernelEndpoints
from protocols.errors import MicrokernelError
from microkernel import __version__
from microkernel.bus.control import ControlRouter
from microkernel.bus.events import EventBus
from microkernel.config import KernelConfig
from microkernel.handlers import all_handlers
from microkernel.logs import ServiceLogs
from microkernel.metrics import start_metrics
from microkernel.logsetup import daemon_logging
from microkernel.notify import Notifier, ServiceCounts, count_states
from microkernel.reload import ConfigSource, Reloader
from microkernel.resources.manager import ResourceManager
from microkernel.resources.monitor import Monitor
from microkernel.rundir import RuntimeDir
from microkernel.security.gate import Gate
from microkernel.sentinel import Sentinel
from microkernel.status_cache import StatusCache
from microkernel.supervisor.records import status_changes
from microkernel.supervisor.supervisor import Supervisor

log = logging.getLogger("microkernel.kernel")

# Slots of the heartbeat board (16 bytes each); replicas beyond it send heartbeat messages.
BOARD_SLOTS = 4096
BOARD_FILE = "heartbeats.board"

# How long the control socket keeps trying to deliver the last replies (e.g. to shutdown_request).
CONTROL_LINGER_MS = 500


class Kernel:
    """The daemon. ``await Kernel(config).run()`` returns when the kernel has shut down."""

    version = __version__

    def __init__(self, config: KernelConfig, source: ConfigSource | None = None) -> None:
        self.config = config
        self.settings = config.kernel
        # What SIGHUP / reload_request re-reads (no path: started without --config, nothing to re-read).
        self.reloader = Reloader(self, source or ConfigSource())
        self.notifier = Notifier.take_from_environ()
        self._signal_tasks: set[asyncio.Task[None]] = set()
        self.rundir = RuntimeDir(self.settings.runtime_dir)
        self.endpoints = KernelEndpoints.in_runtime_dir(self.rundir.path)
        self.pid = os.getpid()
        self.started = time.monotonic()
        self._stop_reason: str | None = None
        self._stop = asyncio.Event()
        self.bus: EventBus
        self.resources: ResourceManager
        self.supervisor: Supervisor
        self.control: ControlRouter
        self._status = StatusCache(self._status_key)

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.started

    def _status_key(self) -> tuple[Any, ...]:
        standby = self.supervisor.standby
        return (status_changes.value, self.resources.status_key(), self.supervisor.shutting_down,
                None if standby is None else standby.status_key())

    def status_reply(self, service: str | None, brief: bool = False) -> wire.Packed:
        """The reply to a ``status_request``, packed once per change (see :mod:`microkernel.status_cache`)."""
        names = None if service is None else [service]
        if service is not None:
            self.supervisor.service(service)  # an unknown name is an error, never a cached reply
        if brief:
            return self._status.get((service, True), lambda: wire.pack_message(
                m.StatusReply(kernel=self.brief_summary(), services=self.supervisor.status(names, brief=True))))
        return self._status.get(service, lambda: wire.pack_message(
            m.StatusReply(kernel=self.summary(), services=self.supervisor.status(names))))

    def brief_summary(self) -> dict[str, Any]:
        """The ``kernel`` map of a brief status reply."""
        return {
            "version": self.version,
            "pid": self.pid,
            "uptime_s": self.uptime_s,
            "services": len(self.supervisor.services),
            "replicas": self.supervisor.counts(),
            "shutting_down": self.supervisor.shutting_down,
        }

    def summary(self) -> dict[str, Any]:
        """The ``kernel`` map of a status reply."""
        return {
            **self.brief_summary(),
            "runtime_dir": str(self.rundir.path),
            "control": self.endpoints.control,
            "events": self.endpoints.events_out,
            "thread_pool_size": self.settings.thread_pool_size,
            "resources": self.resources.summary(),
            "standby": self.supervisor.standby.summary() if self.supervisor.standby is not None else None,
        }

    def service_entries(self) -> list[str | None]:
        """The entry of every service the kernel runs (an operator may add services with these)."""
        return [rec.spec.entry for rec in self.supervisor.services.values()]

    def request_shutdown(self, reason: str) -> None:
        """Begin an orderly shutdown (idempotent)."""
        if self._stop_reason is None:
            self._stop_reason = reason
            log.info("shutting down: %s", reason)
            self.notifier.stopping(f"stopping: {reason}")
        self._stop.set()

    # --- lifecycle: sd_notify, reload, log reopening (see notify.py, reload.py, logsetup.py) ---------

    def service_counts(self) -> ServiceCounts:
        return count_states([(r.aggregate_state(), r.up_count()) for r in self.supervisor.services.values()])

    def status_line(self) -> str:
        """The sd_notify ``STATUS=`` text: services by state, replicas ready."""
        return self.service_counts().line()

    def apply_config(self, config: KernelConfig) -> None:
        """Make a reloaded configuration the running one (the supervisor already runs its services)."""
        self.config = config
        self.settings = config.kernel
        self.supervisor.config = config
        self.supervisor.settings = config.kernel
        self.resources.config = config

    async def _announce_ready(self) -> None:
        """READY=1 once every started autostart service is up or has failed (at most its start timeout)."""
        started = [r for r in self.supervisor.services.values() if any(rep.task is not None for rep in r.replicas)]
        until = time.monotonic() + max((r.spec.start_timeout for r in started), default=0.0)
        await asyncio.gather(*(self.supervisor.wait_up(r, until) for r in started))
        if self._stop.is_set():
            return  # stopping already: READY=1 would tell systemd the opposite
        self.notifier.ready(self.status_line())
        log.info("startup complete: %s", self.status_line())

    def _on_sighup(self) -> None:
        task = asyncio.get_running_loop().create_task(self._reload_on_signal(), name="reload:SIGHUP")
        self._signal_tasks.add(task)
        task.add_done_callback(self._signal_tasks.discard)

    async def _reload_on_signal(self) -> None:
        try:
            await self.reloader.reload("SIGHUP")
        except Exception as exc:  # already logged by the reloader; a signal has nobody to answer
            if not isinstance(exc, MicrokernelError):
                log.exception("reload on SIGHUP failed")

    async def _watch_sentinel(self, sentinel: Sentinel) -> None:
        """Keep the orphan guard alive: without it a kill -9 of the daemon could leave orphans."""
        while True:
            code = await sentinel.wait_exited()
            if self._stop.is_set():
                return
            log.error("the orphan-guard sentinel exited (%s); restarting it", code)
            await sentinel.start()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        # The kernel's one bounded pool for blocking work (psutil, /proc, NVML, cgroup files).
        pool = ThreadPoolExecutor(max_workers=self.settings.thread_pool_size, thread_name_prefix="mk-io")
        loop.set_default_executor(pool)
        self.rundir.acquire()
        ctx = zmq.Context()
        sentinel = Sentinel()
        metrics = None
        gate: Gate | None = None
        self.control_tcp: ControlRouter | None = None
        try:
            gate = Gate(self.config.security, ctx)  # its ZAP handler must exist before any CURVE endpoint
            await sentinel.start()
            self.bus = EventBus(ctx, events_in=self.endpoints.events_in, events_out=self.endpoints.events_out,
                                history=self.settings.event_history, max_size=self.settings.max_message_size,
                                bind_more=gate.bind_events)
            board = HeartbeatBoard.create(self.rundir.path / BOARD_FILE, BOARD_SLOTS)
            self.resources = ResourceManager(self.config, bus=self.bus, executor=pool)
            await self.resources.start()
            self.supervisor = Supervisor(self.config, bus=self.bus, sentinel=sentinel, endpoints=self.endpoints,
                                         runtime_dir=self.rundir.path, resources=self.resources, board=board)
            monitor = Monitor(self.resources, self.supervisor)
            # Replica stdout/stderr go to <logs.dir>/<service>.log (see microkernel/logs/).
            self.logs = ServiceLogs(self.config.logs, runtime_dir=self.rundir.path)
            self.supervisor.attach_logs(self.logs)
            self.control = ControlRouter(ctx, self.endpoints.control, handlers=all_handlers(), kernel=self,
                                         max_size=self.settings.max_message_size, limits=self.config.limits,
                                         guard=gate.guard(self.service_entries))
            self.control_tcp = gate.tcp_router(ctx, self, max_size=self.settings.max_message_size,
                                               limits=self.config.limits, entries=self.service_entries)
            for signum, name in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")):
                loop.add_signal_handler(signum, self.request_shutdown, name)
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
            loop.add_signal_handler(signal.SIGUSR1, daemon_logging.reopen)
            metrics = start_metrics(self.config.metrics, self)
            self.bus.emit(m.KernelStarted, pid=self.pid, version=self.version, control=self.endpoints.control,
                          events=self.endpoints.events_out)
            log.info("microkernel ready: control %s, events %s, %d services",
                     self.endpoints.control, self.endpoints.events_out, len(self.supervisor.services))
            async with asyncio.TaskGroup() as tg:
                watchers = [
                    tg.create_task(self.supervisor.watch_heartbeats(), name="heartbeats"),
                    tg.create_task(self._watch_sentinel(sentinel), name="sentinel"),
                    tg.create_task(monitor.run_sampling(), name="resource-sampling"),
                    tg.create_task(monitor.run_audit(), name="gpu-audit"),
                    tg.create_task(self.notifier.run_watchdog(), name="sd-watchdog"),
                    tg.create_task(self.notifier.run_status(self.service_counts, lambda: status_changes.value),
                                   name="sd-status"),
                ]
                await self.supervisor.start_all()
                watchers.append(tg.create_task(self._announce_ready(), name="sd-ready"))
                await self._stop.wait()
                self.bus.emit(m.KernelStopping, reason=self._stop_reason or "")
                await self.supervisor.shutdown(time.monotonic() + self.settings.shutdown_timeout)
                self.resources.close()
                for task in (*watchers, *self._signal_tasks):
                    task.cancel()
            await self.control.drain(timeout=1.0)
            if self.control_tcp is not None:
                await self.control_tcp.drain(timeout=1.0)
            log.info("microkernel stopped")
            return 0
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
                loop.remove_signal_handler(signum)
            self.notifier.close()
            if metrics is not None:
                metrics.stop()
            if hasattr(self, "supervisor"):
                await self.supervisor.kill_everything()
            if hasattr(self, "logs"):
                self.logs.close()
            if hasattr(self, "control"):
                self.control.socket.close(linger=CONTROL_LINGER_MS)
            if self.control_tcp is not None:
                self.control_tcp.socket.close(linger=CONTROL_LINGER_MS)
            if hasattr(self, "bus"):
                self.bus.close()
            await sentinel.close()
            if gate is not None:
                gate.close()
            ctx.term()
            if hasattr(self, "supervisor") and self.supervisor.board is not None:
                self.supervisor.board.close()
                (self.rundir.path / BOARD_FILE).unlink(missing_ok=True)
            self.rundir.release()
