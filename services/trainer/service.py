"""The trainer service: training jobs over RPC, progress on the bus, state in the store.

RPC: ``train_start``, ``train_stop``, ``train_status``. Events: ``train.progress``,
``train.checkpointed``, ``train.finished``, ``train.stopped``, ``train.failed``, and the
internal ``train.job`` / ``train.stop`` that tell every rank of a distributed trainer about a
job started or stopped through one of them (a request reaches ONE replica).

Config (``[services.trainer.config]``): ``threads`` (torch intra-op threads, default 1),
``progress_interval_s`` (0.5), ``progress_every`` (0: by time only), ``keep_checkpoints`` (3),
``dist_timeout_s`` (60, the process group's join/collective timeout), ``store`` ("store").
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import torch

from protocols.errors import ErrorCode, MicrokernelError
from services.base import Service, rpc, subscribe
from services.models.registry import build_model, resolve
from services.trainer.distributed import DistEnv
from services.trainer.execution import JobExecution, torch_threads
from services.trainer.jobs import JobRecord, JobSpec, JobState, new_job_id, validate_start
from services.trainer.loop import Control, text_encoder
from services.trainer.storage import JobStore

__all__ = ["Trainer"]

_STORE_WAIT_S = 60.0      # how long setup waits for the store to answer (a ceiling)
_STOP_WAIT_S = 30.0       # how long train_stop waits for the loop to reach a step boundary
_TEARDOWN_WAIT_S = 4.0    # a step + a checkpoint put take well under a second
_LOST_PEER_EXIT = 75      # exit status after a group failure (any non-zero restarts the replica)


def _number(config: dict[str, Any], key: str, default: float, minimum: float = 0.0) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise MicrokernelError(ErrorCode.INVALID_FIELD, f"trainer config {key!r} must be a number >= {minimum}, got {value!r}")
    return float(value)


class Trainer(Service):
    """Train models from the registry on text datasets; checkpoint to the store; resume after crashes."""

    # In-flight calls (a train_stop waiting for its step boundary) get this long on a graceful stop;
    # teardown's checkpoint wait comes after it, and both stay inside the kernel's 10 s stop grace.
    drain_timeout = 4.0

    async def setup(self) -> None:
        cfg = self.config
        self.progress_interval_s = _number(cfg, "progress_interval_s", 0.5)
        self.progress_every = int(_number(cfg, "progress_every", 0))
        self.dist_timeout_s = _number(cfg, "dist_timeout_s", 60.0, 1.0)
        store_name = str(cfg.get("store", "store"))
        torch_threads(int(_number(cfg, "threads", 1, 1)))
        lease = self.lease
        cuda = bool(lease and lease.devices) and torch.cuda.is_available()
        self.dist_env = DistEnv.from_environ(cuda=cuda)
        # A replica with a GPU lease trains on its first device (CUDA_VISIBLE_DEVICES is the lease).
        self.device = self.dist_env.device if self.dist_env else torch.device("cuda", 0) if cuda else torch.device("cpu")
        self.store = JobStore(lambda method, timeout, **args: self.call(store_name, method, timeout=timeout, **args),
                              asyncio.get_running_loop(), keep_checkpoints=int(_number(cfg, "keep_checkpoints", 3)),
                              log=self.log)
        self.active: JobExecution | None = None
        records = await self._wait_for_store()
        for record in records:
            if record.state == JobState.STOPPING and (self.dist_env is None or self.dist_env.rank == 0):
                await self.store.save(record.evolve(state=JobState.STOPPED))
            elif record.state == JobState.RUNNING and (self.dist_env is not None or record.owner == self.replica):
                self.log.info("resuming job %s (last recorded step %d)", record.spec.job, record.step)
                self._launch(record)
                break  # one job at a time per trainer

    async def _wait_for_store(self) -> list[JobRecord]:
        deadline = asyncio.get_running_loop().time() + _STORE_WAIT_S
        while True:
            try:
                return await self.store.records()
            except MicrokernelError as exc:
                if exc.code not in (ErrorCode.NOT_READY, ErrorCode.UNAVAILABLE, ErrorCode.TIMEOUT, ErrorCode.SHUTTING_DOWN) \
                        or asyncio.get_running_loop().time() > deadline:
                    raise
                await self.progress(f"waiting for the store ({exc.reason})", extend_s=5.0)
                await asyncio.sleep(0.5)  # a retry period, not a wait for a condition we could observe

    def _launch(self, record: JobRecord) -> JobExecution:
        loop = asyncio.get_running_loop()

        def done(execution: JobExecution) -> None:
            loop.call_soon_threadsafe(self._ended, execution)

        execution = JobExecution(record, store=self.store, publish=self.publish, log=self.log, dist_env=self.dist_env,
                                 device=self.device, dist_timeout_s=self.dist_timeout_s,
                                 progress_interval_s=self.progress_interval_s, progress_every=self.progress_every,
                                 on_done=done)
        self.active = execution
        execution.start()
        return execution

    def _ended(self, execution: JobExecution) -> None:
        if self.active is execution:
            self.active = None
        if execution.lost_peer:
            self.request_stop(_LOST_PEER_EXIT)

    # --- RPC ------------------------------------------------------------------------------------

    @rpc
    async def train_start(self, job: str | None = None, model: str = "charformer", config: dict[str, Any] | None = None,
                          dataset: str = "corpus", optimizer: dict[str, Any] | None = None, steps: int | None = None,
                          epochs: float | None = None, batch_size: int = 32, checkpoint_every: int = 50, seed: int = 0,
                          name: str | None = None) -> dict[str, Any]:
        """Start a job; returns ``{"job", "state", "step"}`` once it is recorded (training runs on)."""
        if not isinstance(model, str) or not model:
            raise MicrokernelError(ErrorCode.INVALID_FIELD, f"model must be a non-empty string, got {model!r}")
        job = new_job_id() if job is None else job
        # A model given by import path is named after the job; a registered name names its weights.
        default_name = model if ":" not in model else job
        spec = validate_start(job=job, model=model, config=config, dataset=dataset,
                              optimizer=optimizer if optimizer is not None else {"name": "adamw", "lr": 3e-3},
                              steps=steps, epochs=epochs, batch_size=batch_size, checkpoint_every=checkpoint_every,
                              seed=seed, name=name, default_name=default_name)
        if self.dist_env is not None and spec.batch_size % self.dist_env.world_size:
            raise MicrokernelError(ErrorCode.INVALID_FIELD, f"batch_size {spec.batch_size} is not divisible by the "
                                   f"trainer's world size {self.dist_env.world_size}")
        context = await asyncio.to_thread(self._check_model, spec)
        size = await self.store.dataset_size(spec.dataset)
        if size < context + 2:
            raise MicrokernelError(ErrorCode.INVALID_FIELD, f"dataset {spec.dataset!r} has {size} characters; "
                                   f"the model's context needs at least {context + 2}")
        if spec.epochs is not None:
            windows = max(1, (size - 1) // context)
            spec = replace(spec, steps=max(1, -(-int(spec.epochs * windows) // spec.batch_size)))
        await self._check_free(spec.job)
        record = JobRecord(spec=spec, state=JobState.RUNNING, owner=self.replica)
        await self.store.save(record)
        self._launch(record)
        if self.dist_env is not None:
            self.publish("train.job", {"job": spec.job})
        return {"job": spec.job, "state": record.state.value, "step": 0, "steps": spec.steps}

    def _check_model(self, spec: JobSpec) -> int:
        """Build the model once (validates the architecture and its config); its context length."""
        arch = resolve(spec.model)
        model, merged = build_model(arch, spec.config)
        text_encoder(model)
        context = merged.get("context")
        if not isinstance(context, int) or context < 1:
            raise MicrokernelError(ErrorCode.INVALID_FIELD, f"model {spec.model!r} has no positive integer 'context' config")
        return context

    async def _check_free(self, job: str) -> None:
        existing = await self.store.load(job)
        if existing is not None:
            raise MicrokernelError(ErrorCode.BAD_STATE, f"job {job!r} already exists (state {existing.state.value}); "
                                   "choose another job id")
        if self.active is not None:
            raise MicrokernelError(ErrorCode.BAD_STATE, f"job {self.active.job!r} is running on this trainer; "
                                   "stop it first (train_stop) or wait for train.finished")
        if self.dist_env is not None:
            busy = [r.spec.job for r in await self.store.records() if r.state.active]
            if busy:
                raise MicrokernelError(ErrorCode.BAD_STATE, f"job {busy[0]!r} is running on this trainer; stop it first")

    @rpc
    async def train_stop(self, job: str) -> dict[str, Any]:
        """Stop ``job`` at its next step (a checkpoint is written); ``{"job", "state", "step"}``."""
        record = await self._record(job)
        active = self.active
        if active is not None and active.job == job:
            active.request(Control.STOP)
            await asyncio.to_thread(active.done.wait, _STOP_WAIT_S)
            record = await self._record(job)
        elif record.state == JobState.RUNNING:
            # Runs on another replica (or on none right now): that replica stops it.
            record = record.evolve(state=JobState.STOPPING)
            await self.store.save(record)
            self.publish("train.stop", {"job": job})
        return self._view(record)

    @rpc
    async def train_status(self, job: str | None = None) -> Any:
        """One job's status (``job`` given) or a list of every job's, newest last."""
        if job is not None:
            return self._view(await self._record(job))
        return [self._view(r) for r in await self.store.records()]

    async def _record(self, job: Any) -> JobRecord:
        if not isinstance(job, str) or not job:
            raise MicrokernelError(ErrorCode.INVALID_FIELD, f"job must be a job id string, got {job!r}")
        record = await self.store.load(job)
        if record is None:
            raise MicrokernelError(ErrorCode.NOT_FOUND, f"no training job {job!r}")
        return record

    def _view(self, record: JobRecord) -> dict[str, Any]:
        view = record.status()
        active = self.active
        if active is not None and active.job == record.spec.job and record.state == JobState.RUNNING:
            # The record is written at checkpoints; the running loop knows the current step.
            view.update(step=max(active.step, record.step), loss=active.loss if active.loss is not None else record.loss)
            view["rank"], view["world_size"] = active.rank, active.world_size
        return view

    # --- events between the ranks ---------------------------------------------------------------

    @subscribe("train.job")
    async def on_job(self, topic: str, data: dict[str, Any]) -> None:
        """Another rank accepted a job: every rank of a distributed trainer runs it."""
        job = data.get("job")
        if self.dist_env is None or not isinstance(job, str) or (self.active is not None and self.active.job == job):
            return
        record = await self.store.load(job)
        if record is None or record.state != JobState.RUNNING:
            return
        if self.active is not None:
            self.log.error("job %s announced while job %s runs here; ignoring it", job, self.active.job)
            return
        self._launch(record)

    @subscribe("train.stop")
    def on_stop(self, topic: str, data: dict[str, Any]) -> None:
        """``train_stop`` reached another replica: stop the job if it runs here."""
        active = self.active
        if active is not None and active.job == data.get("job"):
            active.request(Control.STOP)

    async def teardown(self) -> None:
        active = self.active
        if active is not None:
            # Pause at a step boundary with a checkpoint; the job stays "running" and resumes on restart.
            active.request(Control.SHUTDOWN)
            await asyncio.to_thread(active.done.wait, _TEARDOWN_WAIT_S)

