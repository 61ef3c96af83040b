"""The model registry, the shipped charformer and corpus, and state_dict <-> numpy."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from protocols.errors import ErrorCode, MicrokernelError
from services.models import corpus, registry
from services.models.charformer import ARCHITECTURE, UNKNOWN, VOCAB_SIZE, decode, encode
from services.models.registry import Architecture, build_model, merge_config, resolve
from services.models.weights import from_numpy, to_numpy

TINY = {"d_model": 32, "n_heads": 2, "n_layers": 1, "context": 16, "generate": 5}
NOT_AN_ARCHITECTURE = object()


def test_charformer_resolves_by_name_and_by_import_path() -> None:
    assert resolve("charformer") is ARCHITECTURE
    assert resolve("services.models.charformer:ARCHITECTURE") is ARCHITECTURE
    assert "charformer" in registry.names()


def test_a_registered_architecture_resolves_by_its_name() -> None:
    custom = dataclasses.replace(ARCHITECTURE, name="charformer-test-copy")
    registry.register(custom)
    assert resolve("charformer-test-copy") is custom


@pytest.mark.parametrize(("name", "code", "words"), [
    ("nope", ErrorCode.NOT_FOUND, "unknown model 'nope' (known: "),
    ("no_such_module_xyz:ARCH", ErrorCode.NOT_FOUND, "cannot import module 'no_such_module_xyz'"),
    ("services.models.charformer:MISSING", ErrorCode.NOT_FOUND, "has no attribute 'MISSING'"),
    ("tests.unit.test_models:NOT_AN_ARCHITECTURE", ErrorCode.INVALID_FIELD, "not a services.models.Architecture"),
    ("bad path:x", ErrorCode.INVALID_FIELD, "not an import path"),
    ("", ErrorCode.INVALID_FIELD, "non-empty"),
])  # fmt: skip
def test_unknown_or_bad_model_names_get_clear_errors(name: str, code: ErrorCode, words: str) -> None:
    with pytest.raises(MicrokernelError) as err:
        resolve(name)
    assert err.value.code == code and words in err.value.reason


def test_config_is_merged_with_defaults_and_unknown_keys_are_refused() -> None:
    merged = merge_config(ARCHITECTURE, {"n_layers": 1})
    assert merged["n_layers"] == 1 and merged["context"] == ARCHITECTURE.default_config["context"]
    with pytest.raises(MicrokernelError) as err:
        merge_config(ARCHITECTURE, {"layers": 1})
    assert err.value.code == ErrorCode.INVALID_FIELD and "layers" in err.value.reason
    for bad in ({"d_model": 30, "n_heads": 4}, {"context": 0}, {"dropout": 1.5}, {"n_layers": "2"}):
        with pytest.raises(MicrokernelError) as err:
            build_model(ARCHITECTURE, bad)
        assert err.value.code == ErrorCode.INVALID_FIELD


def test_the_tokenizer_maps_unknown_characters_instead_of_failing() -> None:
    text = "Hello, world!\n\tok"
    assert decode(encode(text)) == text
    ids = encode("café ☃")
    assert ids[3] == UNKNOWN and ids[5] == UNKNOWN and decode(ids) == "caf? ?"
    assert all(0 <= i < VOCAB_SIZE for i in encode("".join(chr(c) for c in range(300))))


def test_default_model_is_small() -> None:
    model, config = build_model(ARCHITECTURE, None)
    params = sum(p.numel() for p in model.parameters())
    assert 10_000 < params < 500_000 and config["context"] == 64 and config["generate"] == 32


def test_infer_batch_returns_greedy_continuations_whatever_the_prompt_lengths() -> None:
    torch.manual_seed(0)
    model, config = build_model(ARCHITECTURE, TINY)
    model.eval()
    prompts = ["", "a", "The river ", "x" * 40, "snow ☃ man"]  # empty, short, longer than context, unknown chars
    batch = ARCHITECTURE.infer_batch(model, prompts, config)
    assert len(batch) == len(prompts) and all(isinstance(s, str) and len(s) == 5 for s in batch)
    # Right padding inside a batch changes nothing: each equals its own single-prompt result.
    assert batch == [ARCHITECTURE.infer_batch(model, [p], config)[0] for p in prompts]
    assert ARCHITECTURE.infer_batch(model, [], config) == []
    with pytest.raises(MicrokernelError) as err:
        ARCHITECTURE.infer_batch(model, [3], config)
    assert err.value.code == ErrorCode.INVALID_FIELD


def test_example_inputs() -> None:
    prompts = ARCHITECTURE.example_inputs(20)
    assert len(prompts) == 20 and all(isinstance(p, str) and p for p in prompts)


def test_the_shipped_corpus_is_small_plain_text() -> None:
    text = corpus.read("corpus")
    assert 10_000 < len(text.encode()) <= 300_000
    assert all(i != UNKNOWN for i in encode(text))
    with pytest.raises(MicrokernelError) as err:
        corpus.read("shakespeare")
    assert err.value.code == ErrorCode.NOT_FOUND and "'shakespeare'" in err.value.reason


def test_state_dicts_round_trip_through_numpy() -> None:
    model, _ = build_model(ARCHITECTURE, TINY)
    arrays = to_numpy(model.state_dict())
    for a in arrays.values():
        a.flags.writeable = False  # as received from the store
    fresh, _ = build_model(ARCHITECTURE, TINY)
    fresh.load_state_dict(from_numpy(arrays))
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name])


def test_architecture_is_a_frozen_value() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        ARCHITECTURE.name = "other"  # type: ignore[misc]
    assert isinstance(ARCHITECTURE, Architecture)
