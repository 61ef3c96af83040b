"""The store service: durable, versioned artifacts and tensors (``entry = "services.store:Store"``).

See ``docs/draft-store.md`` for the RPC surface, configuration and guarantees, and
``services.store.client`` for chunked transfers of payloads larger than one message.
"""

from __future__ import annotations

from services.store.service import Store

__all__ = ["Store"]
