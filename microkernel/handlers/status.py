"""``status_request``: the kernel summary and the state of every (or one) service (``brief``: states only)."""

from protocols import messages as m
from microkernel.handlers.registry import handles


@handles(m.StatusRequest)
def status(kernel, env):
    return kernel.status_reply(env.message.service, env.message.brief)
