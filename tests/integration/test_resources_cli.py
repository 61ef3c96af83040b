"""``mkctl top``, ``mkctl leases`` and the resources line of ``mkctl status``, end to end on declared devices."""

from __future__ import annotations

import json

from microkernel.client import AsyncClient, Client
from tests.integration.conftest import start_kernel
from tests.integration.test_client import mkctl, run_async
from tests.integration.test_resources_leases import DEVICES
from tests.integration.test_resources_memory import MEMHOG, sampling_rounds, until
from tests.integration.test_supervisor import CEILING

GIB = 1024**3
MIB = 1024**2


def test_top_and_leases_on_a_cpu_only_host(short_tmp: str) -> None:
    config = DEVICES + f"""
[kernel]
memory_sample_interval = "50ms"

[services.trainer]
{MEMHOG}
memory = "512MiB"
gpu = {{ count = 1, memory = "2GiB", mode = "shared" }}

[services.web]
{MEMHOG}
replicas = 2
"""
    with start_kernel(config, short_tmp) as k, Client(runtime_dir=k.runtime_dir) as c:
        c.wait_ready("trainer", timeout=CEILING)
        c.wait_ready("web", timeout=CEILING)
        first = sampling_rounds(c)
        until(lambda: sampling_rounds(c) >= first + 2, "two sampling rounds (a CPU figure needs two)")
        client_lease = c.acquire_lease(1)["lease"]

        top = mkctl(k, "--json", "top")
        assert top.returncode == 0, top.stderr
        rows = {f"{r['service']}[{r['replica']}]": r for r in json.loads(top.stdout)}
        assert set(rows) == {"trainer[0]", "web[0]", "web[1]"}
        trainer = rows["trainer[0]"]
        assert trainer["state"] == "ready" and trainer["rss"] > 10 * MIB and trainer["rss_budget"] == 512 * MIB
        assert trainer["threads"] >= 1 and trainer["cpu_percent"] is not None
        assert trainer["gpu_devices"] == 1 and trainer["gpu_budget"] == 2 * GIB
        assert trainer["gpu_memory"] is None  # nobody sees device memory without NVML
        assert rows["web[1]"]["gpu_devices"] == 0 and rows["web[1]"]["rss_budget"] is None

        human = mkctl(k, "top", "-n", "1")
        assert human.returncode == 0, human.stderr
        assert "trainer[0]" in human.stdout and "? / 2 GiB" in human.stdout and "/ 512 MiB" in human.stdout

        leases = mkctl(k, "--json", "leases")
        assert leases.returncode == 0, leases.stderr
        view = json.loads(leases.stdout)
        assert view["source"] == "declared" and [d["uuid"] for d in view["devices"]] == ["GPU-aaaa", "GPU-bbbb"]
        holders = {lease["holder"]: lease for lease in view["leases"]}
        assert holders["trainer/0"]["memory"] == 2 * GIB and holders["trainer/0"]["pid"] == trainer["pid"]
        assert client_lease["id"] in [lease["id"] for lease in view["leases"]]
        assert sum(d["free"] for d in view["devices"]) == 16 * GIB + 8 * GIB - 2 * GIB - view["devices"][0]["used"]

        text = mkctl(k, "leases")
        assert text.returncode == 0, text.stderr
        assert "GPU inventory: 2 devices (declared)" in text.stdout
        assert "trainer/0" in text.stdout and "GPU-bbbb" in text.stdout

        status = mkctl(k, "status")
        assert status.returncode == 0, status.stderr
        assert "cgroups: off (" in status.stdout and "thread pool" in status.stdout
        assert "memory pool 512 MiB of" in status.stdout

        async def through_the_async_client() -> tuple[list, dict]:
            async with AsyncClient(runtime_dir=k.runtime_dir) as ac:
                lease = await ac.acquire_lease(1, "1GiB", "shared", timeout=0)
                assert await ac.release_lease(lease["lease"]["id"]) is True
                return await ac.top(), await ac.leases()

        rows_async, view_async = run_async(through_the_async_client())
        assert {r["service"] for r in rows_async} == {"trainer", "web"}
        assert len(view_async["leases"]) == 2
