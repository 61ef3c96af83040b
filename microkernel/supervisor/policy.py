"""Supervision decisions as pure functions: whether to restart, what else restarts, in which order."""

from __future__ import annotations

import heapq
from collections.abc import Mapping

from microkernel.supervisor.reasons import ExitReason
from microkernel.supervisor.spec import GroupSpec, RestartType, ServiceSpec, Strategy

__all__ = [
    "DependencyCycle",
    "UnknownDependency",
    "dependencies_of",
    "dependents_of",
    "should_restart",
    "siblings_to_restart",
    "start_order",
]


class DependencyCycle(ValueError):
    """``depends_on`` forms a cycle.

    ``cycle`` is the path read as "depends on", with the first name repeated at the end:
    ``["a", "b", "a"]`` means a depends on b, which depends on a.
    """

    def __init__(self, cycle: list[str]) -> None:
        self.cycle = cycle
        super().__init__(f"dependency cycle: {' -> '.join(cycle)}")


class UnknownDependency(ValueError):
    """A service depends on a service that is not defined."""

    def __init__(self, service: str, dependency: str) -> None:
        self.service = service
        self.dependency = dependency
        super().__init__(f"service {service!r} depends on unknown service {dependency!r}")


def should_restart(restart: RestartType, reason: ExitReason) -> bool:
    """Whether a replica that exited for ``reason`` is restarted under ``restart``.

    A requested stop is never undone. ``permanent`` restarts everything else, ``transient``
    only abnormal exits, ``temporary`` nothing.
    """
    if reason.kind == "stopped":
        return False
    if restart is RestartType.PERMANENT:
        return True
    if restart is RestartType.TRANSIENT:
        return not reason.normal
    return False


def siblings_to_restart(group: GroupSpec | None, failed: str) -> list[str]:
    """The other services of ``failed``'s group that restart with it, in group order.

    ``one_for_one`` (or no group): none. ``one_for_all``: every other member.
    ``rest_for_one``: the members listed after ``failed``.
    """
    if group is None or group.strategy is Strategy.ONE_FOR_ONE:
        return []
    if failed not in group.services:
        raise ValueError(f"service {failed!r} is not in group {group.name!r}")
    if group.strategy is Strategy.ONE_FOR_ALL:
        return [name for name in group.services if name != failed]
    return list(group.services[group.services.index(failed) + 1 :])


def start_order(services: Mapping[str, ServiceSpec]) -> list[str]:
    """Every service after its dependencies; among services free to start, config order wins.

    Raises :class:`UnknownDependency` or :class:`DependencyCycle`.
    """
    position = {name: index for index, name in enumerate(services)}
    waiting_on: dict[str, int] = {}
    dependents: dict[str, list[str]] = {name: [] for name in services}
    for name, spec in services.items():
        deps = set(spec.depends_on)
        for dep in deps:
            if dep not in services:
                raise UnknownDependency(name, dep)
            dependents[dep].append(name)
        waiting_on[name] = len(deps)

    # Kahn's algorithm with a heap keyed by config position: deterministic, and as close to
    # the order the operator wrote as the dependencies allow.
    ready = [position[name] for name, count in waiting_on.items() if count == 0]
    heapq.heapify(ready)
    names = list(services)
    order: list[str] = []
    while ready:
        name = names[heapq.heappop(ready)]
        order.append(name)
        for dependent in dependents[name]:
            waiting_on[dependent] -= 1
            if waiting_on[dependent] == 0:
                heapq.heappush(ready, position[dependent])
    if len(order) < len(services):
        raise DependencyCycle(_find_cycle(services, set(services) - set(order)))
    return order


def dependents_of(services: Mapping[str, ServiceSpec], name: str) -> list[str]:
    """Every service that depends on ``name``, directly or transitively, in start order."""
    found = _reachable(name, _reverse_edges(services))
    return [other for other in start_order(services) if other in found]


def dependencies_of(services: Mapping[str, ServiceSpec], name: str) -> list[str]:
    """Every service ``name`` depends on, directly or transitively, in start order."""
    edges = {other: list(spec.depends_on) for other, spec in services.items()}
    found = _reachable(name, edges)
    return [other for other in start_order(services) if other in found]


def _reverse_edges(services: Mapping[str, ServiceSpec]) -> dict[str, list[str]]:
    reverse: dict[str, list[str]] = {name: [] for name in services}
    for name, spec in services.items():
        for dep in spec.depends_on:
            reverse.setdefault(dep, []).append(name)
    return reverse


def _reachable(start: str, edges: Mapping[str, list[str]]) -> set[str]:
    """Names reachable from ``start`` (excluding ``start`` unless it is on a cycle)."""
    found: set[str] = set()
    stack = list(edges.get(start, ()))
    while stack:
        current = stack.pop()
        if current not in found:
            found.add(current)
            stack.extend(edges.get(current, ()))
    return found


def _find_cycle(services: Mapping[str, ServiceSpec], stuck: set[str]) -> list[str]:
    """A concrete cycle among ``stuck`` (services Kahn's algorithm could not place)."""
    # Every stuck service has at least one stuck dependency, so walking dependencies from any of
    # them must revisit a name; the walk from that first revisit is the cycle.
    start = next(name for name in services if name in stuck)
    path: list[str] = []
    seen: dict[str, int] = {}
    current = start
    while current not in seen:
        seen[current] = len(path)
        path.append(current)
        current = next(dep for dep in services[current].depends_on if dep in stuck)
    cycle = path[seen[current] :]
    return [*cycle, current]
