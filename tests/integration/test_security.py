"""ipc security: the runtime directory's permissions, ``ipc_role``, and adding services at run time."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from protocols.errors import ErrorCode, RemoteError
from microkernel.client import Client
from microkernel.security.audit import parse_line
from tests.integration.conftest import REPO_ROOT, kernel_env, start_kernel

NOBODY = 65534
ECHO = 'entry = "tests.fixtures.echo:Echo"'


def _audit(path: Path) -> list[dict]:
    return [line for line in map(parse_line, path.read_text().splitlines()) if line is not None]


def test_ipc_readers_may_look_while_replicas_still_start_and_become_ready(short_tmp: str) -> None:
    config = f'[security]\nipc_role = "reader"\naudit_log = "{short_tmp}/audit.log"\n\n[services.echo]\n{ECHO}\n'
    with start_kernel(config, short_tmp) as kernel, Client(runtime_dir=kernel.runtime_dir) as client:
        # readiness, heartbeats and progress come from the replicas themselves: they still work
        assert client.wait_ready("echo", timeout=30)["ready_replicas"] == 1
        assert client.call("echo", "echo", text="hi")["text"] == "hi"
        for attempt in (lambda: client.stop("echo"), lambda: client.shutdown(),
                        lambda: client.add_service("e2", command=["sleep", "60"])):
            with pytest.raises(RemoteError) as err:
                attempt()
            assert err.value.code is ErrorCode.FORBIDDEN
        assert err.value.reason == "role reader may not add a service with a command line; needs admin"
        assert client.status("echo")["services"][0]["state"] == "ready"
    lines = _audit(Path(short_tmp) / "audit.log")
    assert [(line["peer"], line["role"], line["msg_type"], line["decision"]) for line in lines] == [
        ("ipc:client", "reader", "stop_request", "denied"),
        ("ipc:client", "reader", "shutdown_request", "denied"),
        ("ipc:client", "reader", "add_service_request", "denied"),
    ]


def test_operators_add_known_entries_but_never_command_lines(short_tmp: str) -> None:
    config = f'[security]\nipc_role = "operator"\n\n[services.echo]\n{ECHO}\n'
    with start_kernel(config, short_tmp) as kernel, Client(runtime_dir=kernel.runtime_dir) as client:
        # an entry configured for another service: allowed, validated, started
        assert client.add_service("echo2", entry="tests.fixtures.echo:Echo", replicas=2)["name"] == "echo2"
        assert client.wait_ready("echo2", timeout=30)["ready_replicas"] == 2
        for kwargs, needs in (
            ({"command": [sys.executable, "-c", "print('pwned')"]}, "a command line"),
            ({"entry": "tests.fixtures.crashy:Crashy"}, "entry 'tests.fixtures.crashy:Crashy'"),
            ({"entry": "tests.fixtures.echo:Echo", "options": {"env": {"LD_PRELOAD": "/tmp/x.so"}}}, "env set"),
        ):
            with pytest.raises(RemoteError) as err:
                client.add_service("bad", **kwargs)
            assert err.value.code is ErrorCode.FORBIDDEN and needs in err.value.reason and "needs admin" in err.value.reason
        # validated like the configuration file: errors name the key
        with pytest.raises(RemoteError) as err:
            client.add_service("echo3", entry="tests.fixtures.echo:Echo", options={"restrt": "never"})
        assert err.value.code is ErrorCode.INVALID_FIELD and "services.echo3.restrt" in err.value.reason
        assert client.remove_service("echo2") == {"name": "echo2"}
        assert [s["name"] for s in client.list()] == ["echo"]
        # the same through mkctl
        done = _mkctl(kernel.runtime_dir, "add", "web", "--command", "python", "-m", "http.server")
        assert done.returncode == 1 and "forbidden" in done.stderr and "needs admin" in done.stderr
        done = _mkctl(kernel.runtime_dir, "add", "greeter", "--entry", "greeter", "--options", '{"autostart": false}')
        assert done.returncode == 0, done.stderr
        assert _mkctl(kernel.runtime_dir, "remove", "greeter").returncode == 0
        assert [s["name"] for s in client.list()] == ["echo"]


def _mkctl(runtime_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "microkernel.cli", "--runtime-dir", str(runtime_dir), *args],
                          cwd=REPO_ROOT, env=kernel_env(), capture_output=True, text=True, timeout=60)


def test_the_runtime_dir_is_private(short_tmp: str) -> None:
    os.makedirs(Path(short_tmp) / "rt", mode=0o777)
    os.chmod(Path(short_tmp) / "rt", 0o777)  # group/world-accessible before the kernel starts
    with start_kernel("", short_tmp) as kernel:
        rt = kernel.runtime_dir
        assert stat.S_IMODE(rt.stat().st_mode) == 0o700
        assert stat.S_IMODE((rt / "svc").stat().st_mode) == 0o700
        assert stat.S_ISSOCK((rt / "control.sock").stat().st_mode)
        if os.getuid() == 0:  # another user cannot reach the sockets inside
            for name in ("control.sock", "events.sock", "events-in.sock"):
                # Even a socket file anyone may write to (a permissive umask) stays out of reach:
                # the directory alone keeps other users out.
                os.chmod(rt / name, 0o777)
                assert _connect_as(NOBODY, rt / name) == "denied", f"{name} is reachable by uid {NOBODY}"


def _connect_as(uid: int, path: Path) -> str:
    """Try to connect to the unix socket ``path`` as ``uid`` (in a forked child: the venv's
    interpreter is not necessarily executable by that user)."""
    pid = os.fork()
    if pid == 0:  # the child: only system calls, then _exit
        code = 2
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            probe = socket.socket(socket.AF_UNIX)
            try:
                probe.connect(str(path))
                code = 0
            except PermissionError:
                code = 13
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return {0: "connected", 13: "denied"}.get(os.waitstatus_to_exitcode(status), "error")


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give a directory away")
def test_the_kernel_refuses_a_runtime_dir_owned_by_someone_else(short_tmp: str) -> None:
    rt = Path(short_tmp) / "rt"
    rt.mkdir(mode=0o700)
    os.chown(rt, NOBODY, NOBODY)
    done = subprocess.run([sys.executable, "-m", "microkernel", "--runtime-dir", str(rt)], cwd=REPO_ROOT,
                          env=kernel_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert f"belongs to uid {NOBODY}" in done.stderr
    assert not (rt / "control.sock").exists()
