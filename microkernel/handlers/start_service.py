"""``start_request``: start a stopped (or failed) service's replicas."""

from protocols import messages as m
from microkernel.handlers.deadline import wait_until
from microkernel.handlers.registry import handles


@handles(m.StartRequest)
async def start_service(kernel, env):
    req = env.message
    state = await kernel.supervisor.start(req.service, wait_until=wait_until(env, req.wait))
    return m.StartReply(service=req.service, state=state)
