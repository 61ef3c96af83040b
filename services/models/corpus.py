"""The text corpora that ship with the project (the trainer's ``dataset="corpus"``).

``corpus`` (``corpus.txt``, about 16 KB of plain ASCII English) is original text written for
this project: short stories, notes and a letter about lighthouses, bakers, gardeners and
supervised processes. It is distributed under the project's licence (Apache-2.0). Small on
purpose: the shipped ``charformer`` learns visibly from it within a minute on 2 CPU cores.
"""

from __future__ import annotations

from pathlib import Path

from protocols.errors import ErrorCode, MicrokernelError

__all__ = ["SHIPPED", "names", "read"]

_HERE = Path(__file__).resolve().parent
SHIPPED: dict[str, Path] = {"corpus": _HERE / "corpus.txt"}
"""Shipped corpus name -> file."""


def names() -> list[str]:
    """The names of the shipped corpora."""
    return sorted(SHIPPED)


def read(name: str) -> str:
    """The text of the shipped corpus ``name``; ``not_found`` (naming the known ones) otherwise."""
    path = SHIPPED.get(name)
    if path is None:
        raise MicrokernelError(ErrorCode.NOT_FOUND, f"no shipped corpus {name!r} (shipped: {', '.join(names())})")
    return path.read_text(encoding="utf-8")
