"""``status_request``: the kernel summary and the state of every (or one) service."""

from protocols import messages as m
from microkernel.handlers.registry import handles


@handles(m.StatusRequest)
def status(kernel, env):
    names = None if env.message.service is None else [env.message.service]
    return m.StatusReply(kernel=kernel.summary(), services=kernel.supervisor.status(names))
