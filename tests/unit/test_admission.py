"""Memory admission: reservations of hard budgets never exceed the pool."""

from __future__ import annotations

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from microkernel.resources.admission import AdmissionError, MemoryPool, Slot, parse_pool
from microkernel.units import UnitError

MiB = 1024**2
GiB = 1024**3


def test_reserve_until_full_then_refuse_with_a_clear_message() -> None:
    pool = MemoryPool(10 * GiB)
    pool.reserve(("trainer", 0), 4 * GiB)
    pool.reserve(("trainer", 1), 4 * GiB)
    pool.reserve(("store", 0), GiB)
    assert (pool.used, pool.free, len(pool)) == (9 * GiB, GiB, 3)
    with pytest.raises(AdmissionError) as info:
        pool.reserve(("echo", 0), 2 * GiB)
    err = info.value
    assert (err.requested, err.free, err.capacity) == (2 * GiB, GiB, 10 * GiB)
    assert str(err) == (
        "not enough host memory for echo[0]: needs 2 GiB, 1 GiB free of a 10 GiB pool "
        "(held by: trainer 8 GiB (2 replicas), store 1 GiB (1 replica))"
    )
    assert ("echo", 0) not in pool and pool.used == 9 * GiB
    pool.reserve(("echo", 0), GiB)  # exactly fills the pool
    assert pool.free == 0


def test_reserve_many_is_all_or_nothing() -> None:
    pool = MemoryPool(10 * GiB)
    pool.reserve(("store", 0), 4 * GiB)
    with pytest.raises(AdmissionError, match=r"for 5 replicas of infer: needs 8 GiB, 6 GiB free") as info:
        pool.reserve_many([(("infer", i), 2 * GiB) for i in range(4)] + [(("infer", 4), 0)])
    assert info.value.requested == 8 * GiB
    assert pool.used == 4 * GiB and len(pool) == 1  # nothing was reserved
    pool.reserve_many({("infer", 0): 3 * GiB, ("infer", 1): 3 * GiB})
    assert pool.free == 0
    with pytest.raises(AdmissionError, match="2 replicas of a, b"):
        pool.reserve_many([(("a", 0), 1), (("b", 0), 1)])


def test_reserving_again_replaces_the_reservation() -> None:
    pool = MemoryPool(10 * GiB)
    pool.reserve(("a", 0), 6 * GiB)
    pool.reserve(("b", 0), 3 * GiB)
    pool.reserve(("a", 0), 7 * GiB)  # grows by 1 GiB: fits exactly
    assert pool.used == 10 * GiB and pool.held(("a", 0)) == 7 * GiB
    with pytest.raises(AdmissionError):
        pool.reserve(("a", 0), 8 * GiB)
    pool.reserve(("a", 0), GiB)  # shrinking always fits
    assert pool.used == 4 * GiB


def test_release_and_snapshot() -> None:
    pool = MemoryPool(8 * GiB)
    pool.reserve_many([(("a", 1), GiB), (("b", 0), 2 * GiB), (("a", 0), GiB)])
    assert pool.snapshot() == {
        "capacity": 8 * GiB,
        "used": 4 * GiB,
        "free": 4 * GiB,
        "holders": [
            {"service": "b", "replica": 0, "bytes": 2 * GiB},
            {"service": "a", "replica": 0, "bytes": GiB},
            {"service": "a", "replica": 1, "bytes": GiB},
        ],
    }
    assert pool.release(("b", 0)) == 2 * GiB
    assert pool.release(("b", 0)) == 0
    assert pool.held(("b", 0)) is None
    assert pool.used == 2 * GiB


def test_lowering_the_capacity_revokes_nothing() -> None:
    pool = MemoryPool(8 * GiB)
    pool.reserve(("a", 0), 6 * GiB)
    pool.set_capacity(4 * GiB)
    assert (pool.capacity, pool.used, pool.free) == (4 * GiB, 6 * GiB, 0)
    with pytest.raises(AdmissionError, match="0 B free"):
        pool.reserve(("b", 0), 1)
    pool.reserve(("a", 0), 5 * GiB)  # shrinking is fine even while over capacity


