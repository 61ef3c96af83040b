"""Shared-memory assertions shared by the shared-memory tests."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator

from protocols import handover, shm


def own_segments() -> set[str]:
    """This process's segment names (other processes on the machine have their own)."""
    marker = f".{os.getpid()}."
    return {n for n in os.listdir(shm.SHM_DIR) if n.startswith("mk.") and marker in n}


def no_leftover_segments() -> Iterator[None]:
    """Fixture body: hand-overs settled and arrays collected, the test leaves no segment of ours behind."""
    handover.release_all()
    gc.collect()
    before = own_segments()
    yield
    handover.release_all()
    gc.collect()
    assert own_segments() <= before, "the test left segments behind"
