"""``heartbeat``: one-way liveness from a service replica (no reply)."""

from protocols import messages as m
from microkernel.handlers.registry import handles


@handles(m.Heartbeat)
def heartbeat(kernel, env):
    msg = env.message
    kernel.supervisor.on_heartbeat(msg.service, msg.replica, msg.incarnation)
    return None
