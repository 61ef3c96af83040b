"""Model architectures the loader, inferencer and trainer know by name, and the shipped corpora.

``registry.resolve(name)`` turns a name (``"charformer"``), an entry point of the
``microkernel.models`` group or an import path (``"pkg.module:attr"``) into an
:class:`~services.models.registry.Architecture`. Importing this package does not import torch.
"""

from __future__ import annotations

from services.models.registry import Architecture, build_model, resolve

__all__ = ["Architecture", "build_model", "resolve"]
