"""Field checks of the generated builders: the fast checks accept exactly what the item-by-item
checks accept, and an error still names the item or value at fault."""

from __future__ import annotations

import pytest

from protocols import messages as m
from protocols.errors import ErrorCode, ProtocolError
from protocols.registry import build

ROWS = [{"name": "a", "state": "running"}, {"name": "b", "state": "failed", "extra": [1, 2]}]


def test_a_list_of_maps_is_kept_as_decoded() -> None:
    reply = build(m.StatusReply, {"kernel": {"pid": 1}, "services": ROWS})
    assert reply.services is not None and reply.services == ROWS
    assert build(m.StatusReply, {"kernel": {}, "services": []}).services == []
    # a tuple (a caller's own body, not msgpack's) still passes, through the general check
    assert build(m.StatusReply, {"kernel": {}, "services": tuple(ROWS)}).services == ROWS


@pytest.mark.parametrize("services, named", [
    ([{"a": 1}, {b"x": 1}], "services[1] key"),
    ([{"a": 1}, 3], "services[1]"),
    ([{"a": 1}, {"b": 2}, {7: 1}], "services[2] key"),
    ("rows", "services"),
])
def test_a_bad_row_is_named(services: object, named: str) -> None:
    with pytest.raises(ProtocolError) as info:
        build(m.StatusReply, {"kernel": {}, "services": services})
    assert info.value.code == ErrorCode.INVALID_FIELD
    assert f"field '{named}'" in str(info.value)


@pytest.mark.parametrize("endpoints, named", [(["ipc://a", 5], "endpoints[1]"), ([b"ipc://a"], "endpoints[0]")])
def test_a_bad_item_is_named(endpoints: object, named: str) -> None:
    body = {"service": "s", "endpoints": endpoints, "methods": [], "ready": 1, "replicas": 1}
    with pytest.raises(ProtocolError) as info:
        build(m.LookupReply, body)
    assert f"field '{named}'" in str(info.value)


def test_a_bad_map_value_is_named() -> None:
    assert build(m.LogsReply, _logs_body({"a.log": 3})).cursor == {"a.log": 3}
    with pytest.raises(ProtocolError) as info:
        build(m.LogsReply, _logs_body({"a.log": 3, "b.log": "x"}))
    assert "field 'cursor.b.log'" in str(info.value)


def _logs_body(cursor: dict) -> dict:
    return {"service": "s", "lines": [], "cursor": cursor}
