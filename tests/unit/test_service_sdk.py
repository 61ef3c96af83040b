"""The SDK's pure parts: handler declarations, argument checking, result conversion."""

from __future__ import annotations

import logging
import sys
from typing import Any

import numpy as np
import pytest

from services.base import Service, rpc, subscribe
from services.environment import EnvironmentProblem, ReplicaEnvironment
from services.handlers import ArgSpec, declarations_of, portable
from services.logs import ReplicaFilter, ReplicaFormatter


def test_torch_tensors_in_results_become_numpy() -> None:
    class FakeTensor:  # quacks like torch.Tensor without importing torch
        def __init__(self, values: list[float]) -> None:
            self.values = values

        def detach(self) -> "FakeTensor":
            return self

        def cpu(self) -> "FakeTensor":
            return self

        def contiguous(self) -> "FakeTensor":
            return self

        def numpy(self) -> np.ndarray:
            return np.asarray(self.values, dtype=np.float32)

    FakeTensor.__module__ = "torch"
    out = portable({"t": FakeTensor([1.0, 2.0]), "nested": [FakeTensor([3.0])], "n": 1})
    np.testing.assert_array_equal(out["t"], np.array([1.0, 2.0], dtype=np.float32))
    np.testing.assert_array_equal(out["nested"][0], np.array([3.0], dtype=np.float32))
    assert out["n"] == 1


def test_decorators_and_declarations() -> None:
    class Base(Service):
        @rpc
        def a(self, x: int) -> int:
            return x

        @rpc(name="renamed")
        async def b(self) -> None: ...

        @subscribe("demo.*", "train.progress")
        def on(self, topic: str, data: dict[str, Any]) -> None: ...

    class Child(Base):
        def a(self, x: int) -> int:  # overridden without @rpc: no longer served
            return x

        @rpc
        def c(self, *, y: int = 0, **extra: Any) -> int:
            return y

    decl = declarations_of(Child)
    assert [(r.name, r.attr) for r in decl.rpcs] == [("c", "c"), ("renamed", "b")]
    assert decl.patterns == ["demo.*", "train.progress"]
    with pytest.raises(TypeError, match="both served as rpc 'x'"):
        class Clash(Service):
            @rpc(name="x")
            def one(self) -> None: ...

            @rpc(name="x")
            def two(self) -> None: ...
    with pytest.raises(TypeError, match="needs topic patterns"):
        subscribe(lambda self, t, d: None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reserved"):
        subscribe("_mk.welcome.x")
    assert ArgSpec(Child().c).problem({"y": 1, "z": 2}) is None  # **extra takes the rest
    assert "positional" in (ArgSpec(lambda x, /: x).problem({"x": 1}) or "")
    assert ArgSpec(Base().a).problem({}) == "missing a required argument: 'x'"


def test_environment_is_parsed_and_every_problem_reported() -> None:
    env = ReplicaEnvironment.from_environ({
        "MK_SERVICE": "echo", "MK_REPLICA": "1", "MK_INCARNATION": "3",
        "MK_CONTROL_ENDPOINT": "ipc:///r/control.sock", "MK_EVENTS_IN_ENDPOINT": "ipc:///r/events-in.sock",
        "MK_EVENTS_OUT_ENDPOINT": "ipc:///r/events.sock", "MK_ENDPOINT": "ipc:///r/svc/echo.1.3.sock",
        "MK_HEARTBEAT_INTERVAL": "0.5", "MK_CONFIG": '{"a": 1}', "MK_MAX_MESSAGE_SIZE": "1024",
        "MK_KERNEL_PID": "42",
    })
    assert (env.service, env.replica, env.incarnation, env.identity) == ("echo", 1, 3, "svc:echo.1.3")
    assert (env.heartbeat_interval, env.config, env.max_message_size, env.kernel_pid) == (0.5, {"a": 1}, 1024, 42)
    with pytest.raises(EnvironmentProblem) as info:
        ReplicaEnvironment.from_environ({"MK_SERVICE": "x", "MK_REPLICA": "one", "MK_HEARTBEAT_INTERVAL": "0",
                                         "MK_CONFIG": "[]"})
    problems = "\n".join(info.value.problems)
    assert "MK_INCARNATION" in problems and "MK_ENDPOINT" in problems
    assert "MK_REPLICA='one' is not an integer" in problems
    assert "MK_HEARTBEAT_INTERVAL" in problems and "MK_CONFIG must be a JSON object" in problems


def test_log_lines_carry_the_replica_on_every_physical_line() -> None:
    record = logging.LogRecord("microkernel.service.echo", logging.ERROR, __file__, 1, "boom %s", ("x",), None)
    try:
        raise ValueError("inner")
    except ValueError:
        record.exc_info = sys.exc_info()
    ReplicaFilter("echo", 2).filter(record)
    lines = ReplicaFormatter().format(record).splitlines()
    assert lines[0].endswith(" ERROR echo[2] boom x")
    assert all(" ERROR echo[2] " in line for line in lines)
    assert lines[-1].endswith("| ValueError: inner")
    other = logging.LogRecord("microkernel.transport", logging.INFO, __file__, 1, "hi", (), None)
    ReplicaFilter("echo", 2).filter(other)
    assert ReplicaFormatter().format(other).endswith(" INFO echo[2] microkernel.transport: hi")
