"""The trainer service: ``entry = "services.trainer:Trainer"`` (see ``service.py``)."""

from __future__ import annotations

from services.trainer.service import Trainer

__all__ = ["Trainer"]
