"""The runtime of one service replica inside its child process.

Lifecycle (``ReplicaRuntime.run``):

1. connect the control DEALER (identity ``svc:<service>.<replica>.<incarnation>``) and start
   heartbeats at once, so the kernel sees the process alive while the rest starts;
2. connect the event publisher and, if the class has ``@subscribe`` handlers, the subscriber
   (its welcome handshake runs concurrently with setup);
3. bind the data plane (requests get ``not_ready`` until step 6);
4. ``await setup()`` — raising ends the process with status 1;
5. wait until the subscriptions are live;
6. serve, then announce readiness with ``ready_request`` (methods = sorted RPC names);
7. on SIGTERM/SIGINT or ``request_stop()``: refuse new calls (``shutting_down``), wait for
   in-flight async handlers up to ``Service.drain_timeout``, ``await teardown()``, close the
   sockets (flushing the last replies), exit 0.

A stop requested while setup runs cancels setup and exits without teardown: teardown only
undoes a setup that completed.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import threading
from collections.abc import Awaitable
from typing import Any, TypeVar

import zmq

from protocols import messages
from protocols.board import BoardError, HeartbeatBoard
from protocols.credentials import with_token
from protocols.directory import AsyncDirectory
from protocols.errors import MicrokernelError
from protocols.transport import AsyncRequester
from services.base import Service
from services.dataplane import DataPlane
from services.environment import ReplicaEnvironment
from services.events import EventDispatcher, EventPublisher
from services.handlers import bind_rpc_handlers, bind_subscription_handlers

T = TypeVar("T")

CONTROL_TIMEOUT_S = 30.0  # ready/progress replies; generous, the kernel may be busy spawning
SUBSCRIPTIONS_LIVE_TIMEOUT_S = 30.0
PUBLISHER_LINGER_MS = 500  # let events published during teardown leave


class _SetupExit(Exception):
    """``setup`` called ``sys.exit``: carried out of the task so the loop is not torn down abruptly."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _exit_status(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    return 1  # sys.exit("message") prints the message and exits 1


