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
from microkernel import __version__
from microkernel.bus.control import ControlRouter
from microkernel.bus.events import EventBus
from microkernel.config import KernelConfig
from microkernel.handlers import all_handlers
from microkernel.resources.manager import ResourceManager
from microkernel.resources.monitor import Monitor
from microkernel.rundir import RuntimeDir
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

    def __init__(self, config: KernelConfig) -> None:
        self.config = config
        self.settings = config.kernel
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
                None if standby is None else tuple(standby.summary().values()))

    def status_reply(self, service: str | None) -> wire.Packed:
        """The reply to a ``status_request``, packed once per change (see :mod:`microkernel.status_cache`)."""
        names = None if service is None else [service]
        if service is not None:
            self.supervisor.service(service)  # an unknown name is an error, never a cached reply
        return self._status.get(service, lambda: wire.pack_message(
            m.StatusReply(kernel=self.summary(), services=self.supervisor.status(names))))

    def summary(self) -> dict[str, Any]:
        """The ``kernel`` map of a status reply."""
        return {
            "version": self.version,
            "pid": self.pid,
            "uptime_s": self.uptime_s,
            "runtime_dir": str(self.rundir.path),
            "control": self.endpoints.control,
            "events": self.endpoints.events_out,
            "services": len(self.supervisor.services),
            "replicas": self.supervisor.counts(),
            "shutting_down": self.supervisor.shutting_down,
            "thread_pool_size": self.settings.thread_pool_size,
            "resources": self.resources.summary(),
            "standby": self.supervisor.standby.summary() if self.supervisor.standby is not None else None,
        }

    def request_shutdown(self, reason: str) -> None:
        """Begin an orderly shutdown (idempotent)."""
        if self._stop_reason is None:
            self._stop_reason = reason
            log.info("shutting down: %s", reason)
        self._stop.set()

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
        try:
            await sentinel.start()
            self.bus = EventBus(ctx, events_in=self.endpoints.events_in, events_out=self.endpoints.events_out,
                                history=self.settings.event_history)
            board = HeartbeatBoard.create(self.rundir.path / BOARD_FILE, BOARD_SLOTS)
            self.resources = ResourceManager(self.config, bus=self.bus, executor=pool)
            await self.resources.start()
            self.supervisor = Supervisor(self.config, bus=self.bus, sentinel=sentinel, endpoints=self.endpoints,
                                         runtime_dir=self.rundir.path, resources=self.resources, board=board)
            monitor = Monitor(self.resources, self.supervisor)
            self.control = ControlRouter(ctx, self.endpoints.control, handlers=all_handlers(), kernel=self,
                                         max_size=self.settings.max_message_size)
            for signum, name in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")):
                loop.add_signal_handler(signum, self.request_shutdown, name)
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
                ]
                await self.supervisor.start_all()
                await self._stop.wait()
                self.bus.emit(m.KernelStopping, reason=self._stop_reason or "")
                await self.supervisor.shutdown(time.monotonic() + self.settings.shutdown_timeout)
                self.resources.close()
                for task in watchers:
                    task.cancel()
            await self.control.drain(timeout=1.0)
            log.info("microkernel stopped")
            return 0
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            if hasattr(self, "supervisor"):
                await self.supervisor.kill_everything()
            if hasattr(self, "control"):
                self.control.socket.close(linger=CONTROL_LINGER_MS)
            if hasattr(self, "bus"):
                self.bus.close()
            await sentinel.close()
            ctx.term()
            if hasattr(self, "supervisor") and self.supervisor.board is not None:
                self.supervisor.board.close()
                (self.rundir.path / BOARD_FILE).unlink(missing_ok=True)
            self.rundir.release()
