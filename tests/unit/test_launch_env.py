"""The environment a replica (and the warm standby) starts with."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocols.endpoints import KernelEndpoints
from microkernel.supervisor.launch import environment_for, standby_environment
from microkernel.supervisor.spec import ServiceSpec


def _env(spec: ServiceSpec) -> dict[str, str]:
    env, _ = environment_for(spec, replica=0, incarnation=1, runtime_dir=Path("/tmp/mk-x"),
                             endpoints=KernelEndpoints.in_runtime_dir("/tmp/mk-x"), heartbeat_interval=1.0,
                             max_message_size=1 << 20, log_level="info")
    return env


def test_python_output_is_unbuffered_unless_someone_says_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    # The pipes to the kernel's log capture would otherwise hold a print() back until 8 KiB fill.
    assert _env(ServiceSpec(name="a", entry="m:C"))["PYTHONUNBUFFERED"] == "1"
    assert standby_environment()["PYTHONUNBUFFERED"] == "1"  # so the standby can still serve it
    assert _env(ServiceSpec(name="a", entry="m:C", env={"PYTHONUNBUFFERED": ""}))["PYTHONUNBUFFERED"] == ""
    monkeypatch.setenv("PYTHONUNBUFFERED", "0")  # the daemon's own environment wins over our default
    assert _env(ServiceSpec(name="a", entry="m:C"))["PYTHONUNBUFFERED"] == "0"
    assert standby_environment()["PYTHONUNBUFFERED"] == "0"
