"""The inferencer: ``infer`` with dynamic batching over a model mapped from the loader's shared memory.

On setup a replica asks the loader for its model's handle (asking it to load the model first when
it is not loaded), maps the segment read-only and builds the model over views of it: every replica
of every inferencer serves from the one copy the loader holds. Requests are grouped by the
``Batcher``; one worker thread runs the batches, so the event loop keeps queueing (and heartbeats
keep flowing) while a batch computes. The replica follows ``model.unloaded`` (drops its mapping,
so the memory really goes), ``model.loaded`` (maps its model again) and ``model.defaulted`` (moves
to the new default version, unless its config pins a version). It announces ``model.mapped`` and
``model.released`` ``{name, version, service, replica}`` when it starts and stops using a version.
"""

from __future__ import annotations

import asyncio
import gc
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from protocols.errors import ErrorCode, MicrokernelError, RemoteError
from protocols.shm import Segment
from services.base import Service, rpc, subscribe
from services.inferencer.batcher import BatchPolicy, Batcher
from services.loader.catalog import check_name, check_version
from services.loader.layout import Layout, assemble, shares, views
from services.loader.placement import device_for, place, release_device_memory
from services.models.registry import Architecture, resolve
from services.retry import ATTEMPT_S, retry_transient

__all__ = ["Inferencer"]

# A model the loader has to load first may take a while (a large one from the store).
LOAD_TIMEOUT_S = 600.0


@dataclass(eq=False)
class Mapped:
    """A model built over a mapped segment of the loader."""

    name: str
    version: int
    arch: Architecture
    config: dict[str, Any]
    segment: Segment
    model: torch.nn.Module | None
    bytes: int
    device: str


def map_model(handle: dict[str, Any], device: str) -> Mapped:
    """Map the segment of a loader handle read-only and build its model over it (blocking)."""
    arch = resolve(str(handle["arch"]))
    try:
        segment = Segment.attach(str(handle["segment"]))
    except FileNotFoundError:
        raise MicrokernelError(ErrorCode.NOT_FOUND, f"model {handle['name']!r} version {handle['version']} "
                               "was unloaded before this replica could map it") from None
    try:
        layout = Layout.from_wire(handle["tensors"], segment.size)
        model = place(assemble(arch, dict(handle["config"]), views(segment.buffer, layout)), device)
    except BaseException:
        gc.collect()
        segment.close()
        raise
    return Mapped(name=str(handle["name"]), version=int(handle["version"]), arch=arch, config=dict(handle["config"]),
                  segment=segment, model=model, bytes=int(handle.get("bytes", layout.nbytes)), device=device)


def release(mapped: Mapped) -> None:
    """Drop the model and unmap its segment (the loader's unlink then returns the memory)."""
    mapped.model = None
    gc.collect()  # the model's tensors are the views of the mapping
    release_device_memory(mapped.device)
    try:
        mapped.segment.close()
    except BufferError:
        pass  # a view is still referenced: the mapping goes with it


def run_batch(mapped: Mapped, inputs: list[Any]) -> list[Any]:
    """One batch through the model (blocking: runs in the worker thread)."""
    model = mapped.model
    if model is None:
        raise MicrokernelError(ErrorCode.NOT_FOUND, f"model {mapped.name!r} version {mapped.version} was unloaded")
    with torch.inference_mode():
        return list(mapped.arch.infer_batch(model, inputs, mapped.config))


