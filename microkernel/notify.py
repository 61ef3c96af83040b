"""sd_notify without a systemd library: readiness, status, watchdog, stopping and reloading.

systemd (``Type=notify`` / ``Type=notify-reload``) passes ``NOTIFY_SOCKET`` — a filesystem path,
or ``@name`` for the abstract namespace — and expects newline-separated ``KEY=VALUE`` datagrams
on that ``AF_UNIX`` ``SOCK_DGRAM`` socket. With ``WatchdogSec=`` it also passes ``WATCHDOG_USEC``
(and ``WATCHDOG_PID``: only that process is meant to ping) and kills the service when no
``WATCHDOG=1`` arrives within that time.

The watchdog is pinged by a task on the kernel's own loop, so a wedged loop stops the pings and
systemd restarts the daemon — which is the point of having one. Without ``NOTIFY_SOCKET`` every
method is a no-op; a send that fails is logged once and never raises.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

log = logging.getLogger("microkernel.notify")

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"

STATUS_CHECK_INTERVAL = 0.5
"""Seconds between two looks at the service counts: changes within it are coalesced into one STATUS=."""


def build_message(fields: Mapping[str, str | int]) -> bytes:
    """One notification datagram: ``KEY=VALUE`` lines in the given order.

    Values must be single lines (a newline would start a new assignment); they are cut at the
    first line break rather than rejected, because a status text is never worth an exception.
    """
    lines = []
    for key, value in fields.items():
        if not key or "=" in key or "\n" in key:
            raise ValueError(f"invalid sd_notify key {key!r}")
        text = str(value).splitlines()[0] if str(value) else ""
        lines.append(f"{key}={text}")
    return ("\n".join(lines) + "\n").encode("utf-8")


def socket_address(value: str) -> str | bytes | None:
    """The ``sendto`` address for a ``NOTIFY_SOCKET`` value: ``@name`` is the abstract namespace."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode("utf-8")
    if value.startswith("/"):
        return value
    return None  # systemd also knows vsock: addresses; a kernel on a plain host never gets them


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between two ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``), ``None`` when off.

    ``WATCHDOG_PID``, when set, names the one process meant to ping: any other one stays quiet.
    """
    raw = env.get(WATCHDOG_USEC_ENV, "")
    try:
        usec = int(raw)
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = env.get(WATCHDOG_PID_ENV, "")
    if owner:
        try:
            if int(owner) != pid:
                return None
        except ValueError:
            return None
    return usec / 2 / 1_000_000


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceCounts:
    """What the ``STATUS=`` line says: services by state and replicas ready."""

    services: int
    running: int
    failed: int
    stopped: int
    starting: int
    replicas_ready: int

    def line(self) -> str:
        """``"7 services: 6 running, 1 failed; 12 replicas ready"`` (zero counts left out)."""
        parts = [f"{n} {label}" for n, label in ((self.running, "running"), (self.starting, "starting"),
                                                 (self.failed, "failed"), (self.stopped, "stopped")) if n]
        noun = "service" if self.services == 1 else "services"
        head = f"{self.services} {noun}" + (f": {', '.join(parts)}" if parts else "")
        rep = "replica" if self.replicas_ready == 1 else "replicas"
        return f"{head}; {self.replicas_ready} {rep} ready"


def count_states(states: list[tuple[str, int]]) -> ServiceCounts:
    """Fold ``(aggregate state, ready replicas)`` per service into :class:`ServiceCounts`."""
    running = failed = stopped = 0
    for state, _ in states:
        if state in ("ready", "running"):
            running += 1
        elif state == "failed":
            failed += 1
        elif state == "stopped":
            stopped += 1
    return ServiceCounts(services=len(states), running=running, failed=failed, stopped=stopped,
                         starting=len(states) - running - failed - stopped,
                         replicas_ready=sum(ready for _, ready in states))


class Notifier:
    """Sends notifications to the service manager named by ``NOTIFY_SOCKET`` (or does nothing)."""

    def __init__(self, env: Mapping[str, str] | None = None, *, pid: int | None = None) -> None:
        env = os.environ if env is None else env
        self.pid = os.getpid() if pid is None else pid
        self.address = socket_address(env.get(NOTIFY_SOCKET_ENV, ""))
        self.watchdog_s = watchdog_interval(env, self.pid) if self.address is not None else None
        self._sock: socket.socket | None = None
        self._failed_once = False
        self._last_status: str | None = None
        self.sent = 0

    @classmethod
    def take_from_environ(cls) -> Notifier:
        """A notifier for this process that also removes the variables from ``os.environ``.

        The socket is the daemon's to use: replicas inherit the daemon's environment, and a service
        calling sd_notify itself must not speak for the daemon (nor ping its watchdog).
        """
        env = {key: os.environ.pop(key) for key in (NOTIFY_SOCKET_ENV, WATCHDOG_USEC_ENV, WATCHDOG_PID_ENV)
               if key in os.environ}
        return cls(env)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, fields: Mapping[str, str | int]) -> bool:
        """Send one datagram; False (logged the first time) when it could not be sent."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)  # a full receive queue must not block the loop
            self._sock.sendto(build_message(fields), self.address)
        except OSError as exc:
            if not self._failed_once:
                self._failed_once = True
                log.warning("cannot notify the service manager at %r: %s (further failures are not logged)",
                            self.address, exc)
            return False
        self.sent += 1
        return True

    def ready(self, status: str | None = None) -> None:
        fields: dict[str, str | int] = {"READY": 1}
        if status is not None:
            fields["STATUS"] = status
            self._last_status = status
        self.send(fields)

    def status(self, text: str) -> None:
        """``STATUS=text``, only when it differs from the last one sent."""
        if text != self._last_status:
            self._last_status = text
            self.send({"STATUS": text})

    def watchdog(self) -> None:
        self.send({"WATCHDOG": 1})

    def stopping(self, status: str = "stopping") -> None:
        self._last_status = status
        self.send({"STOPPING": 1, "STATUS": status})

    def reloading(self) -> None:
        # Type=notify-reload wants the CLOCK_MONOTONIC time of the reload's start with it.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send({"RELOADING": 1, "MONOTONIC_USEC": usec, "STATUS": "reloading the configuration"})
        self._last_status = "reloading the configuration"

    async def run_watchdog(self) -> None:
        """Ping every ``WATCHDOG_USEC / 2`` for as long as this loop turns (returns at once if off)."""
        interval = self.watchdog_s
        if interval is None:
            return
        while True:
            self.watchdog()
            # A timer is the contract here: systemd expects a ping per period.
            await asyncio.sleep(interval)

    async def run_status(self, counts: Callable[[], ServiceCounts], changes: Callable[[], object]) -> None:
        """Send ``STATUS=`` whenever ``counts()`` changes, looked at most every STATUS_CHECK_INTERVAL.

        ``changes()`` is a cheap change marker (the supervisor's status counter): the counts are
        only recomputed when it moved, so an idle kernel does no work here.
        """
        if self.address is None:
            return
        seen: object = None
        while True:
            marker = changes()
            if marker != seen:
                seen = marker
                self.status(counts().line())
            await asyncio.sleep(STATUS_CHECK_INTERVAL)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
