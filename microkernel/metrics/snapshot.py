"""What the metrics endpoint reports, read from the kernel on its own loop.

:func:`take_snapshot` runs on the kernel's loop (it reads loop-owned structures: service records,
the resource manager, the control router, the event bus) and returns plain immutable data; the
HTTP thread only ever sees such snapshots. :class:`ExitCounters` observes ``service.exited``
events as the bus emits them, to count exits and restarts by reason.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Final

from protocols import messages as m
from microkernel.supervisor.states import ReplicaState

__all__ = ["ExitCounters", "Family", "Snapshot", "take_snapshot"]

PREFIX: Final = "microkernel_"
STATES: Final = tuple(state.value for state in ReplicaState)

Labels = tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Family:
    """One metric: ``name`` without the prefix (and, for counters, without ``_total``)."""

    name: str
    kind: str  # "gauge" | "counter"
    help: str
    labels: Labels = ()
    samples: tuple[tuple[Labels, float], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """Every family at one moment; ``taken`` is ``time.monotonic()`` when it was built."""

    taken: float
    families: tuple[Family, ...]
    pids: tuple[tuple[Labels, int], ...] = ()
    """``((service, replica), pid)`` of every live replica (the HTTP thread reads their CPU time)."""


class ExitCounters:
    """Counts ``service.exited`` events by service and reason (``kind`` of the exit reason).

    Registered as an event-bus observer; runs on the loop, so plain counters suffice.
    """

    def __init__(self) -> None:
        self.exits: Counter[tuple[str, str]] = Counter()
        self.restarts: Counter[tuple[str, str]] = Counter()

    def __call__(self, event: Any) -> None:
        if isinstance(event, m.ServiceExited):
            reason = event.reason.get("kind", "unknown") if isinstance(event.reason, dict) else "unknown"
            key = (event.service, str(reason))
            self.exits[key] += 1
            if event.will_restart:
                self.restarts[key] += 1


def _family(name: str, kind: str, help_text: str, labels: Labels, samples: list[tuple[Labels, float]]) -> Family:
    return Family(name=name, kind=kind, help=help_text, labels=labels, samples=tuple(samples))


def take_snapshot(kernel: Any, exits: ExitCounters) -> Snapshot:
    """Read everything the endpoint reports from ``kernel`` (on its loop; cheap: no I/O)."""
    families: list[Family] = [
        _family("uptime_seconds", "gauge", "Seconds since the kernel started.", (), [((), kernel.uptime_s)]),
        _family("info", "gauge", "The kernel's version (always 1).", ("version",), [((str(kernel.version),), 1.0)]),
    ]
    families += _services(kernel.supervisor)
    families += _exits(kernel.supervisor, exits)
    families += _usage(kernel.supervisor, kernel.resources)
    families += _gpu(kernel.resources)
    families += _control(kernel.control)
    families += _bus(kernel.bus)
    logs = getattr(kernel, "logs", None)
    if logs is not None:
        families += _logs(logs)
    pids = tuple(((key[0], str(key[1])), rep.pid) for key, rep in kernel.supervisor.live.items() if rep.pid)
    return Snapshot(taken=time.monotonic(), families=tuple(families), pids=pids)


def _services(supervisor: Any) -> list[Family]:
    desired, up, states = [], [], []
    for name, rec in supervisor.services.items():
        desired.append(((name,), float(rec.desired)))
        up.append(((name,), float(rec.up_count())))
        for rep in rec.replicas:
            current = rep.state.value
            for state in STATES:
                states.append(((name, str(rep.index), state), 1.0 if state == current else 0.0))
    return [
        _family("service_replicas_desired", "gauge", "Replicas a service should have.", ("service",), desired),
        _family("service_replicas_up", "gauge", "Replicas of a service that are ready or running.", ("service",), up),
        _family("replica_state", "gauge", "1 for the state a replica is in, 0 for the others.",
                ("service", "replica", "state"), states),
    ]


def _exits(supervisor: Any, exits: ExitCounters) -> list[Family]:
    # Services with no exit yet still show a 0 for the common reasons, so rate() works from the start.
    names = list(supervisor.services)
    exit_samples = {key: float(n) for key, n in exits.exits.items()}
    restart_samples = {key: float(n) for key, n in exits.restarts.items()}
    return [
        _family("restarts", "counter", "Restarts of a service's replicas, by the reason of the exit that caused them.",
                ("service", "reason"), _with_zeros(restart_samples, names)),
        _family("replica_exits", "counter", "Replica exits (restarted or not), by reason.",
                ("service", "reason"), _with_zeros(exit_samples, names)),
    ]


def _with_zeros(samples: dict[tuple[str, str], float], names: list[str]) -> list[tuple[Labels, float]]:
    out = dict(samples)
    for name in names:
        for reason in ("exit", "signal"):
            out.setdefault((name, reason), 0.0)
    return sorted(out.items())


def _usage(supervisor: Any, resources: Any) -> list[Family]:
    rss, cpu, threads, procs = [], [], [], []
    for key, usage in resources.usage.items():
        if key not in supervisor.live:
            continue  # the last figures of a replica that is gone
        labels = (key[0], str(key[1]))
        rss.append((labels, float(usage.rss)))
        threads.append((labels, float(usage.threads)))
        procs.append((labels, float(usage.processes)))
        if usage.cpu_percent is not None:
            cpu.append((labels, usage.cpu_percent / 100.0))
    labels = ("service", "replica")
    return [
        _family("replica_rss_bytes", "gauge", "Resident memory of a replica's whole process tree (last sample).", labels, rss),
        _family("replica_cpu_cores", "gauge",
                "CPU use of a replica's process tree in cores (1.0 = one core busy) over the last sampling interval.",
                labels, cpu),
        _family("replica_threads", "gauge", "Threads in a replica's process tree (last sample).", labels, threads),
        _family("replica_processes", "gauge", "Processes in a replica's tree (last sample).", labels, procs),
    ]


def _gpu(resources: Any) -> list[Family]:
    table = resources.broker.table.snapshot()
    totals, used, free = [], [], []
    for d in table.devices:
        labels = (d.device.uuid, str(d.device.index))
        totals.append((labels, float(d.device.memory_total)))
        used.append((labels, float(d.used)))
        free.append((labels, float(d.free)))
    leases, modes = [], Counter[str]()
    for lease in table.leases:
        modes[lease.mode.value] += 1
        for uuid in lease.devices:
            leases.append(((lease.id, lease.holder, uuid, lease.mode.value), float(lease.memory)))
    measured = [((holder, uuid), float(n)) for holder, per in resources.gpu_used.items() for uuid, n in per.items()]
    return [
        _family("gpu_memory_total_bytes", "gauge", "Memory of each GPU device.", ("device", "index"), totals),
        _family("gpu_memory_leased_bytes", "gauge", "Device memory promised to leases (a whole exclusive device counts fully).",
                ("device", "index"), used),
        _family("gpu_memory_free_bytes", "gauge", "Device memory not promised to any lease.", ("device", "index"), free),
        _family("lease_memory_bytes", "gauge", "A lease's byte budget per device (0 = the whole device).",
                ("lease", "holder", "device", "mode"), leases),
        _family("gpu_memory_used_bytes", "gauge", "Device memory a lease holder's processes use (NVML audit; none without NVML).",
                ("holder", "device"), measured),
        _family("leases", "gauge", "GPU leases held, by mode.", ("mode",), [((mode,), float(modes.get(mode, 0)))
                                                                          for mode in ("exclusive", "shared")]),
        _family("lease_waiters", "gauge", "Lease requests waiting in the queue.", (),
                [((), float(len(resources.broker.waiters())))]),
    ]


def _control(control: Any) -> list[Family]:
    return [
        _family("control_requests", "counter", "Control messages received (requests and service messages).", (),
                [((), float(control.requests))]),
        _family("control_errors", "counter", "Error replies sent on the control socket.", (), [((), float(control.errors))]),
        _family("control_inflight", "gauge", "Control requests being handled asynchronously (waiting commands, long polls).",
                (), [((), float(control.inflight))]),
        _family("control_send_queue", "gauge", "Replies queued on the control socket, not yet taken by ZeroMQ.", (),
                [((), float(control.socket.queued))]),
        _family("control_replies_dropped", "counter", "Replies dropped because a client's queue was full.", (),
                [((), float(control.socket.dropped))]),
    ]


def _bus(bus: Any) -> list[Family]:
    return [
        _family("events_published", "counter", "Kernel events published on the event bus, by topic.", ("topic",),
                sorted(((topic,), float(n)) for topic, n in bus.published.items())),
        _family("event_history", "gauge", "Kernel events kept for late subscribers (the history ring).", (),
                [((), float(len(bus.history)))]),
    ]


def _logs(logs: Any) -> list[Family]:
    lines, dropped = [], []
    for name, file in logs.files.items():
        for stream, n in file.lines.items():
            lines.append(((name, stream), float(n)))
        dropped.append(((name,), float(file.dropped)))
    return [
        _family("log_lines", "counter", "Lines of replica output written to a service's log file, by stream.",
                ("service", "stream"), lines),
        _family("log_lines_dropped", "counter", "Lines of replica output lost to write errors.", ("service",), dropped),
    ]
