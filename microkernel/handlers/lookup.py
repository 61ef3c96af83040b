"""``lookup_request``: the name service — where a service's ready replicas listen."""

from protocols import messages as m
from protocols.errors import ErrorCode, MicrokernelError
from microkernel.handlers.registry import handles


@handles(m.LookupRequest)
def lookup(kernel, env):
    reply = kernel.supervisor.lookup(env.message.service)
    if not reply.endpoints:
        raise MicrokernelError(
            ErrorCode.NOT_READY,
            f"service {reply.service!r} has no ready replica ({kernel.supervisor.service(reply.service).aggregate_state()})",
        )
    return reply
