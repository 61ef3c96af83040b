"""``shutdown_request``: answer, then stop every service and the kernel."""

from protocols import messages as m
from microkernel.handlers.registry import handles


@handles(m.ShutdownRequest)
def shutdown(kernel, env):
    kernel.request_shutdown(f"shutdown_request from {env.header.sender or 'a client'}")
    return m.ShutdownReply(services=len(kernel.supervisor.services))
