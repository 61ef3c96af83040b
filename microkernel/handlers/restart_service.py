"""``restart_request``: stop then start a service."""

from protocols import messages as m
from microkernel.handlers.deadline import wait_until
from microkernel.handlers.registry import handles


@handles(m.RestartRequest)
async def restart_service(kernel, env):
    req = env.message
    state = await kernel.supervisor.restart(req.service, wait_until=wait_until(env, req.wait))
    return m.RestartReply(service=req.service, state=state)
