"""Control request handlers, one module per request type, registered explicitly below."""

from microkernel.handlers import (  # noqa: F401  (imported for registration)
    add_service,
    events,
    heartbeat,
    lease_acquire,
    lease_release,
    leases,
    list_services,
    logs,
    lookup,
    ping,
    progress,
    ready,
    reload,
    remove_service,
    restart_service,
    scale_service,
    shutdown,
    start_service,
    status,
    stop_service,
)
from microkernel.handlers.registry import HANDLERS


def all_handlers() -> dict:
    """Every registered handler by message class."""
    return dict(HANDLERS)