class Inferencer(Service):
    """Serves ``infer``/``infer_many``/``stats`` for one model with dynamic batching.

    Config: ``model`` (required), ``version`` (default: the loader's default), ``max_batch_size``
    (16), ``max_queue_delay_ms`` (5), ``max_queue`` (256); when the loader does not have the model
    yet: ``weights``, ``arch`` and ``model_config`` are passed to its ``load``.
    """

    drain_timeout = 5.0

    async def setup(self) -> None:
        config = self.config
        if "model" not in config:
            raise MicrokernelError(ErrorCode.INVALID_FIELD, "the inferencer needs `model = \"<name>\"` in its config")
        self.model_name = check_name(config["model"])
        self.pinned = check_version(config.get("version"))
        self.policy = BatchPolicy.from_config(config)
        self.device = device_for(self.lease)
        self.current: Mapped | None = None
        self._switch = asyncio.Lock()  # model changes happen one at a time
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="inference")
        self.batcher: Batcher[Any, Any] = Batcher(self._compute, self.policy)
        handle = await self._handle(self.pinned, load=True)
        self.current = await asyncio.to_thread(map_model, handle, self.device)
        self._announce("model.mapped", self.current)
        self.log.info("serving %s v%d (%d bytes, %s) with %s", self.model_name, self.current.version,
                      self.current.bytes, self.device, self.policy)

    async def teardown(self) -> None:
        await self.batcher.close()
        async with self._switch:
            if self.current is not None:
                old, self.current = self.current, None
                release(old)
        self._executor.shutdown(wait=True)

    # --- RPCs ----------------------------------------------------------------------------------

    @rpc
    async def infer(self, input: Any, deadline_ms: float | None = None) -> Any:  # noqa: A002 - the wire name
        """The model's result for one input, batched with concurrent requests.

        ``deadline_ms``: answer ``deadline_exceeded`` (without computing) if the request has not
        started computing within this many milliseconds. A full queue answers ``overloaded``.
        """
        return await self.batcher.submit(input, deadline=self._deadline(deadline_ms))

    @rpc
    async def infer_many(self, inputs: list[Any], deadline_ms: float | None = None) -> list[Any]:
        """One result per input (each input is queued as its own request)."""
        if not isinstance(inputs, list):
            raise MicrokernelError(ErrorCode.INVALID_FIELD, f"inputs must be a list, got {type(inputs).__name__}")
        deadline = self._deadline(deadline_ms)
        results = await asyncio.gather(*(self.batcher.submit(x, deadline=deadline) for x in inputs),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result  # the first failure answers the call (the others were answered too)
        return list(results)

    @rpc
    def stats(self) -> dict[str, Any]:
        """Counters, batch sizes, queue time and latency p50/p99, queue depth, and the model served."""
        current = self.current
        model: dict[str, Any] | None = None
        if current is not None and current.model is not None:
            model = {"name": current.name, "version": current.version, "bytes": current.bytes,
                     "device": current.device, "segment": current.segment.name,
                     "shared": current.device == "cpu" and shares(current.model, current.segment.buffer)}
        return {**self.batcher.stats(), "replica": self.replica, "model": model}

    # --- following the loader ------------------------------------------------------------------

    @subscribe("model.loaded", "model.unloaded", "model.defaulted")
    async def on_model_event(self, topic: str, data: dict[str, Any]) -> None:
        if data.get("name") != self.model_name:
            return
        version = data.get("version")
        current = self.current
        if topic == "model.unloaded":
            if current is not None and current.version == version:
                self.log.info("model %s v%s unloaded: releasing the mapping", self.model_name, version)
                await self._replace(None)
        elif topic == "model.loaded":
            if current is None and self.pinned in (None, version):
                await self._follow(self.pinned)  # unpinned: whatever is the default now
            elif current is not None and current.version == version:
                await self._follow(version)  # loaded again (a restarted loader): move to the live copy
        elif topic == "model.defaulted" and self.pinned is None:
            await self._follow(version)

    async def _follow(self, version: int | None) -> None:
        try:
            handle = await self._handle(version, load=False)
            current = self.current
            if current is not None and handle["segment"] == current.segment.name:
                return  # already serving this very copy
            mapped = await asyncio.to_thread(map_model, handle, self.device)
        except MicrokernelError as exc:
            self.log.warning("cannot map model %s v%s: %s", self.model_name, version, exc.reason)
            return
        await self._replace(mapped)
        self.log.info("now serving %s v%d", self.model_name, mapped.version)

    async def _replace(self, mapped: Mapped | None) -> None:
        async with self._switch:
            old, self.current = self.current, mapped
            if mapped is not None:
                self._announce("model.mapped", mapped)
            if old is not None:
                await self.batcher.wait_idle()  # the batch computing now may still use the old model
                release(old)
                self._announce("model.released", old)

    def _announce(self, topic: str, mapped: Mapped) -> None:
        self.publish(topic, {"name": mapped.name, "version": mapped.version, "service": self.name,
                             "replica": self.replica})

    async def _handle(self, version: int | None, *, load: bool) -> dict[str, Any]:
        """The loader's handle of the model. ``load`` (at setup): have the loader load it when it
        lacks it, and wait out a loader that is away (restarting) instead of failing the start:
        ``depends_on`` orders the starts only, and the loader may restart while this replica
        starts (a crash, a budget kill, an upgrade). The wait is reported as start-up progress."""
        if not load:
            return await self.call("loader", "get", name=self.model_name, version=version, timeout=LOAD_TIMEOUT_S)

        async def waiting(exc: MicrokernelError, pause: float) -> None:
            await self.progress(f"waiting for the loader ({exc.code.value}: {exc.reason})", extend_s=pause + ATTEMPT_S)

        # One attempt is get, load if missing, get: after a lost reply the next attempt finds a
        # model that did load instead of loading it again (which would make a new version).
        return await retry_transient(lambda left: self._get_or_load(version, left), timeout=LOAD_TIMEOUT_S,
                                     what=f"model {self.model_name!r} from the loader", log=self.log,
                                     on_retry=waiting, attempt_s=LOAD_TIMEOUT_S)

    async def _get_or_load(self, version: int | None, timeout: float) -> dict[str, Any]:
        name = self.model_name
        try:
            return await self.call("loader", "get", name=name, version=version, timeout=min(timeout, ATTEMPT_S))
        except RemoteError as exc:
            if exc.code != ErrorCode.NOT_FOUND:
                raise
        config = self.config
        await self.progress(f"loading model {name!r} through the loader", extend_s=timeout)
        await self.call("loader", "load", name=name, version=version, weights=config.get("weights"),
                        arch=config.get("arch"), config=config.get("model_config"), timeout=timeout)
        return await self.call("loader", "get", name=name, version=version, timeout=min(timeout, ATTEMPT_S))

    # --- batches -------------------------------------------------------------------------------

    def _deadline(self, deadline_ms: float | None) -> float | None:
        if deadline_ms is None:
            return None
        if isinstance(deadline_ms, bool) or not isinstance(deadline_ms, (int, float)) or deadline_ms <= 0:
            raise MicrokernelError(ErrorCode.INVALID_FIELD, f"deadline_ms must be a positive number, got {deadline_ms!r}")
        return self.batcher.clock.now() + deadline_ms / 1000.0

    async def _compute(self, inputs: list[Any]) -> list[Any]:
        current = self.current
        if current is None:
            raise MicrokernelError(ErrorCode.NOT_FOUND, f"model {self.model_name!r} is not loaded (it was unloaded)")
        return await asyncio.get_running_loop().run_in_executor(self._executor, run_batch, current, inputs)
