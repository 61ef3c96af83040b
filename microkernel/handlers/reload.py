"""``reload_request``: re-read the configuration file and apply the difference (see ``microkernel.reload``)."""

from protocols import messages as m
from microkernel.handlers.registry import handles


@handles(m.ReloadRequest)
async def reload(kernel, env):
    return await kernel.reloader.reload(f"reload_request from {env.header.sender or 'a client'}")
