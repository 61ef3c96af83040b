"""The training loop: one job's steps on one rank, run on a worker thread (never on the event loop).

Batches are a pure function of (seed, step): step ``s`` draws ``batch_size`` windows of the
token stream with a generator seeded from both, and rank ``r`` of ``W`` takes the ``r``-th slice
of that global batch. So a resumed run continues the same curve, and W ranks with DDP compute
the same update as one rank on the whole global batch.

Each step ends with one small all-reduce of ``[loss, stop, shutdown]`` across the ranks: every
rank reports the same (global-batch) loss and every rank stops at the same step, whichever
replica received ``train_stop``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from protocols.errors import ErrorCode, MicrokernelError
from services.models.registry import Architecture, build_model
from services.trainer.checkpoints import Checkpoint, capture, restore
from services.trainer.distributed import DistEnv
from services.trainer.jobs import JobSpec

__all__ = ["Control", "Outcome", "RunHooks", "TokenBatches", "TrainingRun", "make_optimizer", "text_encoder"]

_SEED_STRIDE = 1_000_003  # (seed, step) -> one generator seed, distinct for every pair in range


class Control(IntEnum):
    """What the service asks of the loop between steps."""

    CONTINUE = 0
    STOP = 1        # train_stop: checkpoint, end the job as stopped
    SHUTDOWN = 2    # the replica is stopping: checkpoint, leave the job running (resumed later)


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """How a run ended."""

    control: Control   # CONTINUE: all steps done
    step: int
    loss: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class RunHooks:
    """Callbacks of a run, called on the training thread. Only rank 0 gets progress/checkpoints."""

    control: Callable[[], Control] = lambda: Control.CONTINUE
    progress: Callable[[int, float, float], None] = lambda step, loss, samples_per_s: None
    checkpoint: Callable[[Checkpoint], None] = lambda ckpt: None
    progress_interval_s: float = 0.5
    progress_every: int = 0   # also report every N steps (0: by time only)


class TokenBatches:
    """Deterministic (input, target) windows of a token stream."""

    def __init__(self, tokens: torch.Tensor, context: int, seed: int) -> None:
        if tokens.numel() < context + 2:
            raise MicrokernelError(ErrorCode.INVALID_FIELD,
                                   f"the dataset has {tokens.numel()} tokens; the model needs at least {context + 2}")
        self.tokens = tokens
        self.context = context
        self.seed = seed

    @property
    def windows(self) -> int:
        """How many disjoint windows the stream holds (what one epoch means)."""
        return max(1, (self.tokens.numel() - 1) // self.context)

    def batch(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of the global batch of ``step``."""
        gen = torch.Generator().manual_seed(self.seed * _SEED_STRIDE + step)
        starts = torch.randint(0, self.tokens.numel() - self.context - 1, (batch_size,), generator=gen)
        per_rank = batch_size // world_size
        mine = starts[rank * per_rank:(rank + 1) * per_rank]
        offsets = torch.arange(self.context + 1)
        windows = self.tokens[mine[:, None] + offsets]
        return windows[:, :-1], windows[:, 1:]


def text_encoder(model: torch.nn.Module) -> Callable[[str], list[int]]:
    """The model's ``encode(text) -> ids``: the trainer trains causal language models on text.

    A trainable architecture builds a module with an ``encode`` method, a ``forward(ids)``
    returning logits ``(batch, time, vocab)`` and a ``context`` config key.
    """
    encode = getattr(model, "encode", None)
    if not callable(encode):
        raise MicrokernelError(ErrorCode.INVALID_FIELD,
                               f"{type(model).__name__} cannot be trained on text: it has no encode(text) method")
    return encode


def make_optimizer(params: Any, spec: dict[str, Any]) -> torch.optim.Optimizer:
    """The optimizer a validated ``spec`` (see ``jobs.check_optimizer``) names."""
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    name = spec["name"]
    if name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    if name == "adam":
        return torch.optim.Adam(params, **kwargs)
    return torch.optim.SGD(params, **kwargs)


