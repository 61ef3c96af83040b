"""How long a waiting command may wait: until shortly before its caller gives up."""

import time

from protocols.wire import Envelope

# Reply this long before the caller's deadline so the reply arrives before it times out.
REPLY_MARGIN_S = 0.25
DEFAULT_WAIT_S = 30.0


def wait_until(env: Envelope, wanted: bool) -> float | None:
    """The monotonic time a ``wait = true`` command waits until, or None when it must not wait."""
    if not wanted:
        return None
    budget = DEFAULT_WAIT_S
    if env.header.deadline_ns is not None:
        budget = (env.header.deadline_ns - time.time_ns()) / 1e9 - REPLY_MARGIN_S
    return time.monotonic() + max(0.0, budget)
