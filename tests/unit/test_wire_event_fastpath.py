"""The publishers' hot path (``wire.EventEncoder``) gives exactly what the general encoder gives
for an event, and leaves everything unusual to it."""

from __future__ import annotations

import itertools
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import wire
from protocols.registry import class_for

NOW = 1_790_000_000_123_456_789

_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def frozen(counter_start: int = 7):
    """The clock and the id counter fixed, so that two encoders must agree byte for byte."""
    return mock.patch.multiple(wire, _time_ns=lambda: NOW, _counter=itertools.count(counter_start))


def general(topic: str, data: dict) -> list:
    return wire.encode(wire.Event(topic, data), sender="svc:pub.0.1", topic=topic)


@settings(max_examples=200, deadline=None)
@given(topic=st.text(min_size=1, max_size=24).filter(lambda t: class_for(t) is None), data=st.dictionaries(st.text(max_size=10), _VALUES, max_size=5))
def test_the_event_encoder_writes_what_encode_writes_or_declines(topic: str, data: dict) -> None:
    with frozen():
        fast = wire.EventEncoder("svc:pub.0.1").encode(topic, data)
    with frozen():
        expected = general(topic, data)
    if fast is None:  # declined: a binary among the top-level values
        assert any(type(v) is bytes for v in data.values())
    else:
        assert fast == expected
        env = wire.decode(fast, topic=True)
        assert env.topic == topic and env.message == wire.Event(topic, data)


@pytest.mark.parametrize("data", [
    {"blob": b"x" * 70_000},                 # a buffer frame
    {"x": np.arange(4, dtype=np.float32)},   # an array frame
    {"nested": {"x": np.arange(4)}},         # an array frame further in (the inline packing declines it)
    {"many": ["y" * 1000] * 70},             # a body past the inline limit
    {"odd": object()},                       # nothing msgpack takes: the general encoder says what is wrong
])
def test_the_event_encoder_declines_what_only_the_general_encoder_can_do(data: dict) -> None:
    encoder = wire.EventEncoder("svc:pub.0.1")
    assert encoder.encode("demo.tick", data) is None
    # A declined packing leaves nothing behind in the encoder's packer.
    with frozen():
        fast = encoder.encode("demo.tick", {"n": 1})
    with frozen():
        assert fast == general("demo.tick", {"n": 1})


def test_the_event_encoder_remembers_a_bounded_number_of_topics() -> None:
    encoder = wire.EventEncoder("svc:pub.0.1")
    for i in range(wire.EventEncoder.TOPICS):
        assert encoder.encode(f"demo.t{i}", {"i": i}) is not None
    # Past its bound it declines new topics (the general encoder has its own bounded cache) and
    # still serves the ones it knows.
    assert encoder.encode("demo.one_more", {"i": 0}) is None
    with frozen():
        fast = encoder.encode("demo.t3", {"i": 3})
    with frozen():
        assert fast == general("demo.t3", {"i": 3})
    assert encoder.encode(b"demo.bytes", {"i": 0}) is None  # type: ignore[arg-type]
