"""What the batcher counts: requests, outcomes, batch sizes, queue time and latency percentiles."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BatchMetrics", "percentile"]

# Percentiles are taken over the most recent samples: a long-running replica keeps bounded memory
# and its figures follow the current load.
RECENT_SAMPLES = 4096


def percentile(samples: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of ``samples``; None when there are none."""
    if not samples:
        return None
    ordered = sorted(samples)
    k = max(0, min(len(ordered) - 1, int(round(q / 100.0 * len(ordered) + 0.5)) - 1))
    return ordered[k]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


@dataclass(slots=True)
class BatchMetrics:
    """Counters and recent samples of one batcher (times in seconds of its clock)."""

    requests: int = 0  # accepted into the queue
    computed: int = 0  # answered with a result
    errors: int = 0  # answered with the compute's error
    overloaded: int = 0  # refused: queue full
    deadline_exceeded: int = 0  # answered deadline_exceeded, never computed
    batches: int = 0
    max_depth: int = 0
    batch_sizes: collections.Counter[int] = field(default_factory=collections.Counter)
    queue_times: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=RECENT_SAMPLES))
    latencies: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=RECENT_SAMPLES))

    def observe_depth(self, depth: int) -> None:
        """Note the queue depth after an arrival."""
        if depth > self.max_depth:
            self.max_depth = depth

    def observe_batch(self, size: int, queue_times: list[float]) -> None:
        """A batch of ``size`` left the queue; ``queue_times`` is how long each request waited."""
        self.batches += 1
        self.batch_sizes[size] += 1
        self.queue_times.extend(queue_times)

    def observe_latency(self, seconds: float) -> None:
        """A request was answered with a result ``seconds`` after its arrival."""
        self.latencies.append(seconds)

    def snapshot(self, **extra: Any) -> dict[str, Any]:
        """A msgpack-ready view (times in milliseconds); ``extra`` keys are merged in."""
        queue_times, latencies = list(self.queue_times), list(self.latencies)
        sizes = self.batch_sizes
        mean = sum(s * n for s, n in sizes.items()) / self.batches if self.batches else None
        return {
            "requests": self.requests,
            "computed": self.computed,
            "errors": self.errors,
            "overloaded": self.overloaded,
            "deadline_exceeded": self.deadline_exceeded,
            "batches": self.batches,
            # msgpack maps with int keys do not survive JSON: the histogram is keyed by strings.
            "batch_sizes": {str(size): sizes[size] for size in sorted(sizes)},
            "mean_batch_size": None if mean is None else round(mean, 3),
            "max_depth": self.max_depth,
            "queue_ms": {"p50": _ms(percentile(queue_times, 50)), "p99": _ms(percentile(queue_times, 99))},
            "latency_ms": {"p50": _ms(percentile(latencies, 50)), "p99": _ms(percentile(latencies, 99))},
            **extra,
        }
