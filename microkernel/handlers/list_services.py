"""``list_request``: the configured services and their specs."""

from protocols import messages as m
from microkernel.handlers.registry import handles


@handles(m.ListRequest)
def list_services(kernel, env):
    return m.ListReply(services=[rec.to_summary() for rec in kernel.supervisor.services.values()])
