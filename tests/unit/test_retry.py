"""services.retry: which errors are retried, for how long, and what the caller hears."""

from __future__ import annotations

import asyncio
import logging

import pytest

from protocols.errors import CallTimeout, ErrorCode, MicrokernelError, RemoteError
from services.retry import TRANSIENT, retry_transient

LOG = logging.getLogger("test.retry")


class Flaky:
    """An attempt that fails with ``errors`` in turn, then returns "done"; records its timeouts."""

    def __init__(self, *errors: MicrokernelError) -> None:
        self.errors = list(errors)
        self.timeouts: list[float] = []

    async def __call__(self, timeout: float) -> str:
        self.timeouts.append(timeout)
        if self.errors:
            raise self.errors.pop(0)
        return "done"


def test_transient_errors_are_retried_until_the_call_goes_through(caplog: pytest.LogCaptureFixture) -> None:
    attempt = Flaky(RemoteError(ErrorCode.NOT_READY, "no ready replica"), CallTimeout("lost"),
                    RemoteError(ErrorCode.UNAVAILABLE, "gone"), RemoteError(ErrorCode.SHUTTING_DOWN, "stopping"))
    heard: list[tuple[ErrorCode, float]] = []

    async def on_retry(exc: MicrokernelError, pause: float) -> None:
        heard.append((exc.code, pause))

    with caplog.at_level(logging.WARNING, logger="test.retry"):
        result = asyncio.run(retry_transient(attempt, timeout=30.0, what="store get", log=LOG, on_retry=on_retry,
                                             attempt_s=5.0))
    assert result == "done"
    assert [code for code, _ in heard] == [ErrorCode.NOT_READY, ErrorCode.TIMEOUT, ErrorCode.UNAVAILABLE,
                                           ErrorCode.SHUTTING_DOWN]
    assert [pause for _, pause in heard] == [0.1, 0.2, 0.4, 0.8]  # doubling
    assert len(attempt.timeouts) == 5 and all(0 < t <= 5.0 for t in attempt.timeouts)  # capped per attempt
    assert "store get: not_ready (no ready replica); retrying in 0.1s" in caplog.text


def test_other_errors_are_raised_at_once() -> None:
    for code in set(ErrorCode) - TRANSIENT:
        attempt = Flaky(RemoteError(code, "no"))
        with pytest.raises(RemoteError) as raised:
            asyncio.run(retry_transient(attempt, timeout=30.0, what="x", log=LOG))
        assert raised.value.code == code and len(attempt.timeouts) == 1


def test_the_last_error_is_raised_when_the_budget_is_spent() -> None:
    attempt = Flaky(*[RemoteError(ErrorCode.NOT_READY, f"try {i}") for i in range(100)])
    with pytest.raises(RemoteError) as raised:
        asyncio.run(retry_transient(attempt, timeout=0.5, what="x", log=LOG))
    # Pauses 0.1 + 0.2 fit in 0.5 s, the next 0.4 does not: three attempts.
    assert raised.value.reason == "try 2" and len(attempt.timeouts) == 3
    assert attempt.timeouts[0] == pytest.approx(0.5, abs=0.05) and attempt.timeouts[-1] < attempt.timeouts[0]
