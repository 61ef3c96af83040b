"""One job executed on this replica: a daemon thread that prepares, trains and finishes it.

The thread talks to the store through ``JobStore.blocking`` and to the bus through ``publish``
(thread-safe). Rank 0 (the only rank without a group) writes checkpoints, progress events, the
job record and the final weights; the other ranks only compute. In a group, any error after
joining means a peer is gone or unreachable: the execution reports ``lost_peer`` and the service
exits its process, so the supervisor restarts it and every rank resumes from the last checkpoint.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from services.models.registry import resolve
from services.trainer import distributed
from services.trainer.checkpoints import Checkpoint
from services.trainer.distributed import DistEnv
from services.trainer.jobs import CHECKPOINT_PREFIX, JobRecord, JobState
from services.trainer.loop import Control, RunHooks, TrainingRun
from services.trainer.storage import JobStore

__all__ = ["JobExecution"]

Publish = Callable[[str, dict[str, Any]], None]


class JobExecution:
    """A job running (or about to run) on this replica's training thread."""

    def __init__(self, record: JobRecord, *, store: JobStore, publish: Publish, log: logging.Logger,
                 dist_env: DistEnv | None, device: torch.device | None, dist_timeout_s: float, progress_interval_s: float, progress_every: int,
                 on_done: Callable[[JobExecution], None]) -> None:
        self.record = record
        self.job = record.spec.job
        self._store = store
        self._publish = publish
        self._log = log
        self._dist = dist_env
        self._device = device
        self._dist_timeout_s = dist_timeout_s
        self._progress_interval_s = progress_interval_s
        self._progress_every = progress_every
        self._on_done = on_done
        self.rank = dist_env.rank if dist_env else 0
        self.world_size = dist_env.world_size if dist_env else 1
        self.control = Control.CONTINUE
        self._step = record.step
        self.loss = record.loss
        self.lost_peer = False
        self.run: TrainingRun | None = None
        self._joined = False
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._main, name=f"train-{self.job}", daemon=True)

    @property
    def step(self) -> int:
        """The current step (read from any thread; every rank knows it)."""
        run = self.run
        return run.step if run is not None else self._step

    @property
    def leader(self) -> bool:
        """Rank 0: writes the checkpoints, the record and the events."""
        return self.rank == 0

    def start(self) -> None:
        """Start the training thread."""
        self._thread.start()

    def request(self, control: Control) -> None:
        """Ask the loop to stop (``STOP``) or to pause for a shutdown (``SHUTDOWN``) at the next step."""
        if control > self.control:
            self.control = control

    # --- the thread -----------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self._execute()
        except Exception as exc:  # the job fails; the replica lives on (or restarts, in a group)
            if self._dist is not None and self._joined:
                self.lost_peer = True
                self._log.error("job %s: the group failed at step %d (%s: %s); restarting this rank",
                                self.job, self.step, type(exc).__name__, exc)
            else:
                self._log.exception("job %s failed at step %d", self.job, self.step)
                self._fail(f"{type(exc).__name__}: {exc}")
        finally:
            if self._joined:
                try:
                    distributed.leave()
                except Exception:  # a broken group may not shut down cleanly; the process exits anyway
                    self._log.warning("job %s: leaving the process group failed", self.job, exc_info=True)
            self.done.set()
            try:
                self._on_done(self)
            except RuntimeError:  # the service's loop is already closed: nobody is waiting any more
                pass

    def _execute(self) -> None:
        spec = self.record.spec
        arch = resolve(spec.model)
        text = self._store.blocking(self._store.dataset_text(spec.dataset))
        if self._dist is not None:
            self._log.info("job %s: joining the group as rank %d of %d", self.job, self.rank, self.world_size)
            distributed.join(self._dist, self._dist_timeout_s)
            self._joined = True
        # After joining, so no rank can have written a newer checkpoint than the one every rank reads.
        checkpoint = self._store.blocking(self._store.latest_checkpoint(self.job))
        if checkpoint is not None:
            self._log.info("job %s: resuming from the checkpoint at step %d", self.job, checkpoint.step)
        run = TrainingRun(spec, arch, text, dist_env=self._dist, checkpoint=checkpoint, device=self._device)
        self.run = run
        self.loss = run.loss
        if checkpoint is not None and self.leader:
            self._publish("train.resumed", {"job": self.job, "step": run.step, "loss": run.loss,
                                            "world_size": self.world_size})
        hooks = RunHooks(control=lambda: self.control, progress=self._progress, checkpoint=self._checkpoint,
                         progress_interval_s=self._progress_interval_s, progress_every=self._progress_every)
        outcome = run.run(hooks)
        self.loss = outcome.loss
        if outcome.control == Control.SHUTDOWN:
            if self.control != Control.SHUTDOWN:
                # A peer is shutting down: this rank must restart with it to rejoin the group.
                self.lost_peer = True
            return  # the record stays "running": a restarted trainer resumes the job
        if not self.leader:
            return
        if outcome.control == Control.STOP:
            self._save(self.record.evolve(state=JobState.STOPPED, step=outcome.step, loss=outcome.loss))
            self._publish("train.stopped", {"job": self.job, "step": outcome.step, "loss": outcome.loss})
            return
        self._finish(run)

    def _save(self, record: JobRecord) -> None:
        self.record = record
        self._store.blocking(self._store.save(record))

    def _progress(self, step: int, loss: float, samples_per_s: float) -> None:
        self.loss = loss
        self._publish("train.progress", {"job": self.job, "step": step, "steps": self.record.spec.steps, "loss": loss,
                                         "samples_per_s": samples_per_s, "rank": self.rank,
                                         "world_size": self.world_size})

    def _checkpoint(self, checkpoint: Checkpoint) -> None:
        version = self._store.blocking(self._store.put_checkpoint(self.job, checkpoint))
        self._save(self.record.evolve(step=checkpoint.step, loss=checkpoint.loss, checkpoint=version))
        self._publish("train.checkpointed", {"job": self.job, "step": checkpoint.step, "key": CHECKPOINT_PREFIX + self.job,
                                             "version": version})

    def _finish(self, run: TrainingRun) -> None:
        spec = self.record.spec
        meta = {"arch": spec.model, "config": run.config, "job": self.job, "step": run.step, "loss": run.loss,
                "dataset": spec.dataset, "created_ns": time.time_ns()}
        state = {k: v.detach().cpu() for k, v in run.final_state().items()}
        key, version = self._store.blocking(self._store.put_weights(spec.name, state, meta))
        self._save(self.record.evolve(state=JobState.FINISHED, step=run.step, loss=run.loss, weights=key))
        self._publish("train.finished", {"job": self.job, "step": run.step, "loss": run.loss, "weights": key,
                                         "version": version})
        self._log.info("job %s finished at step %d (loss %.4f): %s version %d", self.job, run.step, run.loss or 0.0,
                       key, version)

    def _fail(self, error: str) -> None:
        if not self.leader:
            return
        try:
            self._save(self.record.evolve(state=JobState.FAILED, step=self.step, loss=self.loss, error=error))
        except Exception:
            self._log.warning("job %s: could not record its failure", self.job, exc_info=True)
        self._publish("train.failed", {"job": self.job, "step": self.step, "error": error})


def torch_threads(count: int) -> None:
    """Use ``count`` intra-op threads (1 keeps a busy 2-core machine responsive and fast)."""
    torch.set_num_threads(max(1, count))
