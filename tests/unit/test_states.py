"""The replica state table: every legal transition passes, every other pair raises."""

from __future__ import annotations

import itertools

import pytest

from microkernel.supervisor.states import (
    ALIVE,
    TRANSITIONS,
    IllegalTransition,
    ReplicaState,
    check_transition,
    is_alive,
)

S = ReplicaState

EXPECTED: dict[ReplicaState, set[ReplicaState]] = {
    S.STOPPED: {S.WAITING, S.STARTING},
    S.WAITING: {S.STARTING, S.STOPPED},
    S.STARTING: {S.RUNNING, S.READY, S.STOPPING, S.EXITED},
    S.RUNNING: {S.READY, S.STOPPING, S.EXITED},
    S.READY: {S.STOPPING, S.EXITED},
    S.STOPPING: {S.STOPPED, S.EXITED},
    S.EXITED: {S.BACKOFF, S.WAITING, S.STARTING, S.STOPPED, S.FAILED},
    S.BACKOFF: {S.STARTING, S.STOPPED, S.WAITING},
    S.FAILED: {S.STARTING, S.STOPPED, S.WAITING},
}

ALL_PAIRS = list(itertools.product(ReplicaState, repeat=2))
LEGAL = [(old, new) for old, new in ALL_PAIRS if new in EXPECTED[old]]
ILLEGAL = [(old, new) for old, new in ALL_PAIRS if new not in EXPECTED[old]]


def test_table_is_exactly_the_specified_one() -> None:
    assert set(TRANSITIONS) == set(ReplicaState)
    assert {state: set(targets) for state, targets in TRANSITIONS.items()} == EXPECTED


def test_state_values_are_the_wire_names() -> None:
    assert [state.value for state in ReplicaState] == [
        "stopped", "waiting", "starting", "running", "ready", "stopping", "exited", "backoff", "failed",
    ]  # fmt: skip


@pytest.mark.parametrize(("old", "new"), LEGAL)
def test_legal_transition_passes(old: ReplicaState, new: ReplicaState) -> None:
    check_transition(old, new)


@pytest.mark.parametrize(("old", "new"), ILLEGAL)
def test_illegal_transition_raises_naming_both_states(old: ReplicaState, new: ReplicaState) -> None:
    with pytest.raises(IllegalTransition) as info:
        check_transition(old, new)
    assert f"{old.value} -> {new.value}" in str(info.value)
    assert (info.value.old, info.value.new) == (old, new)


def test_pair_enumeration_covers_everything() -> None:
    assert len(LEGAL) + len(ILLEGAL) == len(ReplicaState) ** 2
    assert len(LEGAL) == sum(len(targets) for targets in EXPECTED.values())


def test_self_transitions_are_illegal() -> None:
    for state in ReplicaState:
        with pytest.raises(IllegalTransition):
            check_transition(state, state)


def test_alive_states() -> None:
    assert ALIVE == {S.STARTING, S.RUNNING, S.READY, S.STOPPING}
    for state in ReplicaState:
        assert is_alive(state) == (state in ALIVE)


def test_every_state_reaches_stopped() -> None:
    # Operators must always be able to get a replica to "stopped" from anywhere.
    for start in ReplicaState:
        seen = {start}
        frontier = [start]
        while frontier:
            for target in TRANSITIONS[frontier.pop()]:
                if target not in seen:
                    seen.add(target)
                    frontier.append(target)
        assert S.STOPPED in seen, start
