"""Reload (``mkctl reload`` and SIGHUP): only the difference is applied; an invalid file changes nothing."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from typing import Any

import pytest

from microkernel.client import AsyncClient, Client, RemoteError
from tests.integration.conftest import REPO_ROOT, kernel_env
from tests.integration.sd_notify import CEILING, Daemon, run_daemon

ECHO = 'entry = "tests.fixtures.echo:Echo"'
SLEEP = 'command = ["sleep", "3600"]'  # cheaper to start than an interpreter

BEFORE = f"""
[services.store]
{ECHO}

[services.api]
{ECHO}
depends_on = ["store"]

[services.batch]
{SLEEP}

[services.old]
{SLEEP}

[services.later]
{SLEEP}
autostart = false
"""

# api: changed (env); batch: scaled; old: removed; new: added; later: autostart turned on; store: unchanged.
AFTER = f"""
[services.store]
{ECHO}

[services.api]
{ECHO}
depends_on = ["store"]
env = {{ API_MODE = "v2" }}

[services.batch]
{SLEEP}
replicas = 2

[services.new]
{ECHO}
depends_on = ["store"]

[services.later]
{SLEEP}
"""


def mkctl(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "microkernel.cli", "--runtime-dir", str(d.runtime_dir), *args],
                          cwd=REPO_ROOT, env=kernel_env(), capture_output=True, text=True, timeout=CEILING)


def pids(c: Client) -> dict[str, list[int]]:
    """Every service's replica pids (None for a replica without a process)."""
    return {s["name"]: [r["pid"] for r in s["replicas"]] for s in c.status()["services"]}


def wait_all_ready(c: Client, names: list[str]) -> None:
    for name in names:
        c.wait_ready(name, timeout=CEILING)


def test_mkctl_reload_applies_only_the_difference(short_tmp: str) -> None:
    with run_daemon(short_tmp, BEFORE) as d, Client(runtime_dir=d.runtime_dir) as c:
        before = pids(c)
        assert d.config is not None
        d.config.write_text(AFTER)
        with c.events("kernel.reloaded") as events:
            result = mkctl(d, "reload", "--json")
            assert result.returncode == 0, result.stderr
            reply = json.loads(result.stdout)
            event = events.next_event(CEILING)
        assert reply["source"] == str(d.config)
        assert (reply["started"], reply["stopped"], reply["restarted"], reply["scaled"]) == (
            ["new", "later"], ["old"], ["api"], ["batch"])
        assert reply["unchanged"] == 1 and reply["warnings"] == [] and reply["updated"] == []
        assert event is not None and event.msg_type == "kernel.reloaded"
        assert event.message.started == ["new", "later"] and event.message.stopped == ["old"]

        wait_all_ready(c, ["store", "api", "batch", "new", "later"])
        after = pids(c)
        assert list(after) == ["store", "api", "batch", "new", "later"]  # the new start order
        assert after["store"] == before["store"]  # unchanged: same process
        assert after["batch"][0] == before["batch"][0] and len(after["batch"]) == 2  # scaled, not restarted
        assert after["api"] != before["api"]  # changed: restarted
        api_env = c.call("api", "origin", names=["API_MODE"])["env"]
        assert api_env == {"API_MODE": "v2"}

        # The same services again, with a [kernel] setting that needs a restart: reported, not applied.
        d.config.write_text('[kernel]\nheartbeat_interval = "2s"\nlog_level = "debug"\n' + AFTER)
        again = c.reload()
        assert (again["started"], again["stopped"], again["restarted"], again["scaled"]) == ([], [], [], [])
        assert again["unchanged"] == 5
        assert again["warnings"] == ["kernel.heartbeat_interval changed but needs a restart of microkerneld "
                                     "to apply; keeping the running value"]
        assert c.reload()["warnings"] == again["warnings"]  # still not applied, still said
        assert pids(c) == after


INVALID = [
    ("[services.store\n", "invalid TOML"),
    (BEFORE + '\n[services.loop1]\nentry = "x:Y"\ndepends_on = ["loop2"]\n'
              '[services.loop2]\nentry = "x:Y"\ndepends_on = ["loop1"]\n', "cycle"),
    (BEFORE.replace("[services.store]\n" + ECHO + "\n", ""), "services.api.depends_on: unknown service 'store'"),
    (BEFORE.replace("[services.batch]\n", "[services.batch]\nreplicas = -1\n"), "services.batch.replicas"),
]


def test_an_invalid_config_is_rejected_and_nothing_changes(short_tmp: str) -> None:
    with run_daemon(short_tmp, BEFORE) as d, Client(runtime_dir=d.runtime_dir) as c:
        before = pids(c)
        assert d.config is not None
        for i, (text, expected) in enumerate(INVALID):
            d.config.write_text(text)
            if i == 0:  # as the operator sees it
                result = mkctl(d, "reload")
                assert result.returncode == 1
                message = result.stderr
                assert message.startswith("mkctl: error: invalid_config:")
            else:
                with pytest.raises(RemoteError) as info:
                    c.reload()
                assert info.value.code.value == "invalid_config"
                message = info.value.reason
            assert expected in message and str(d.config) in message  # the file (and line) are named
            assert "nothing was changed" in message
            assert pids(c) == before
            assert {s["state"] for s in c.status()["services"]} == {"ready", "running", "stopped"}
        # The running configuration stays: a valid file later is compared with it, not with a bad one.
        d.config.write_text(BEFORE + f"\n[services.extra]\n{SLEEP}\n")
        assert c.reload()["started"] == ["extra"]


