"""``ping_request``: the cheapest control round trip."""

from protocols import messages as m
from microkernel.handlers.registry import handles


@handles(m.PingRequest)
def ping(kernel, env):
    return m.PingReply(version=kernel.version, pid=kernel.pid, uptime_s=kernel.uptime_s)
