"""``add_service_request``: add a service at run time, validated like a configured one.

Who may add what is decided before this runs (``microkernel.security.entries``): an entry the
kernel already knows for an ``operator``, a command line or arbitrary code only for an ``admin``.
"""

from __future__ import annotations

from typing import Any

from protocols import messages as m
from protocols.errors import ErrorCode, MicrokernelError
from microkernel import config as _config
from microkernel.config_reader import ConfigError, Reader, Table
from microkernel.handlers.registry import handles
from microkernel.supervisor.spec import ServiceSpec

_FIELDS = ("entry", "command", "replicas", "config")


def spec_from_request(req: m.AddServiceRequest, *, sampling: bool, known: set[str]) -> ServiceSpec:
    """The ServiceSpec of ``req``, checked by the config file's own validation (errors name the key)."""
    clash = [key for key in _FIELDS if key in req.options]
    if clash:
        raise MicrokernelError(ErrorCode.INVALID_FIELD, f"options.{clash[0]} duplicates the request's own field")
    table: dict[str, Any] = dict(req.options)
    table.update({key: value for key, value in (("entry", req.entry), ("command", req.command)) if value is not None})
    table["replicas"] = req.replicas
    if req.config:
        table["config"] = req.config
    services = Table(Reader("", "add_service_request"), ("services",), {req.name: table})
    try:
        spec = _config._parse_service(services, req.name, sampling=sampling)
    except ConfigError as exc:
        raise MicrokernelError(ErrorCode.INVALID_FIELD, str(exc)) from None
    missing = [dep for dep in spec.depends_on if dep not in known]
    if missing:
        raise MicrokernelError(ErrorCode.INVALID_FIELD, f"services.{req.name}.depends_on: unknown service {missing[0]!r}")
    return spec


@handles(m.AddServiceRequest)
async def add_service(kernel, env):
    req = env.message
    supervisor = kernel.supervisor
    if req.name in supervisor.services:
        raise MicrokernelError(ErrorCode.BAD_STATE, f"service {req.name!r} already exists")
    spec = spec_from_request(req, sampling=kernel.settings.memory_sample_interval > 0, known=set(supervisor.services))
    # The same two steps a configuration reload takes for a new service (supervisor/membership.py).
    supervisor.register_service(spec)
    if spec.autostart:
        try:
            await supervisor.launch_service(req.name)
        except MicrokernelError:
            await supervisor.remove_service(req.name)  # nothing half-added stays behind
            raise
    # Launched replicas are still on their way up; wait_ready / the events say when they are ready.
    state = "starting" if spec.autostart and spec.replicas > 0 else supervisor.service(req.name).aggregate_state()
    return m.AddServiceReply(name=req.name, state=state)
