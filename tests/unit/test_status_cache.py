"""The status reply cache: rebuilt on any change of its key, and at least every TTL."""

from __future__ import annotations

from microkernel.status_cache import StatusCache
from microkernel.supervisor.backoff import Backoff
from microkernel.supervisor.records import ReplicaRecord, status_changes
from microkernel.supervisor.spec import BackoffSpec
from microkernel.supervisor.states import ReplicaState


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_reply_is_built_once_until_the_key_changes_or_the_ttl_passes() -> None:
    clock, key, builds = Clock(), [0], []
    cache = StatusCache(lambda: key[0], ttl=0.1, clock=clock)

    def build() -> dict:
        builds.append(1)
        return {"n": len(builds)}

    assert cache.get(None, build) == {"n": 1}
    assert cache.get(None, build) == {"n": 1}  # cached
    assert cache.get("echo", build) == {"n": 2}  # another request has its own entry
    key[0] = 1
    assert cache.get(None, build) == {"n": 3}  # something changed
    clock.now = 0.05
    assert cache.get(None, build) == {"n": 3}
    clock.now = 0.1
    assert cache.get(None, build) == {"n": 4}  # too old
    assert cache.get("echo", build) == {"n": 5}  # the whole cache expired together


def test_changes_to_status_fields_of_a_replica_are_counted_and_others_are_not() -> None:
    rep = ReplicaRecord(service="echo", index=0, backoff=Backoff(BackoffSpec()))
    before = status_changes.value
    rep.board_seen_ns = 123  # heartbeat bookkeeping: not in the status
    assert status_changes.value == before
    rep.set_state(ReplicaState.WAITING)
    assert status_changes.value > before
    before = status_changes.value
    rep.pid = 42
    assert status_changes.value == before + 1
