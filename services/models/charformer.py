"""charformer: the tiny character-level transformer that ships with the project.

A decoder-only transformer over a fixed byte-sized vocabulary (newline, tab and printable ASCII;
everything else maps to one "unknown" id, shown as ``?``), so a trained model never depends on
the corpus it saw and no input can crash it. Defaults: 2 layers, d=64, 4 heads, context 64,
about 110 k parameters; one training step at batch 32 takes milliseconds on 2 CPU cores.

``infer_batch(model, prompts, config)`` returns the greedy continuation of each prompt string
(``config["generate"]`` characters, default 32), the whole batch in one forward pass per char.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from protocols.errors import ErrorCode, MicrokernelError
from services.models.registry import Architecture

__all__ = ["ARCHITECTURE", "CharFormer", "DEFAULT_CONFIG", "UNKNOWN", "VOCAB_SIZE", "decode", "encode"]

_CHARS = "\n\t" + "".join(chr(c) for c in range(32, 127))
UNKNOWN = 0
"""The id of every character outside the vocabulary."""
VOCAB_SIZE = len(_CHARS) + 1
_ID = {ch: i + 1 for i, ch in enumerate(_CHARS)}
_UNKNOWN_SHOWN = "?"

DEFAULT_CONFIG: dict[str, Any] = {
    "context": 64,      # characters the model sees
    "d_model": 64,
    "n_heads": 4,
    "n_layers": 2,
    "dropout": 0.0,
    "generate": 32,     # characters infer_batch appends to each prompt
}


def encode(text: str) -> list[int]:
    """Character ids of ``text``; characters outside the vocabulary become ``UNKNOWN``."""
    return [_ID.get(ch, UNKNOWN) for ch in text]


def decode(ids: list[int]) -> str:
    """The text of ``ids`` (unknown ids shown as ``?``)."""
    return "".join(_CHARS[i - 1] if 0 < i <= len(_CHARS) else _UNKNOWN_SHOWN for i in ids)


class _Block(nn.Module):
    """Pre-norm causal self-attention + MLP."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class CharFormer(nn.Module):
    """Token + position embeddings, ``n_layers`` causal blocks, a linear head over the vocabulary."""

    def __init__(self, *, context: int, d_model: int, n_heads: int, n_layers: int, dropout: float) -> None:
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(VOCAB_SIZE, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, n_heads, dropout) for _ in range(n_layers))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB_SIZE)

    @staticmethod
    def encode(text: str) -> list[int]:
        """Token ids of ``text`` (what the trainer calls to turn a text dataset into tokens)."""
        return encode(text)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, time, vocab)`` for ids ``(batch, time)``, ``time <= context``."""
        t = ids.shape[1]
        x = self.tok(ids) + self.pos(torch.arange(t, device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))

    def loss(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-character cross-entropy."""
        logits = self(ids)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _positive_int(config: dict[str, Any], key: str) -> int:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MicrokernelError(ErrorCode.INVALID_FIELD, f"charformer config {key!r} must be a positive integer, got {value!r}")
    return value


def build(config: dict[str, Any]) -> CharFormer:
    """A freshly initialised ``CharFormer`` for a merged config (validated here)."""
    d_model, n_heads = _positive_int(config, "d_model"), _positive_int(config, "n_heads")
    if d_model % n_heads:
        raise MicrokernelError(ErrorCode.INVALID_FIELD, f"charformer config d_model={d_model} is not divisible by n_heads={n_heads}")
    dropout = config["dropout"]
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise MicrokernelError(ErrorCode.INVALID_FIELD, f"charformer config 'dropout' must be in [0, 1), got {dropout!r}")
    _positive_int(config, "generate")
    return CharFormer(context=_positive_int(config, "context"), d_model=d_model, n_heads=n_heads,
                      n_layers=_positive_int(config, "n_layers"), dropout=float(dropout))


def infer_batch(model: torch.nn.Module, prompts: list[Any], config: dict[str, Any]) -> list[str]:
    """Greedy continuations of ``prompts`` (strings), ``config["generate"]`` characters each."""
    for p in prompts:
        if not isinstance(p, str):
            raise MicrokernelError(ErrorCode.INVALID_FIELD, f"charformer inputs are prompt strings, got {type(p).__name__}")
    if not prompts:
        return []
    context = int(config.get("context", DEFAULT_CONFIG["context"]))
    steps = int(config.get("generate", DEFAULT_CONFIG["generate"]))
    device = next(model.parameters()).device
    # An empty prompt starts from a newline: every sequence needs at least one id.
    seqs = [encode(p) or encode("\n") for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    with torch.inference_mode():
        for _ in range(steps):
            windows = [s[-context:] for s in seqs]
            width = max(len(w) for w in windows)
            # Right padding is invisible to causal attention at each sequence's own last position.
            batch = torch.tensor([w + [UNKNOWN] * (width - len(w)) for w in windows], device=device)
            logits = model(batch)
            last = torch.tensor([len(w) - 1 for w in windows], device=device)
            nxt = logits[torch.arange(len(windows), device=device), last].argmax(-1).tolist()
            for i, token in enumerate(nxt):
                seqs[i].append(token)
                out[i].append(token)
    return [decode(o) for o in out]


_PROMPTS = ("The ", "A supervisor ", "When the ", "In the morning ", "She said ", "Every process ",
            "The river ", "Once upon a time ")


def example_inputs(n: int) -> list[str]:
    """``n`` sample prompts."""
    return [_PROMPTS[i % len(_PROMPTS)] for i in range(n)]


ARCHITECTURE = Architecture(
    name="charformer",
    default_config=DEFAULT_CONFIG,
    build=build,
    infer_batch=infer_batch,
    example_inputs=example_inputs,
)
