"""docs/protocol.md is the authoritative spec: everything the code registers must be in it."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocols.errors import ErrorCode
from protocols.registry import fields_of, registered_types

SPEC = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()


@pytest.mark.parametrize("msg_type", sorted(registered_types()))
def test_every_registered_msg_type_is_documented(msg_type: str) -> None:
    assert f"`{msg_type}`" in SPEC, f"{msg_type} is registered but not documented in docs/protocol.md"


@pytest.mark.parametrize("msg_type,cls", sorted(registered_types().items()))
def test_every_field_is_documented(msg_type: str, cls: type) -> None:
    for name in fields_of(cls):
        assert f"`{name}`" in SPEC, f"field {name!r} of {msg_type} is not documented in docs/protocol.md"


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_error_code_is_documented(code: ErrorCode) -> None:
    assert f"| `{code.value}` |" in SPEC
