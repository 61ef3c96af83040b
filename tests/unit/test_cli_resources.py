"""What ``mkctl top``, ``mkctl leases`` and the status resources line print, from plain reply data."""

from __future__ import annotations

from microkernel import cli
from microkernel.cli_resources import leases_text, resources_line, top_table
from microkernel.client_base import lease_acquire, top_rows

GIB = 1024**3
MIB = 1024**2

STATUS = {
    "kernel": {},
    "services": [
        {
            "name": "trainer",
            "resources": {"memory": {"soft": 400 * MIB, "hard": 512 * MIB}, "priority": 0, "cpus": None, "gpu": None},
            "replicas": [
                {"replica": 0, "incarnation": 2, "state": "ready", "pid": 42, "restarts": 1, "uptime_s": 65.0,
                 "usage": {"pid": 42, "rss": 300 * MIB, "processes": 2, "threads": 9, "cpu_percent": 12.5},
                 "leases": [{"id": "lease-1", "devices": ["GPU-a"], "memory": 2 * GIB}],
                 "cpus": [1], "gpu_memory": None},
            ],
        },
        {
            "name": "web",
            "resources": {"memory": None},
            "replicas": [{"replica": 0, "incarnation": 0, "state": "stopped", "pid": None, "restarts": 0,
                          "uptime_s": 0.0, "usage": None, "leases": [], "cpus": None, "gpu_memory": {}}],
        },
    ],
}


def test_top_rows_and_table() -> None:
    trainer, web = top_rows(STATUS)
    assert trainer == {
        "service": "trainer", "replica": 0, "incarnation": 2, "state": "ready", "pid": 42, "cpu_percent": 12.5,
        "rss": 300 * MIB, "rss_budget": 512 * MIB, "threads": 9, "processes": 2, "cpus": [1], "gpu_devices": 1,
        "gpu_memory": None, "gpu_budget": 2 * GIB, "restarts": 1, "uptime_s": 65.0,
    }
    assert web["rss"] is None and web["gpu_memory"] == 0 and web["gpu_devices"] == 0
    lines = top_table([trainer, web]).splitlines()
    assert lines[0].split()[:4] == ["REPLICA", "STATE", "PID", "CPU%"]
    assert "trainer[0]" in lines[1] and "12.5" in lines[1] and "300 MiB / 512 MiB" in lines[1]
    assert "? / 2 GiB" in lines[1] and "1m05s" in lines[1]
    assert top_table([]) == "no replicas"


def test_leases_text() -> None:
    view = {
        "source": "declared",
        "skipped": {"nvml": "not installed"},
        "devices": [{"uuid": "GPU-a", "name": "fake", "memory_total": 8 * GIB, "used": 2 * GIB, "free": 6 * GIB,
                     "leases": ["lease-1"], "exclusive": False}],
        "leases": [{"id": "lease-1", "holder": "t/0", "pid": 42, "devices": ["GPU-a"], "memory": 2 * GIB,
                    "mode": "shared", "priority": 0}],
        "waiters": [{"position": 0, "holder": "bob@00", "pid": None, "count": 1, "memory": 0, "mode": "exclusive",
                     "priority": 0, "timeout": 5.0}],
    }
    text = leases_text(view)
    assert text.startswith("GPU inventory: 1 device (declared)\n  nvml: not installed")
    assert "GPU-a" in text and "6 GiB" in text and "t/0" in text and "bob@00" in text and "whole" in text
    assert "no leases" in leases_text({"source": "none", "devices": [], "leases": [], "waiters": []})


def test_resources_line_says_why_cgroups_are_off() -> None:
    kernel = {"thread_pool_size": 4, "resources": {
        "memory": {"sampling": True, "sample_interval_s": 0.25, "pool": {"used": 0, "capacity": GIB}},
        "cgroups": {"available": False, "reason": "cgroup v1 only"},
        "gpu": {"devices": 2, "source": "declared", "leases": 1}}}
    line = resources_line(kernel)
    assert line == ("resources: memory pool 0 B of 1 GiB  sampling every 250ms  cgroups: off (cgroup v1 only)  "
                    "GPUs 2 (declared), 1 leased  thread pool 4")


def test_lease_request_parses_sizes_and_waits_longer_than_the_queue() -> None:
    request, wait = lease_acquire(2, "8GiB", "shared", 1, 5.0, None, 10.0)
    assert (request.count, request.memory, request.mode, request.priority, request.timeout) == (2, 8 * GIB, "shared", 1, 5.0)
    assert wait > 5.0
    assert lease_acquire(1, 0, "exclusive", 0, None, 7, 10.0)[1] == 10.0


def test_top_and_leases_arguments() -> None:
    args = cli.parse_args(["top", "-i", "0.5", "-n", "2"])
    assert (args.command, args.interval, args.count, args.json) == ("top", 0.5, 2, False)
    assert cli.parse_args(["--json", "leases"]).json is True
