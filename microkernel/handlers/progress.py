"""``progress_request``: a starting replica reports progress and extends its start timeout."""

from protocols import messages as m
from microkernel.handlers.registry import handles


@handles(m.ProgressRequest)
def progress(kernel, env):
    return m.ProgressReply(deadline_in_s=kernel.supervisor.on_progress(env.message))
