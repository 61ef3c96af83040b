"""``ready_request``: a replica announces readiness with its data-plane endpoint and methods."""

from protocols import messages as m
from microkernel.handlers.registry import handles


@handles(m.ReadyRequest)
def ready(kernel, env):
    return m.ReadyReply(state=kernel.supervisor.on_ready(env.message))
