"""The inferencer service: dynamic batching over a model shared by the loader (see ``service``).

``Inferencer`` is imported on first use, so the batching core (``services.inferencer.batcher``)
can be used and tested without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from services.inferencer.service import Inferencer

__all__ = ["Inferencer"]


def __getattr__(name: str) -> Any:
    if name == "Inferencer":
        from services.inferencer.service import Inferencer

        return Inferencer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
