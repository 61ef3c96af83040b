"""``scale_request``: change a service's replica count."""

from protocols import messages as m
from microkernel.handlers.deadline import wait_until
from microkernel.handlers.registry import handles


@handles(m.ScaleRequest)
async def scale_service(kernel, env):
    req = env.message
    previous = await kernel.supervisor.scale(req.service, req.replicas, wait_until=wait_until(env, req.wait))
    return m.ScaleReply(service=req.service, replicas=req.replicas, previous=previous)
