"""``events_request``: past kernel events from the history ring, and where the live stream is."""

from protocols import messages as m
from protocols.errors import ErrorCode, MicrokernelError
from microkernel.handlers.registry import handles

MAX_EVENTS_PER_REPLY = 10_000


@handles(m.EventsRequest)
def events(kernel, env):
    req = env.message
    if req.limit <= 0 or req.since_seq < 0:
        raise MicrokernelError(ErrorCode.INVALID_FIELD, "limit must be > 0 and since_seq >= 0")
    past = kernel.bus.past(req.since_seq, req.pattern, min(req.limit, MAX_EVENTS_PER_REPLY))
    return m.EventsReply(endpoint=kernel.bus.events_out, events=past, next_seq=kernel.bus.next_seq)
