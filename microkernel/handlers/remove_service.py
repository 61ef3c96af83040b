"""``remove_service_request``: stop every replica of a service and forget it."""

from protocols import messages as m
from microkernel.handlers.registry import handles


@handles(m.RemoveServiceRequest)
async def remove_service(kernel, env):
    name = env.message.name
    kernel.supervisor.service(name)  # an unknown name is an unknown_service error
    await kernel.supervisor.remove_service(name)
    return m.RemoveServiceReply(name=name)
