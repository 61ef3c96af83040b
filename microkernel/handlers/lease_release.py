"""``lease_release_request``: give a GPU lease back; the queue is served at once."""

from protocols import messages as m
from microkernel.handlers.registry import handles


@handles(m.LeaseReleaseRequest)
def lease_release(kernel, env):
    return m.LeaseReleaseReply(released=kernel.resources.release(env.message.lease_id) is not None)
