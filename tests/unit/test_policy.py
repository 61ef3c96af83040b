"""Pure supervision decisions: restart or not, which siblings, in which order; and exit reasons."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from microkernel.supervisor.policy import (
    DependencyCycle,
    UnknownDependency,
    dependencies_of,
    dependents_of,
    should_restart,
    siblings_to_restart,
    start_order,
)
from microkernel.supervisor.reasons import EXIT_KINDS, ExitReason
from microkernel.supervisor.spec import GroupSpec, RestartType, ServiceSpec, Strategy


def services(**deps: tuple[str, ...]) -> dict[str, ServiceSpec]:
    """Specs in keyword order, each depending on the given names."""
    return {name: ServiceSpec(name=name, command=(name,), depends_on=on) for name, on in deps.items()}


# --- exit reasons -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rc", "requested", "kind", "code", "signal", "text"),
    [
        (0, None, "exit", 0, None, "exit(0)"),
        (1, None, "exit", 1, None, "exit(1)"),
        (-9, None, "signal", None, 9, "signal(9)"),
        (-15, "stopped", "stopped", None, 15, "stopped"),
        (-9, "heartbeat", "heartbeat", None, 9, "heartbeat"),
        (0, "stopped", "stopped", 0, None, "stopped"),
        (-9, "start_timeout", "start_timeout", None, 9, "start_timeout"),
        (-9, "budget", "budget", None, 9, "budget"),
        (-9, "oom", "oom", None, 9, "oom"),
    ],
)
def test_exit_reason_from_returncode(
    rc: int, requested: str | None, kind: str, code: int | None, signal: int | None, text: str
) -> None:
    reason = ExitReason.from_returncode(rc, requested=requested)
    assert (reason.kind, reason.code, reason.signal, str(reason)) == (kind, code, signal, text)


@pytest.mark.parametrize(
    ("reason", "normal"),
    [
        (ExitReason(kind="exit", code=0), True),
        (ExitReason(kind="stopped", signal=15), True),
        (ExitReason(kind="exit", code=2), False),
        (ExitReason(kind="signal", signal=11), False),
        (ExitReason(kind="oom", signal=9), False),
        (ExitReason(kind="budget", signal=9), False),
        (ExitReason(kind="heartbeat", signal=9), False),
        (ExitReason(kind="start_timeout", signal=9), False),
        (ExitReason(kind="spawn_failed", detail="No such file"), False),
    ],
)
def test_exit_reason_normal(reason: ExitReason, normal: bool) -> None:
    assert reason.normal is normal


def test_exit_reason_wire_form_round_trips() -> None:
    reason = ExitReason.from_returncode(-9, requested="budget", detail="rss 2.1 GiB > 2 GiB")
    wire = reason.to_wire()
    assert wire == {"kind": "budget", "code": None, "signal": 9, "detail": "rss 2.1 GiB > 2 GiB", "text": "budget"}
    assert ExitReason.from_wire(wire) == reason


def test_exit_reason_rejects_unknown_kind() -> None:
    assert "spawn_failed" in EXIT_KINDS
    with pytest.raises(ValueError, match="unknown exit reason kind"):
        ExitReason(kind="crashed")


# --- should_restart -----------------------------------------------------------------------------

CLEAN = ExitReason(kind="exit", code=0)
CRASH = ExitReason(kind="exit", code=1)
KILLED = ExitReason(kind="signal", signal=9)
STOPPED = ExitReason(kind="stopped", signal=15)
HEARTBEAT = ExitReason(kind="heartbeat", signal=9)


@pytest.mark.parametrize(
    ("restart", "reason", "expected"),
    [
        (RestartType.PERMANENT, CLEAN, True),
        (RestartType.PERMANENT, CRASH, True),
        (RestartType.PERMANENT, KILLED, True),
        (RestartType.PERMANENT, HEARTBEAT, True),
        (RestartType.PERMANENT, STOPPED, False),
        (RestartType.TRANSIENT, CLEAN, False),
        (RestartType.TRANSIENT, CRASH, True),
        (RestartType.TRANSIENT, KILLED, True),
        (RestartType.TRANSIENT, HEARTBEAT, True),
        (RestartType.TRANSIENT, STOPPED, False),
        (RestartType.TEMPORARY, CLEAN, False),
        (RestartType.TEMPORARY, CRASH, False),
        (RestartType.TEMPORARY, KILLED, False),
        (RestartType.TEMPORARY, STOPPED, False),
    ],
)
def test_should_restart(restart: RestartType, reason: ExitReason, expected: bool) -> None:
    assert should_restart(restart, reason) is expected


# --- siblings_to_restart -------------------------------------------------------------------------


def group(strategy: Strategy) -> GroupSpec:
    return GroupSpec(name="g", strategy=strategy, services=("a", "b", "c", "d"))


def test_no_group_or_one_for_one_restarts_no_siblings() -> None:
    assert siblings_to_restart(None, "a") == []
    assert siblings_to_restart(group(Strategy.ONE_FOR_ONE), "b") == []


def test_one_for_all_restarts_all_others_in_order() -> None:
    assert siblings_to_restart(group(Strategy.ONE_FOR_ALL), "c") == ["a", "b", "d"]


def test_rest_for_one_restarts_those_after() -> None:
    g = group(Strategy.REST_FOR_ONE)
    assert siblings_to_restart(g, "a") == ["b", "c", "d"]
    assert siblings_to_restart(g, "c") == ["d"]
    assert siblings_to_restart(g, "d") == []


def test_siblings_of_a_non_member_is_an_error() -> None:
    with pytest.raises(ValueError, match="not in group"):
        siblings_to_restart(group(Strategy.ONE_FOR_ALL), "zz")


# --- ordering -------------------------------------------------------------------------------------


def test_start_order_is_config_order_without_dependencies() -> None:
    assert start_order(services(c=(), a=(), b=())) == ["c", "a", "b"]


def test_start_order_puts_dependencies_first_and_keeps_config_order_for_ties() -> None:
    specs = services(web=("db", "cache"), cache=(), db=("cache",), tool=(), api=("db",))
    assert start_order(specs) == ["cache", "db", "web", "tool", "api"]


def test_start_order_diamond() -> None:
    assert start_order(services(top=("left", "right"), left=("base",), right=("base",), base=())) == [
        "base", "left", "right", "top",
    ]  # fmt: skip


def test_cycle_is_reported_with_its_path() -> None:
    with pytest.raises(DependencyCycle) as info:
        start_order(services(ok=(), a=("b",), b=("c",), c=("a",), d=("a",)))
    assert info.value.cycle == ["a", "b", "c", "a"]
    assert str(info.value) == "dependency cycle: a -> b -> c -> a"
    assert isinstance(info.value, ValueError)


def test_cycle_found_when_the_first_stuck_service_is_only_downstream_of_it() -> None:
    with pytest.raises(DependencyCycle) as info:
        start_order(services(d=("a",), a=("b",), b=("a",)))
    assert info.value.cycle == ["a", "b", "a"]


def test_self_dependency_is_a_cycle() -> None:
    with pytest.raises(DependencyCycle) as info:
        start_order(services(a=("a",)))
    assert info.value.cycle == ["a", "a"]


def test_unknown_dependency() -> None:
    with pytest.raises(UnknownDependency, match="'web' depends on unknown service 'db'"):
        start_order(services(web=("db",)))


def test_dependents_and_dependencies_are_transitive_and_in_start_order() -> None:
    specs = services(web=("api",), api=("db",), db=(), cache=(), worker=("db", "cache"))
    assert dependents_of(specs, "db") == ["api", "web", "worker"]
    assert dependents_of(specs, "cache") == ["worker"]
    assert dependents_of(specs, "web") == []
    assert dependencies_of(specs, "web") == ["db", "api"]
    assert dependencies_of(specs, "worker") == ["db", "cache"]
    assert dependencies_of(specs, "db") == []


@st.composite
def dags(draw: st.DrawFn) -> dict[str, ServiceSpec]:
    """Random DAGs: service i may depend only on services with a higher index, then shuffled."""
    count = draw(st.integers(min_value=0, max_value=12))
    names = [f"s{i}" for i in range(count)]
    deps = {
        name: tuple(draw(st.lists(st.sampled_from(names[i + 1 :]), unique=True)) if i + 1 < count else ())
        for i, name in enumerate(names)
    }
    order = draw(st.permutations(names))
    return {name: ServiceSpec(name=name, command=(name,), depends_on=deps[name]) for name in order}


@given(dags())
def test_start_order_is_a_topological_permutation(specs: dict[str, ServiceSpec]) -> None:
    order = start_order(specs)
    assert sorted(order) == sorted(specs)
    position = {name: index for index, name in enumerate(order)}
    for name, spec in specs.items():
        for dep in spec.depends_on:
            assert position[dep] < position[name]
        for dependent in dependents_of(specs, name):
            assert position[dependent] > position[name]
