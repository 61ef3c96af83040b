"""sd_notify: the datagrams, the addresses, the watchdog period, the status line, and real sends."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from microkernel.notify import (
    Notifier,
    ServiceCounts,
    build_message,
    count_states,
    socket_address,
    watchdog_interval,
)


def test_messages_are_key_value_lines_in_order() -> None:
    assert build_message({"READY": 1, "STATUS": "3 services"}) == b"READY=1\nSTATUS=3 services\n"
    assert build_message({"WATCHDOG": 1}) == b"WATCHDOG=1\n"


def test_a_value_never_smuggles_in_a_second_assignment() -> None:
    assert build_message({"STATUS": "ok\nREADY=1"}) == b"STATUS=ok\n"


@pytest.mark.parametrize("key", ["", "A=B", "A\nB"])
def test_invalid_keys_are_refused(key: str) -> None:
    with pytest.raises(ValueError):
        build_message({key: 1})


def test_socket_addresses() -> None:
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@sd-notify-123") == b"\0sd-notify-123"
    assert socket_address("") is None
    assert socket_address("vsock:2:1234") is None


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"WATCHDOG_USEC": "200000"}, 0.1),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "43"}, None),  # another process pings
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec_for_our_pid_only(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env, 42) == expected


def test_status_line_counts() -> None:
    counts = count_states([("ready", 2), ("running", 1), ("failed", 0), ("stopped", 0), ("backoff", 0),
                           ("ready", 9)])
    assert counts == ServiceCounts(services=6, running=3, failed=1, stopped=1, starting=1, replicas_ready=12)
    assert counts.line() == "6 services: 3 running, 1 starting, 1 failed, 1 stopped; 12 replicas ready"
    assert count_states([("ready", 1)]).line() == "1 service: 1 running; 1 replica ready"
    assert count_states([]).line() == "0 services; 0 replicas ready"


def test_without_notify_socket_everything_is_a_no_op() -> None:
    notifier = Notifier({})
    assert not notifier.enabled and notifier.watchdog_s is None
    notifier.ready("x")
    notifier.stopping()
    notifier.reloading()
    assert notifier.sent == 0


@pytest.fixture
def receiver(short_tmp: str) -> Iterator[tuple[str, socket.socket]]:
    path = str(Path(short_tmp) / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10.0)
    try:
        yield path, sock
    finally:
        sock.close()


def _fields(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().splitlines())


def test_notifications_reach_a_real_datagram_socket(receiver: tuple[str, socket.socket]) -> None:
    path, sock = receiver
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"}, pid=os.getpid())
    assert notifier.watchdog_s == 0.5
    notifier.ready("2 services: 2 running; 2 replicas ready")
    assert _fields(sock.recv(4096)) == {"READY": "1", "STATUS": "2 services: 2 running; 2 replicas ready"}
    notifier.status("2 services: 2 running; 2 replicas ready")  # unchanged: not sent again
    notifier.status("2 services: 1 running, 1 failed; 1 replica ready")
    assert _fields(sock.recv(4096)) == {"STATUS": "2 services: 1 running, 1 failed; 1 replica ready"}
    notifier.reloading()
    reloading = _fields(sock.recv(4096))
    assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
    notifier.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1\n"
    notifier.stopping("stopping: SIGTERM")
    assert _fields(sock.recv(4096)) == {"STOPPING": "1", "STATUS": "stopping: SIGTERM"}
    notifier.close()


def test_abstract_namespace_socket() -> None:
    name = f"mk-test-notify-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(10.0)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": f"@{name}"})
        notifier.ready()
        assert sock.recv(4096) == b"READY=1\n"
        notifier.close()
    finally:
        sock.close()


def test_send_failures_are_logged_once_and_never_raise(short_tmp: str, caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(Path(short_tmp) / "nobody-listens.sock")})
    with caplog.at_level(logging.WARNING, logger="microkernel.notify"):
        notifier.ready()
        notifier.watchdog()
        notifier.stopping()
    assert notifier.sent == 0
    assert len([r for r in caplog.records if "cannot notify" in r.getMessage()]) == 1
    notifier.close()
