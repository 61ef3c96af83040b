"""``leases_request``: the GPU inventory, its leases, holders and waiters (``mkctl leases``)."""

from protocols import messages as m
from microkernel.handlers.registry import handles


@handles(m.LeasesRequest)
def leases(kernel, env):
    return m.LeasesReply(**kernel.resources.leases_view())