class ReplicaRuntime:
    """Runs one replica of ``service_cls``; implements ``services.base.ServiceRuntime``."""

    def __init__(self, service_cls: type[Service], env: ReplicaEnvironment, log: logging.Logger) -> None:
        self.service_cls = service_cls
        self.env = env
        self.service = env.service
        self.replica = env.replica
        self.incarnation = env.incarnation
        self.config = env.config
        self.endpoint = env.endpoint
        self.log = log
        self.sender = env.identity
        self.exit_code = 0
        self.instance: Service | None = None
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._control: AsyncRequester | None = None
        self._publisher: EventPublisher | None = None
        self._dataplane: DataPlane | None = None
        self._events: EventDispatcher | None = None
        self._directory: AsyncDirectory | None = None

    # --- ServiceRuntime: what Service methods call -------------------------------------------

    async def call(self, service: str, method: str, args: dict[str, Any], timeout: float) -> Any:
        assert self._directory is not None, "the runtime is not running"
        return await self._directory.call(service, method, args, timeout=timeout)

    def publish(self, topic: str, data: dict[str, Any]) -> None:
        """Publish an event; safe from any thread (training loops often run in a worker thread)."""
        publisher, loop = self._publisher, self._loop
        assert publisher is not None and loop is not None, "the runtime is not running"
        if threading.get_ident() == self._loop_thread:
            publisher.publish(topic, data)
        else:
            frames = publisher.encode(topic, data)  # errors surface in the caller's thread
            loop.call_soon_threadsafe(publisher.send, frames)

    async def progress(self, message: str, extend_s: float) -> float:
        assert self._control is not None, "the runtime is not running"
        env = await self._control.request(
            messages.ProgressRequest(service=self.service, replica=self.replica, incarnation=self.incarnation,
                                     message=message, extend_s=float(extend_s)),
            timeout=CONTROL_TIMEOUT_S,
        )
        return env.message.deadline_in_s

    async def control_request(self, message: Any, timeout: float) -> Any:
        """One request to the kernel on this replica's control connection; returns the reply body.

        The connection's identity names this replica, so the kernel knows who asks (a run-time
        GPU lease is held by the replica's process). Error replies raise ``RemoteError``.
        """
        assert self._control is not None, "the runtime is not running"
        env = await self._control.request(message, timeout=timeout)
        return env.message

    def request_stop(self, exit_code: int = 0) -> None:
        """Begin a graceful stop (idempotent; the first exit code wins). Safe from any thread."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("the replica runtime is not running")
        if threading.get_ident() != self._loop_thread:
            loop.call_soon_threadsafe(self.request_stop, exit_code)
            return
        assert self._stop is not None
        if not self._stop.is_set():
            self.exit_code = exit_code
            self._stop.set()

    # --- lifecycle -------------------------------------------------------------------------------

    async def run(self) -> int:
        """Run the replica until it stops; returns the process exit status."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        ctx = zmq.Context()
        heartbeat: asyncio.Task[None] | None = None
        try:
            # The control sender carries the kernel's token for this replica (protocols/credentials.py).
            control = AsyncRequester(ctx, [self.env.control_endpoint],
                                     sender=with_token(self.sender, self.env.control_token),
                                     identity=self.sender.encode(), max_size=self.env.max_message_size)
            control.on_unsolicited = self._on_unsolicited
            self._control = control
            heartbeat = loop.create_task(self._heartbeat(), name="heartbeat")
            return await self._serve(ctx, control)
        finally:
            if heartbeat is not None:
                heartbeat.cancel()
            self._close(ctx)
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)

    async def _serve(self, ctx: zmq.Context, control: AsyncRequester) -> int:
        env, log = self.env, self.log
        try:
            instance = self.service_cls()
        except Exception:
            log.exception("cannot instantiate %s", self.service_cls.__qualname__)
            return 1
        self.instance = instance
        self._publisher = EventPublisher(ctx, env.events_in_endpoint, sender=self.sender, log=log)
        subscriptions = bind_subscription_handlers(instance)
        if subscriptions:
            self._events = EventDispatcher(ctx, env.events_out_endpoint, subscriptions, log=log,
                                           max_size=env.max_message_size)
        try:
            self._dataplane = DataPlane(ctx, env.endpoint, bind_rpc_handlers(instance), service=self.service,
                                        sender=self.sender, log=log, max_size=env.max_message_size)
        except (zmq.ZMQError, OSError) as exc:
            log.error("cannot bind the data plane at %s: %s", env.endpoint, exc)
            return 1
        self._directory = AsyncDirectory(ctx, control, sender=self.sender, max_size=env.max_message_size)
        instance._attach(self)

        try:
            finished, _ = await self._unless_stopped(self._setup(instance))
        except _SetupExit as exc:
            log.info("setup asked to exit with status %d", exc.code)
            return exc.code
        except Exception:
            log.exception("setup failed")
            return 1
        if not finished:
            log.info("stop requested during setup; exiting without teardown")
            return self.exit_code

        if self._events is not None:
            try:
                finished, _ = await self._unless_stopped(self._events.wait_live(SUBSCRIPTIONS_LIVE_TIMEOUT_S))
            except MicrokernelError as exc:
                log.error("event subscriptions did not become live: %s", exc.reason)
                return 1
            if not finished:
                return await self._graceful_stop(instance)
            self._events.start()

        self._dataplane.serve()
        await self._unless_stopped(self._announce_ready())
        await self._stop_requested()
        return await self._graceful_stop(instance)

    async def _setup(self, instance: Service) -> None:
        try:
            await _maybe_await(instance.setup())
        except SystemExit as exc:
            raise _SetupExit(_exit_status(exc.code)) from None

    async def _announce_ready(self) -> None:
        assert self._control is not None and self._dataplane is not None
        request = messages.ReadyRequest(
            service=self.service, replica=self.replica, incarnation=self.incarnation,
            endpoint=self.endpoint, methods=self._dataplane.methods, pid=os.getpid(),
        )
        try:
            reply = await self._control.request(request, timeout=CONTROL_TIMEOUT_S)
        except MicrokernelError as exc:
            # Keep serving: the kernel decides (it kills replicas that miss the start timeout).
            self.log.error("the kernel did not acknowledge readiness: %s", exc)
            return
        self.log.info("ready (state %s, %d methods)", reply.message.state, len(request.methods))

    async def _graceful_stop(self, instance: Service) -> int:
        self.log.info("stopping")
        assert self._dataplane is not None
        await self._dataplane.drain(instance.drain_timeout)
        if self._events is not None:
            await self._events.stop()
        try:
            await _maybe_await(instance.teardown())
        except Exception:
            self.log.exception("teardown failed")
            return 1
        except SystemExit as exc:
            return _exit_status(exc.code)
        self.log.info("stopped")
        return self.exit_code

    async def _heartbeat(self) -> None:
        """Heartbeats from process start to exit; they stop only if the loop blocks.

        On the kernel's host they go to this replica's slot of the heartbeat board (no message,
        no wakeup of the kernel); otherwise, or if the board cannot be used, as messages.
        """
        assert self._control is not None
        interval = self.env.heartbeat_interval
        board = None
        if self.env.heartbeat_board is not None and self.env.heartbeat_slot is not None:
            try:
                board = HeartbeatBoard.attach(self.env.heartbeat_board)
                board.beat(self.env.heartbeat_slot)
            except BoardError as exc:
                self.log.warning("heartbeat board unusable (%s); sending heartbeat messages", exc)
                board = None
        if board is not None:
            slot = self.env.heartbeat_slot
            try:
                while True:
                    board.beat(slot)
                    await asyncio.sleep(interval)
            finally:
                board.close()
        beat = messages.Heartbeat(service=self.service, replica=self.replica, incarnation=self.incarnation)
        while True:
            self._control.send(beat)
            await asyncio.sleep(interval)

    def _on_signal(self, signum: int) -> None:
        assert self._stop is not None
        name = signal.Signals(signum).name
        if self._stop.is_set():
            self.log.info("%s: already stopping", name)
            return
        self.log.info("%s: stopping gracefully", name)
        self.request_stop(0)

    def _on_unsolicited(self, env: Any) -> None:
        self.log.debug("ignoring an unsolicited %s from the kernel", env.msg_type)

    async def _stop_requested(self) -> None:
        assert self._stop is not None
        await self._stop.wait()

    async def _unless_stopped(self, aw: Awaitable[T]) -> tuple[bool, T | None]:
        """Run ``aw`` until it finishes or a stop is requested (then cancel it).

        Returns ``(True, result)`` or ``(False, None)``; exceptions of ``aw`` propagate.
        """
        task = asyncio.ensure_future(aw)
        stopper = asyncio.ensure_future(self._stop_requested())
        try:
            await asyncio.wait((task, stopper), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            stopper.cancel()
        if task.done():
            return True, task.result()
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        except Exception:
            self.log.debug("error while cancelling after a stop request", exc_info=True)
        return False, None

    def _close(self, ctx: zmq.Context) -> None:
        """Close every socket; the data plane and publisher linger briefly to flush."""
        if self._events is not None:
            self._events.close()
        if self._directory is not None:
            self._directory.close()
        if self._dataplane is not None:
            self._dataplane.close()
        if self._publisher is not None:
            self._publisher.close(linger=PUBLISHER_LINGER_MS)
        if self._control is not None:
            self._control.close()
        # Closes anything left and waits (bounded by the lingers above) for queued replies to leave.
        ctx.destroy(linger=0)


async def _maybe_await(value: Any) -> Any:
    """``setup``/``teardown`` may be plain functions; await only what is awaitable."""
    if inspect.isawaitable(value):
        return await value
    return value
