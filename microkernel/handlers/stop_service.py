"""``stop_request``: stop every replica of a service (SIGTERM to the tree, SIGKILL after the grace)."""

from protocols import messages as m
from microkernel.handlers.registry import handles


@handles(m.StopRequest)
async def stop_service(kernel, env):
    req = env.message
    state = await kernel.supervisor.stop(req.service)
    return m.StopReply(service=req.service, state=state)
