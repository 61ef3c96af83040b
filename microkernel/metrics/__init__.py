"""The Prometheus metrics endpoint (``[metrics] enabled = true``): ``snapshot`` reads the kernel on
its loop, ``server`` serves the snapshots from prometheus-client's HTTP thread."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from microkernel.config_observability import MetricsSettings

if TYPE_CHECKING:
    from microkernel.metrics.server import MetricsServer

__all__ = ["start_metrics"]

log = logging.getLogger("microkernel.metrics")


def start_metrics(settings: MetricsSettings, kernel: Any) -> MetricsServer | None:
    """Start the endpoint if enabled (on the kernel's loop); None when disabled or it cannot bind.

    prometheus-client is imported only here: a kernel with metrics off never loads it.
    """
    if not settings.enabled:
        return None
    from microkernel.metrics.server import MetricsServer

    server = MetricsServer(settings, kernel)
    try:
        server.start()
    except OSError as exc:
        # Supervision matters more than metrics: say so loudly, keep running.
        log.error("metrics endpoint not started: cannot bind %s:%d: %s", settings.address, settings.port, exc)
        server.stop()
        return None
    return server
