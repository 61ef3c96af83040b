"""The control plane and the event stream over tcp + CURVE: keys, roles, refusals and the audit log.

Each test runs a daemon listening on ipc and on two tcp ports of 127.0.0.1, with three authorized
client keys (``ci`` reader by default, ``alice`` operator, ``root`` admin) and one unauthorized
(``mallory``).
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import zmq.auth

from protocols.errors import ErrorCode, RemoteError
from microkernel.client import AsyncClient, Client, KernelUnavailable
from microkernel.security.audit import parse_line
from microkernel.security.keys import write_key_pair
from microkernel.supervisor.distributed import free_port
from tests.integration.conftest import REPO_ROOT, KernelHandle, kernel_env, start_kernel

STOP_CEILING = 30.0


class Setup(NamedTuple):
    kernel: KernelHandle
    control: str
    keys: Path
    audit: Path

    def client(self, name: str | None, timeout: float = 10.0) -> Client:
        if name is None:
            return Client(self.control, timeout=timeout)
        return Client(self.control, timeout=timeout, client_key=self.keys / f"{name}.key_secret",
                      server_key=self.keys / "server.key")

    def audit_lines(self) -> list[dict]:
        text = self.audit.read_text() if self.audit.exists() else ""
        return [line for line in map(parse_line, text.splitlines()) if line is not None]


@pytest.fixture
def secure(short_tmp: str) -> Iterator[Setup]:
    """A daemon with tcp control and events, CURVE keys, roles and an audit file."""
    workdir = Path(short_tmp)
    keys, authorized = workdir / "keys", workdir / "authorized"
    authorized.mkdir()
    for name in ("server", "ci", "alice", "root", "mallory"):
        write_key_pair(keys, name)
    for name in ("ci", "alice", "root"):
        shutil.copy(keys / f"{name}.key", authorized)
    control, events = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    config = f"""
[security]
control_tcp = "{control}"
events_tcp = "{events}"
server_secret_key = "{keys}/server.key_secret"
authorized_keys = "{authorized}"
roles = {{ alice = "operator", root = "admin" }}
audit_log = "{workdir}/audit.log"

[services.echo]
entry = "tests.fixtures.echo:Echo"
"""
    with start_kernel(config, workdir) as kernel:
        yield Setup(kernel, control, keys, workdir / "audit.log")


def test_a_client_without_an_authorized_key_gets_no_reply_and_is_audited(secure: Setup) -> None:
    with secure.client("mallory", timeout=2.0) as client, pytest.raises(KernelUnavailable) as err:
        client.ping()
    assert "is your key authorized" in err.value.reason
    mallory = zmq.auth.load_certificate(secure.keys / "mallory.key")[0].decode()
    refused = [line for line in secure.audit_lines() if line["decision"] == "refused"]
    assert any(line.get("key") == mallory and line["msg_type"] == "connect" for line in refused), refused
    # No CURVE at all: the handshake cannot even start.
    with secure.client(None, timeout=1.0) as client, pytest.raises(KernelUnavailable):
        client.ping()


def test_events_over_tcp_and_curve_and_an_operator_restarts(secure: Setup) -> None:
    with secure.client("alice") as client:
        with client.events("service.*") as stream:
            client.restart("echo", timeout=60)
            seen = []
            while "service.ready" not in seen:
                env = stream.next_event(30)
                assert env is not None, f"no service.ready over tcp within 30 s (saw {seen})"
                seen.append(env.msg_type)
        assert "service.stopping" in seen
    allowed = [line for line in secure.audit_lines() if line["decision"] == "allowed"]
    assert any(line["peer"] == "tcp:alice" and line["msg_type"] == "restart_request" for line in allowed)

    async def async_wait_ready() -> dict:  # the asyncio client too: wait_ready subscribes, then asks
        async with AsyncClient(secure.control, client_key=secure.keys / "ci.key_secret",
                               server_key=secure.keys / "server.key") as client:
            return await client.wait_ready("echo", timeout=30)

    assert asyncio.run(async_wait_ready())["name"] == "echo"
    # the ipc side of the same event socket is still plain (CURVE applies to the tcp bind only)
    with Client(runtime_dir=secure.kernel.runtime_dir) as local, local.events("service.*", since_seq=0) as stream:
        first = stream.next_event(30)
    assert first is not None and first.msg_type.startswith("service.")


def test_each_key_gets_exactly_its_roles_rights(secure: Setup) -> None:
    with secure.client("ci") as client:
        client.wait_ready("echo", timeout=30)
        assert [s["name"] for s in client.status()["services"]] == ["echo"]
        with pytest.raises(RemoteError) as err:
            client.stop("echo")
    assert err.value.code is ErrorCode.FORBIDDEN
    assert err.value.reason == "role reader may not stop services; needs operator"
    denied = [line for line in secure.audit_lines() if line["decision"] == "denied"]
    assert {"peer": "tcp:ci", "role": "reader", "msg_type": "stop_request", "service": "echo"}.items() <= denied[-1].items()

    # mkctl finds its keys in the environment
    env = kernel_env()
    env["MICROKERNEL_CLIENT_KEY"] = str(secure.keys / "ci.key_secret")
    env["MICROKERNEL_SERVER_KEY"] = str(secure.keys / "server.key")
    done = subprocess.run([sys.executable, "-m", "microkernel.cli", "--endpoint", secure.control, "status", "echo"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "echo" in done.stdout

    with secure.client("alice") as client:
        assert client.stop("echo", timeout=60)["service"] == "echo"
        with pytest.raises(RemoteError) as err:
            client.shutdown()
    assert err.value.code is ErrorCode.FORBIDDEN and err.value.reason.endswith("needs admin")

    with secure.client("root") as client:
        assert client.shutdown()["services"] == 1
    assert secure.kernel.proc.wait(timeout=STOP_CEILING) == 0
    allowed = [(line["peer"], line["msg_type"]) for line in secure.audit_lines() if line["decision"] == "allowed"]
    assert allowed == [("tcp:alice", "stop_request"), ("tcp:root", "shutdown_request")]