def test_sighup_reloads(short_tmp: str) -> None:
    with run_daemon(short_tmp, BEFORE) as d, Client(runtime_dir=d.runtime_dir) as c:
        before = pids(c)
        assert d.config is not None
        d.config.write_text(BEFORE + f"\n[services.added]\n{ECHO}\n")
        with c.events("kernel.reloaded") as events:
            d.proc.send_signal(signal.SIGHUP)
            event = events.next_event(CEILING)
        assert event is not None and event.message.started == ["added"]
        d.notify.wait_for("RELOADING")
        d.notify.wait_for("READY")
        c.wait_ready("added", timeout=CEILING)
        after = pids(c)
        assert {k: v for k, v in after.items() if k != "added"} == before

        # An invalid file on SIGHUP: logged, the daemon and its services carry on.
        d.config.write_text("[services.broken\n")
        d.proc.send_signal(signal.SIGHUP)
        d.notify.wait_for("RELOADING")
        d.notify.wait_for("READY")
        assert pids(c) == after
        assert "reload rejected, the running configuration stays" in d.output.read_text()


def test_concurrent_reloads_are_serialised(short_tmp: str) -> None:
    with run_daemon(short_tmp, BEFORE) as d:
        assert d.config is not None
        d.config.write_text(BEFORE + f"\n[services.added]\n{SLEEP}\n")

        async def both() -> list[dict[str, Any]]:
            async with AsyncClient(runtime_dir=d.runtime_dir) as c:
                return list(await asyncio.gather(c.reload(), c.reload(), c.reload()))

        replies = asyncio.run(both())
        assert sorted(len(r["started"]) for r in replies) == [0, 0, 1]
        assert sorted(r["unchanged"] for r in replies) == [5, 6, 6]


def test_without_a_config_file_there_is_nothing_to_reload(short_tmp: str) -> None:
    with run_daemon(short_tmp, None) as d, Client(runtime_dir=d.runtime_dir) as c:
        with pytest.raises(RemoteError) as info:
            c.reload()
        assert info.value.code.value == "bad_state"
        assert "started without --config" in info.value.reason


def test_a_group_change_restarts_every_member_only(short_tmp: str) -> None:
    grouped = BEFORE + '\n[groups.core]\nstrategy = "one_for_all"\nservices = ["store", "api"]\n'
    with run_daemon(short_tmp, grouped) as d, Client(runtime_dir=d.runtime_dir) as c:
        before = pids(c)
        assert d.config is not None
        d.config.write_text(grouped.replace("one_for_all", "rest_for_one"))
        reply = c.reload()
        assert sorted(reply["restarted"]) == ["api", "store"] and reply["unchanged"] == 3
        wait_all_ready(c, ["store", "api"])
        after = pids(c)
        assert after["batch"] == before["batch"] and after["old"] == before["old"]
        assert after["store"] != before["store"] and after["api"] != before["api"]
        # Leaving the group changes the leaver and the remaining member.
        d.config.write_text(BEFORE + '\n[groups.core]\nstrategy = "rest_for_one"\nservices = ["store", "batch"]\n')
        assert sorted(c.reload()["restarted"]) == ["api", "batch", "store"]


def test_a_removed_service_gives_back_its_memory_and_a_new_one_is_admitted(short_tmp: str) -> None:
    # The pool holds one 300 MiB budget, not two: "fresh" can only start once "big" gave its share back.
    pool = '[kernel]\nmemory_pool = "400MiB"\n\n'
    budget = 'memory = { hard = "300MiB" }\n'
    with run_daemon(short_tmp, f"{pool}[services.big]\n{SLEEP}\n{budget}") as d, Client(runtime_dir=d.runtime_dir) as c:
        assert d.config is not None
        d.config.write_text(f"{pool}[services.big]\n{SLEEP}\n{budget}[services.extra]\n{SLEEP}\n{budget}")
        refused = c.reload()
        assert refused["started"] == [] and refused["updated"] == ["extra"]
        assert refused["warnings"][0].startswith("extra: not started:")
        d.config.write_text(f"{pool}[services.fresh]\n{SLEEP}\n{budget}")
        reply = c.reload()
        assert sorted(reply["stopped"]) == ["big", "extra"] and reply["started"] == ["fresh"] and reply["warnings"] == []
        c.wait_ready("fresh", timeout=CEILING)
        assert c.status()["kernel"]["resources"]["memory"]["pool"]["used"] == 300 * 2**20


def test_services_added_or_removed_at_run_time(short_tmp: str) -> None:
    config = f'[services.a]\n{SLEEP}\n\n[services.b]\n{SLEEP}\ndepends_on = ["a"]\n'
    with run_daemon(short_tmp, config) as d, Client(runtime_dir=d.runtime_dir) as c:
        assert d.config is not None
        c.add_service("extra", command=["sleep", "3600"], options={"depends_on": ["a"]})
        c.wait_ready("extra", timeout=CEILING)
        before = pids(c)
        # Not in the file, and the file did not change: a reload leaves it alone.
        reply = c.reload()
        assert (reply["started"], reply["stopped"], reply["unchanged"]) == ([], [], 2)
        assert pids(c) == before
        # The file may not take away what the run-time addition depends on.
        d.config.write_text(f"[services.b]\n{SLEEP}\n")
        with pytest.raises(RemoteError) as info:
            c.reload()
        assert info.value.code.value == "invalid_config" and "'extra' (added at run time) depends on it" in info.value.reason
        assert pids(c) == before
        # A configured service removed at run time comes back: the file still has it.
        d.config.write_text(config)
        c.remove_service("b")
        assert c.reload()["started"] == ["b"]
        c.wait_ready("b", timeout=CEILING)
        assert pids(c)["extra"] == before["extra"]
