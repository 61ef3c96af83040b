"""Fixtures for unit tests that opt in with ``pytest.mark.usefixtures``."""

from __future__ import annotations

import pytest

from tests.segments import no_leftover_segments

no_leftover_segments = pytest.fixture(no_leftover_segments)
