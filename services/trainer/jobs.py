"""Training jobs as data: the request's validation, the job record and its states (no torch).

A job record lives in the store as a JSON blob under ``jobs/<job>`` (a new version on every
state change and checkpoint), so a restarted trainer finds the jobs it was running.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import time
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any

from protocols.errors import ErrorCode, MicrokernelError

__all__ = ["JobRecord", "JobSpec", "JobState", "OPTIMIZERS", "job_key", "new_job_id", "validate_start"]

_SEGMENT = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
JOB_PREFIX = "jobs/"
CHECKPOINT_PREFIX = "checkpoints/"
MODEL_PREFIX = "models/"
OPTIMIZERS = ("adamw", "adam", "sgd")
_OPTIMIZER_KEYS = {"name", "lr", "weight_decay", "betas", "momentum", "eps"}
MAX_STEPS = 10_000_000


class JobState(StrEnum):
    """Where a job is in its life. ``running`` jobs are resumed by a restarted trainer."""

    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FINISHED = "finished"
    FAILED = "failed"

    @property
    def active(self) -> bool:
        """Still owned by a training loop (or to be resumed by one)."""
        return self in (JobState.RUNNING, JobState.STOPPING)


@dataclass(frozen=True, slots=True, kw_only=True)
class JobSpec:
    """What ``train_start`` asked for, validated; ``steps`` is resolved from ``epochs`` when given."""

    job: str
    model: str
    config: dict[str, Any]
    dataset: str
    optimizer: dict[str, Any]
    steps: int
    batch_size: int
    checkpoint_every: int
    seed: int
    name: str
    epochs: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class JobRecord:
    """A job's persistent state (the ``jobs/<job>`` blob)."""

    spec: JobSpec
    state: JobState
    step: int = 0
    loss: float | None = None
    checkpoint: int | None = None
    """Store version of ``checkpoints/<job>`` holding the last checkpoint (None: none yet)."""
    weights: str | None = None
    error: str | None = None
    owner: int = 0
    """The replica that runs the job (every rank, when the trainer is distributed)."""
    created_ns: int = field(default_factory=time.time_ns)
    updated_ns: int = field(default_factory=time.time_ns)

    def evolve(self, **changes: Any) -> JobRecord:
        """A copy with ``changes`` and a fresh ``updated_ns``."""
        return replace(self, updated_ns=time.time_ns(), **changes)

    def to_json(self) -> bytes:
        """The blob stored under ``jobs/<job>``."""
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes | memoryview) -> JobRecord:
        """Parse a stored blob (``corrupted`` if it is not a job record)."""
        try:
            raw = json.loads(bytes(data))
            spec = JobSpec(**raw.pop("spec"))
            return cls(spec=spec, state=JobState(raw.pop("state")), **raw)
        except (ValueError, TypeError, KeyError) as exc:
            raise MicrokernelError(ErrorCode.CORRUPTED, f"stored job record is unreadable: {exc}") from None

    def status(self) -> dict[str, Any]:
        """The ``train_status`` view of this job."""
        s = self.spec
        return {"job": s.job, "state": self.state.value, "step": self.step, "steps": s.steps, "loss": self.loss,
                "model": s.model, "dataset": s.dataset, "batch_size": s.batch_size, "name": s.name,
                "checkpoint_every": s.checkpoint_every, "checkpoint": self.checkpoint, "weights": self.weights,
                "error": self.error, "created_ns": self.created_ns, "updated_ns": self.updated_ns}


def job_key(job: str) -> str:
    """The store key of a job's record."""
    return JOB_PREFIX + job


def new_job_id() -> str:
    """A fresh job id, e.g. ``job-3f9a1c2e``."""
    return f"job-{secrets.token_hex(4)}"


def _invalid(reason: str) -> MicrokernelError:
    return MicrokernelError(ErrorCode.INVALID_FIELD, reason)


def _int(value: Any, key: str, minimum: int, maximum: int = MAX_STEPS) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise _invalid(f"{key} must be an integer in {minimum}..{maximum}, got {value!r}")
    return value


def check_segment(value: Any, key: str) -> str:
    """``value`` if it is usable as one store-key segment, else ``invalid_field``."""
    if not isinstance(value, str) or not _SEGMENT.match(value) or value in (".", ".."):
        raise _invalid(f"{key} must be 1-128 characters of [A-Za-z0-9._-], got {value!r}")
    return value


def check_optimizer(optimizer: Any) -> dict[str, Any]:
    """A validated optimizer table: ``{"name": "adamw"|"adam"|"sgd", "lr": float, ...}``."""
    if not isinstance(optimizer, dict):
        raise _invalid(f"optimizer must be a map like {{'name': 'adamw', 'lr': 0.003}}, got {optimizer!r}")
    unknown = sorted(set(optimizer) - _OPTIMIZER_KEYS)
    if unknown:
        raise _invalid(f"optimizer has unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(_OPTIMIZER_KEYS))})")
    opt = {"name": "adamw", "lr": 3e-3, **optimizer}
    if opt["name"] not in OPTIMIZERS:
        raise _invalid(f"optimizer name must be one of {', '.join(OPTIMIZERS)}, got {opt['name']!r}")
    for key in ("lr", "weight_decay", "momentum", "eps"):
        if key in opt:
            v = opt[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise _invalid(f"optimizer {key} must be a non-negative number, got {v!r}")
            opt[key] = float(v)
    if "betas" in opt:
        b = opt["betas"]
        if not (isinstance(b, (list, tuple)) and len(b) == 2 and all(isinstance(x, (int, float)) and 0 <= x < 1 for x in b)):
            raise _invalid(f"optimizer betas must be two numbers in [0, 1), got {b!r}")
        opt["betas"] = [float(x) for x in b]
    return opt


def validate_start(*, job: str | None, model: str, config: Any, dataset: Any, optimizer: Any, steps: Any,
                   epochs: Any, batch_size: Any, checkpoint_every: Any, seed: Any, name: str | None,
                   default_name: str) -> JobSpec:
    """The request's fields checked (``invalid_field`` naming the key); ``steps`` may still be 0
    when ``epochs`` is given (the caller resolves it once the dataset's size is known)."""
    job = new_job_id() if job is None else check_segment(job, "job")
    if config is not None and not isinstance(config, dict):
        raise _invalid(f"config must be a map of model options, got {type(config).__name__}")
    if not isinstance(dataset, str) or not dataset:
        raise _invalid(f"dataset must be a store key or a shipped corpus name, got {dataset!r}")
    if (steps is None) == (epochs is None):
        raise _invalid("give exactly one of steps or epochs" + ("" if steps is None else f" (got steps={steps!r}, epochs={epochs!r})"))
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or not 0 < epochs <= 1e6):
        raise _invalid(f"epochs must be a positive number, got {epochs!r}")
    return JobSpec(
        job=job, model=model, config=dict(config or {}), dataset=dataset, optimizer=check_optimizer(optimizer),
        steps=0 if steps is None else _int(steps, "steps", 1), batch_size=_int(batch_size, "batch_size", 1, 65536),
        checkpoint_every=_int(checkpoint_every, "checkpoint_every", 0), seed=_int(seed, "seed", 0, 2**31 - 1),
        name=check_segment(default_name if name is None else name, "name"),
        epochs=None if epochs is None else float(epochs),
    )
