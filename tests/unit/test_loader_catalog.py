"""The loader's bookkeeping (versions, defaults, failed entries) and weight-source rules."""

from __future__ import annotations

import pytest

from protocols.errors import ErrorCode, MicrokernelError
from services.loader.catalog import Catalog, Entry, State, check_name, check_version
from services.loader.sources import is_file, meta_config


def entry(name: str, version: int, state: str = State.LOADING) -> Entry:
    return Entry(name=name, version=version, arch="a", source=f"file:/{name}{version}", state=state)


def test_first_version_is_the_default_and_unloading_it_hands_it_on() -> None:
    cat = Catalog()
    v1, v2, v3 = cat.add(entry("m", 1)), cat.add(entry("m", 2)), cat.add(entry("m", 3))
    assert cat.default("m") == 1 and cat.find("m") is v1
    cat.set_default("m", 2)
    assert cat.find("m") is v2
    assert [(r["version"], r["default"]) for r in cat.rows()] == [(1, False), (2, True), (3, False)]
    cat.remove(v2)
    assert cat.default("m") == 3  # the highest remaining version
    cat.remove(v3)
    cat.remove(v1)
    assert cat.default("m") is None and cat.rows() == []


def test_next_version_and_lookups_name_what_exists() -> None:
    cat = Catalog()
    assert cat.next_version("m") == 1
    cat.add(entry("m", 4))
    assert cat.next_version("m") == 5 and cat.versions("m") == [4]
    with pytest.raises(MicrokernelError) as err:
        cat.find("m", 2)
    assert err.value.code == ErrorCode.NOT_FOUND and "[4]" in err.value.reason
    with pytest.raises(MicrokernelError) as err:
        cat.find("other")
    assert err.value.code == ErrorCode.NOT_FOUND and "loaded: m" in err.value.reason
    with pytest.raises(MicrokernelError) as err:
        cat.set_default("m", 9)
    assert err.value.code == ErrorCode.NOT_FOUND


def test_a_failed_entry_can_be_retried_but_a_live_one_cannot_be_replaced() -> None:
    cat = Catalog()
    cat.add(entry("m", 1))
    with pytest.raises(MicrokernelError) as err:
        cat.add(entry("m", 1))
    assert err.value.code == ErrorCode.BAD_STATE
    cat.find("m", 1).state = State.FAILED
    cat.find("m", 1).error = "boom"
    assert cat.rows()[0]["error"] == "boom"
    retry = cat.add(entry("m", 1))
    assert cat.find("m", 1) is retry


def test_names_and_versions_are_checked() -> None:
    assert check_name("charformer-v1.2_x") == "charformer-v1.2_x"
    for bad in ("", "a/b", "..", 3, None, "sp ace"):
        with pytest.raises(MicrokernelError) as err:
            check_name(bad)
        assert err.value.code == ErrorCode.INVALID_FIELD
    assert check_version(None) is None and check_version(3) == 3
    for bad in (0, -1, True, "2", 1.5):
        with pytest.raises(MicrokernelError):
            check_version(bad)


def test_files_are_told_from_store_keys() -> None:
    for path in ("/abs/w.bin", "./w", "../w", "~/w", "weights.safetensors", "dir/w.safetensors"):
        assert is_file(path), path
    for key in ("models/charformer", "checkpoints/job-1/step-200", "w"):
        assert not is_file(key), key


def test_recorded_config_is_a_dict_or_json_text() -> None:
    assert meta_config({}, "x") == {}
    assert meta_config({"config": {"width": 3}}, "x") == {"width": 3}
    assert meta_config({"config": '{"width": 3}'}, "x") == {"width": 3}
    for bad in ('{"width": ', "[1]", 5):
        with pytest.raises(MicrokernelError) as err:
            meta_config({"config": bad}, "file:/w")
        assert err.value.code == ErrorCode.INVALID_FIELD and "file:/w" in err.value.reason
