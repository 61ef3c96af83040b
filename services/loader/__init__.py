"""The model loader service: model versions loaded once into shared memory (see ``service``)."""

from __future__ import annotations

from services.loader.service import Loader

__all__ = ["Loader"]
