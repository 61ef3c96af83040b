"""The warm standby: a pre-started runner becomes the next replica, exactly like a fresh process.

Every wait is on a kernel event or a process exit, with a generous ceiling.
"""

from __future__ import annotations

import os
import signal

import psutil

from microkernel.client import Client
from tests.integration.conftest import start_kernel
from tests.integration.test_supervisor import CEILING, is_event, wait_event
from tests.processes import assert_all_gone

ECHO = """
[services.echo]
entry = "tests.fixtures.echo:Echo"
backoff = { initial = "0s" }
config = { greeting = "hi" }
"""


def standby_pid(client: Client, *, previous: int | None = None) -> int:
    """The pid of the standby runner (other than ``previous``), from ``standby.ready`` events.

    The standby starts in the background, so the kernel's event history is replayed from the start.
    """
    with client.events("standby.ready", since_seq=0) as stream:
        env = wait_event(stream, lambda e: e.message.pid != previous)
    return env.message.pid


def test_a_restarted_replica_is_the_standby_with_its_own_environment(short_tmp: str) -> None:
    with start_kernel(ECHO, short_tmp) as k, Client(runtime_dir=k.runtime_dir, timeout=CEILING) as c:
        c.wait_ready("echo", timeout=CEILING)
        first = c.call("echo", "origin", names=["MK_INCARNATION"])
        waiting = standby_pid(c)
        assert waiting != first["pid"]
        with c.events("service.*") as stream:
            os.kill(first["pid"], signal.SIGKILL)
            wait_event(stream, is_event("service.ready", "echo", incarnation=2))
        info = c.call("echo", "origin", names=["MK_SERVICE", "MK_INCARNATION", "MK_CONFIG", "MK_ENTRY"])
        assert info["pid"] == waiting  # the standby became the replica
        assert info["env"] == {"MK_SERVICE": "echo", "MK_INCARNATION": "2", "MK_CONFIG": '{"greeting": "hi"}',
                               "MK_ENTRY": "tests.fixtures.echo:Echo"}
        assert info["cwd"] == first["cwd"] and info["path0"] == first["path0"]
        assert info["stdin"] == "/dev/null"
        summary = c.status()["kernel"]["standby"]
        assert summary["enabled"] and summary["taken"] >= 1
        # The kernel keeps the replica's process group: stopping the service kills the whole tree.
        c.stop("echo")
        assert_all_gone([waiting], timeout=CEILING)


def test_a_service_with_its_own_interpreter_settings_starts_cold(short_tmp: str) -> None:
    config = ECHO + '\n[services.tuned]\nentry = "tests.fixtures.echo:Echo"\nenv = { PYTHONHASHSEED = "7" }\nautostart = false\n'
    with start_kernel(config, short_tmp) as k, Client(runtime_dir=k.runtime_dir, timeout=CEILING) as c:
        c.wait_ready("echo", timeout=CEILING)
        waiting = standby_pid(c)
        c.start("tuned")
        info = c.call("tuned", "origin", names=["PYTHONHASHSEED"])
        assert info["env"] == {"PYTHONHASHSEED": "7"}
        assert info["pid"] != waiting  # not equivalent to the standby: a fresh process
        assert standby_pid(c) == waiting  # and the standby is still there for the next one


def test_a_dead_standby_is_replaced_and_starts_fall_back_to_cold(short_tmp: str) -> None:
    with start_kernel(ECHO, short_tmp) as k, Client(runtime_dir=k.runtime_dir, timeout=CEILING) as c:
        c.wait_ready("echo", timeout=CEILING)
        waiting = standby_pid(c)
        os.kill(waiting, signal.SIGKILL)
        assert_all_gone([waiting], timeout=CEILING)
        pid = c.status("echo")["services"][0]["replicas"][0]["pid"]
        with c.events("service.*") as stream:
            os.kill(pid, signal.SIGKILL)
            wait_event(stream, is_event("service.ready", "echo", incarnation=2))
        assert c.call("echo", "origin", names=[])["pid"] != waiting
        standby_pid(c, previous=waiting)


def test_standby_can_be_turned_off(short_tmp: str) -> None:
    with start_kernel('[kernel]\nstandby = false\n' + ECHO, short_tmp) as k, Client(runtime_dir=k.runtime_dir, timeout=CEILING) as c:
        c.wait_ready("echo", timeout=CEILING)
        assert c.status()["kernel"]["standby"] is None
        kernel = psutil.Process(c.status()["kernel"]["pid"])
        assert not any("--standby" in p.cmdline() for p in kernel.children())


def test_shutdown_leaves_no_standby_behind(short_tmp: str) -> None:
    with start_kernel(ECHO, short_tmp) as k, Client(runtime_dir=k.runtime_dir, timeout=CEILING) as c:
        c.wait_ready("echo", timeout=CEILING)
        waiting = standby_pid(c)
        c.shutdown()
    assert_all_gone([waiting], timeout=CEILING)