def test_invalid_requests() -> None:
    pool = MemoryPool(GiB)
    with pytest.raises(ValueError, match=r"a\[0\] must be a byte count"):
        pool.reserve(("a", 0), -1)
    with pytest.raises(ValueError, match="listed twice"):
        pool.reserve_many([(("a", 0), 1), (("a", 0), 2)])
    with pytest.raises(ValueError, match="capacity"):
        MemoryPool(-1)
    with pytest.raises(AdmissionError, match=r"held by: nobody"):
        MemoryPool(0).reserve(("a", 0), 1)
    assert "holders=0" in repr(pool)


def test_the_summary_names_the_biggest_services() -> None:
    pool = MemoryPool(100)
    for i, name in enumerate("abcdefg"):
        pool.reserve((name, 0), 10 + i)
    with pytest.raises(AdmissionError) as info:
        pool.reserve(("z", 0), 50)
    assert info.value.holders.startswith("g 16 B (1 replica), f 15 B")
    assert info.value.holders.endswith("and 2 more services")


class PoolMachine(RuleBasedStateMachine):
    """Random reserve / reserve_many / release: the pool never over-commits and failures change nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.capacity = 1000
        self.pool = MemoryPool(self.capacity)
        self.model: dict[Slot, int] = {}

    slots = st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 3))
    sizes = st.integers(0, 600)

    @rule(key=slots, size=sizes)
    def reserve(self, key: Slot, size: int) -> None:
        fits = sum(self.model.values()) - self.model.get(key, 0) + size <= self.capacity or size <= self.model.get(key, 0)
        try:
            self.pool.reserve(key, size)
        except AdmissionError:
            assert not fits
        else:
            assert fits
            self.model[key] = size

    @rule(items=st.dictionaries(slots, sizes, max_size=4))
    def reserve_many(self, items: dict[Slot, int]) -> None:
        after = {**self.model, **items}
        try:
            self.pool.reserve_many(items)
        except AdmissionError:
            assert sum(after.values()) > self.capacity
        else:
            assert sum(after.values()) <= self.capacity or sum(after.values()) <= sum(self.model.values())
            self.model = after

    @rule(key=slots)
    def release(self, key: Slot) -> None:
        assert self.pool.release(key) == self.model.pop(key, 0)

    @invariant()
    def never_over_commits(self) -> None:
        assert self.pool.used == sum(self.model.values())
        assert self.pool.used <= self.pool.capacity
        assert self.pool.free == self.capacity - self.pool.used
        assert {(h["service"], h["replica"]): h["bytes"] for h in self.pool.snapshot()["holders"]} == self.model


TestPoolMachine = PoolMachine.TestCase


@pytest.mark.parametrize(
    ("value", "expected"),
    [("80%", 800), ("62.5%", 625), ("100%", 1000), (" 50 % ", 500), ("512", 512), (2048, 2048), ("2KiB", 2048)],
)
def test_parse_pool(value: object, expected: int) -> None:
    assert parse_pool(value, 1000) == expected


@pytest.mark.parametrize(
    ("value", "fragment"),
    [("0%", "percentage in (0%, 100%]"), ("120%", "percentage"), ("x%", "percentage"), ("%", "percentage"),
     (0.8, "as a percentage"), (0, "> 0 bytes"), ("0GiB", "> 0 bytes"), ("lots", "expected a size"),
     (True, "expected a size")],
)
def test_parse_pool_rejects(value: object, fragment: str) -> None:
    with pytest.raises(UnitError) as info:
        parse_pool(value, 1000, key="kernel.memory_pool")
    assert info.value.key == "kernel.memory_pool"
    assert fragment in info.value.reason


def test_parse_pool_of_real_host_memory_scale() -> None:
    total = 25_325_260_800
    assert parse_pool("80%", total) == total * 8 // 10
