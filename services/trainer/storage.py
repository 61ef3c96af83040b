"""What the trainer keeps in the store: job records, checkpoints, final weights, datasets.

Keys: ``jobs/<job>`` (JSON record, a new version on each change), ``checkpoints/<job>`` (tensors
+ meta, a new version per checkpoint, the oldest pruned beyond ``keep``), ``models/<name>``
(final ``state_dict`` + meta {"arch", "config", "job", "step", "loss"}, what the loader loads).
Every method is a coroutine on the service's loop; the training thread reaches them through
:meth:`JobStore.blocking`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from protocols.errors import ErrorCode, MicrokernelError
from services.models import corpus
from services.retry import retry_transient
from services.models.weights import to_numpy
from services.trainer.checkpoints import Checkpoint
from services.trainer.jobs import CHECKPOINT_PREFIX, JOB_PREFIX, MODEL_PREFIX, JobRecord, job_key

__all__ = ["JobStore"]

T = TypeVar("T")
Caller = Callable[..., Awaitable[Any]]
_STORE_TIMEOUT_S = 60.0


def _missing(exc: MicrokernelError) -> bool:
    return exc.code == ErrorCode.NOT_FOUND


class JobStore:
    """The trainer's view of the store service (``call(method, **args)`` reaches it)."""

    def __init__(self, call: Caller, loop: asyncio.AbstractEventLoop, *, keep_checkpoints: int = 3,
                 log: logging.Logger | None = None) -> None:
        self._store_call = call
        self._log = log or logging.getLogger(__name__)
        self._loop = loop
        self.keep_checkpoints = keep_checkpoints

    async def _call(self, method: str, *, timeout: float = _STORE_TIMEOUT_S, **args: Any) -> Any:
        """``store.<method>(**args)``: a job rides through a restart of the store (see
        :mod:`services.retry`), within ``timeout`` in all; other errors are raised at once."""
        return await retry_transient(lambda left: self._store_call(method, timeout=left, **args),
                                     timeout=timeout, what=f"store {method}", log=self._log)

    def blocking(self, coro: Awaitable[T], timeout: float = _STORE_TIMEOUT_S + 5) -> T:
        """Run one of these coroutines from the training thread and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)  # type: ignore[arg-type]

    # --- job records ------------------------------------------------------------------------

    async def save(self, record: JobRecord) -> None:
        """Persist ``record`` (a new version of ``jobs/<job>``)."""
        await self._call("put", key=job_key(record.spec.job), data=record.to_json(), meta={"state": record.state.value},
                         timeout=_STORE_TIMEOUT_S)

    async def load(self, job: str) -> JobRecord | None:
        """The latest record of ``job``; ``None`` if there is none."""
        try:
            reply = await self._call("get", key=job_key(job), timeout=_STORE_TIMEOUT_S)
        except MicrokernelError as exc:
            if _missing(exc):
                return None
            raise
        return JobRecord.from_json(reply["data"])

    async def records(self) -> list[JobRecord]:
        """Every readable job record, oldest first (an unreadable one is logged and skipped)."""
        rows = await self._call("list", prefix=JOB_PREFIX, timeout=_STORE_TIMEOUT_S)
        found = []
        for row in rows:
            try:
                record = await self.load(row["key"][len(JOB_PREFIX):])
            except MicrokernelError as exc:
                if exc.code != ErrorCode.CORRUPTED:
                    raise
                self._log.error("skipping job record %s: %s", row["key"], exc.reason)
                continue
            if record is not None:
                found.append(record)
        return sorted(found, key=lambda r: r.created_ns)

    # --- checkpoints --------------------------------------------------------------------------

    async def put_checkpoint(self, job: str, checkpoint: Checkpoint) -> int:
        """Store ``checkpoint`` as the next version of ``checkpoints/<job>``; prune old ones."""
        key = CHECKPOINT_PREFIX + job
        reply = await self._call("put", key=key, tensors=checkpoint.tensors, meta=checkpoint.meta, timeout=_STORE_TIMEOUT_S)
        version = int(reply["version"])
        old = version - self.keep_checkpoints
        if self.keep_checkpoints > 0 and old >= 1:
            try:
                await self._call("delete", key=key, version=old, timeout=_STORE_TIMEOUT_S)
            except MicrokernelError as exc:
                if not _missing(exc):
                    raise
        return version

    async def latest_checkpoint(self, job: str) -> Checkpoint | None:
        """The newest checkpoint of ``job``; ``None`` before the first one."""
        try:
            reply = await self._call("get", key=CHECKPOINT_PREFIX + job, timeout=_STORE_TIMEOUT_S)
        except MicrokernelError as exc:
            if _missing(exc):
                return None
            raise
        return Checkpoint(dict(reply["tensors"]), dict(reply["meta"]))

    # --- weights and data ---------------------------------------------------------------------

    async def put_weights(self, name: str, state: dict[str, Any], meta: dict[str, Any]) -> tuple[str, int]:
        """Store a final ``state_dict`` as the next version of ``models/<name>``."""
        key = MODEL_PREFIX + name
        reply = await self._call("put", key=key, tensors=to_numpy(state), meta=meta, timeout=_STORE_TIMEOUT_S)
        return key, int(reply["version"])

    async def dataset_size(self, dataset: str) -> int:
        """Characters (bytes) in ``dataset``: a shipped corpus or a store key (``not_found`` otherwise)."""
        if dataset in corpus.SHIPPED:
            return len(corpus.read(dataset))
        try:
            reply = await self._call("stat", key=dataset, timeout=_STORE_TIMEOUT_S)
        except MicrokernelError as exc:
            if _missing(exc) or exc.code == ErrorCode.INVALID_FIELD:
                raise MicrokernelError(ErrorCode.NOT_FOUND,
                                       f"dataset {dataset!r} is neither a shipped corpus ({', '.join(corpus.names())}) "
                                       f"nor a key in the store ({exc.reason})") from None
            raise
        if reply.get("kind") == "tensors":
            raise MicrokernelError(ErrorCode.INVALID_FIELD, f"dataset {dataset!r} holds {reply.get('kind')}, not a text blob")
        return int(reply["size"])

    async def dataset_text(self, dataset: str) -> str:
        """The text of ``dataset`` (UTF-8; undecodable bytes replaced)."""
        if dataset in corpus.SHIPPED:
            return corpus.read(dataset)
        reply = await self._call("get", key=dataset, timeout=_STORE_TIMEOUT_S)
        return bytes(reply["data"]).decode("utf-8", errors="replace")