class TrainingRun:
    """One job on one rank: model, optimizer, data and the step loop."""

    def __init__(self, spec: JobSpec, arch: Architecture, text: str, *, dist_env: DistEnv | None = None,
                 checkpoint: Checkpoint | None = None, device: torch.device | None = None) -> None:
        self.spec = spec
        self.dist_env = dist_env
        self.rank = dist_env.rank if dist_env else 0
        self.world_size = dist_env.world_size if dist_env else 1
        if spec.batch_size % self.world_size:
            raise MicrokernelError(ErrorCode.INVALID_FIELD,
                                   f"batch_size {spec.batch_size} is not divisible by the world size {self.world_size}")
        self.device = device or (dist_env.device if dist_env else torch.device("cpu"))
        torch.manual_seed(spec.seed)  # the same initial weights on every rank and after every restart
        model, self.config = build_model(arch, spec.config)
        self.model = model.to(self.device)
        self.optimizer = make_optimizer(self.model.parameters(), spec.optimizer)
        self.data = TokenBatches(torch.tensor(text_encoder(self.model)(text), dtype=torch.long),
                                 int(self.config["context"]), spec.seed)
        self.step = 0
        self.loss: float | None = None
        if checkpoint is not None:
            restore(checkpoint, self.model, self.optimizer)
            self.step, self.loss = checkpoint.step, checkpoint.loss
        # DDP averages gradients over the ranks during backward (and broadcasts rank 0's weights now).
        self.net: torch.nn.Module = DistributedDataParallel(self.model) if self.world_size > 1 else self.model

    def checkpoint(self) -> Checkpoint:
        """The current state as a checkpoint."""
        return capture(self.model, self.optimizer, step=self.step, loss=self.loss,
                       extra_meta={"job": self.spec.job, "seed": self.spec.seed, "arch": self.spec.model,
                                   "config": self.config, "world_size": self.world_size})

    def _train_step(self) -> torch.Tensor:
        x, y = self.data.batch(self.step, self.spec.batch_size, self.rank, self.world_size)
        x, y = x.to(self.device), y.to(self.device)
        logits = self.net(x)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def _agree(self, loss: torch.Tensor, control: Control) -> tuple[float, Control]:
        """The global-batch loss and the strongest control any rank saw (one all-reduce)."""
        if self.world_size == 1:
            return float(loss), control
        flags = torch.stack([loss.float().cpu(), torch.tensor(float(control == Control.STOP)),
                             torch.tensor(float(control == Control.SHUTDOWN))]).to(self.device)
        dist.all_reduce(flags)
        total, stop, shutdown = flags.tolist()
        agreed = Control.SHUTDOWN if shutdown else Control.STOP if stop else Control.CONTINUE
        return total / self.world_size, agreed

    def run(self, hooks: RunHooks) -> Outcome:
        """Train until ``spec.steps`` or a stop; checkpoints every ``checkpoint_every`` steps (rank 0)."""
        self.model.train()
        leader = self.rank == 0
        every = self.spec.checkpoint_every
        window_start, window_step = time.perf_counter(), self.step
        control = Control.CONTINUE
        while self.step < self.spec.steps:
            loss = self._train_step()
            self.step += 1
            self.loss, control = self._agree(loss, hooks.control())
            last = self.step == self.spec.steps or control != Control.CONTINUE
            now = time.perf_counter()
            due = now - window_start >= hooks.progress_interval_s or (
                hooks.progress_every and self.step % hooks.progress_every == 0)
            if leader and (due or last):
                rate = (self.step - window_step) * self.spec.batch_size / max(now - window_start, 1e-9)
                hooks.progress(self.step, self.loss, rate)
                window_start, window_step = now, self.step
            if control != Control.CONTINUE:
                break
            if leader and every and self.step % every == 0 and self.step < self.spec.steps:
                hooks.checkpoint(self.checkpoint())
        if leader and control != Control.CONTINUE:
            hooks.checkpoint(self.checkpoint())
        return Outcome(control=control, step=self.step, loss=self.loss)

    def final_state(self) -> dict[str, torch.Tensor]:
        """The trained model's ``state_dict``."""
        return self.model.state_dict()
