"""The model loader: loads weights into shared memory once, so every inferencer replica maps one copy.

Each loaded (name, version) is one shared-memory segment holding every tensor of its state_dict at
aligned offsets. The loader checks the weights by building the model over views of that segment
(no copy) and places it on its device; ``get`` hands out the segment's name and layout. ``unload``
unlinks the segment and drops every reference; inferencers that mapped it drop theirs on the
``model.unloaded`` event, and the memory goes back to the system.

Loads run as tasks of the loader (their blocking parts in threads): a slow load never delays
``list``, ``get`` or a load of another model, and a caller that stops waiting does not cancel it.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import re
import time
from typing import Any

import numpy as np

from protocols.errors import ErrorCode, MicrokernelError, RemoteError
from protocols.shm import Segment
from services.base import Service, rpc
from services.loader.catalog import Catalog, Entry, State, check_name, check_version
from services.loader.layout import Layout, assemble, fill, plan, views
from services.loader.placement import device_for, place, release_device_memory
from services.loader.sources import FileWeights, is_file, meta_config, read_file
from services.models.registry import Architecture, merge_config, resolve
from services.store.client import get_large

__all__ = ["Loader"]

# Fetching tens of MiB from the store is quick; this is only the ceiling for a very large model.
STORE_TIMEOUT_S = 600.0


def _trim_heap() -> None:
    # Large frames and temporary arrays are freed to glibc's heap; give the pages back to the system.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Loader(Service):
    """``load``/``unload``/``list``/``get``/``set_default`` of model versions in shared memory.

    Config: none required. Events: ``model.loaded`` ``{name, version, arch, bytes, device}``,
    ``model.unloaded`` ``{name, version}`` and ``model.defaulted`` ``{name, version}`` (``set_default``,
    or the default moved because its version was unloaded).
    """

    drain_timeout = 2.0

    async def setup(self) -> None:
        self.catalog = Catalog()
        self.device = device_for(self.lease)
        self._tasks: set[asyncio.Task[None]] = set()
        self.log.info("loader ready (device %s)", self.device)

    # --- RPCs ----------------------------------------------------------------------------------

    @rpc
    async def load(self, name: str, version: int | None = None, arch: str | None = None, weights: str | None = None,
                   config: dict[str, Any] | None = None, wait: bool = True) -> dict[str, Any]:
        """Load ``name`` (version ``version``) from ``weights``: a store key (default ``models/<name>``,
        its stored version) or a safetensors file. ``arch`` defaults to the one recorded with the
        weights; ``config`` overrides the recorded model config. With ``wait=False`` the reply comes
        at once (state ``loading``); ``list`` and ``model.loaded`` tell when it is ready."""
        name, version = check_name(name), check_version(version)
        requested = version
        if arch is not None and (not isinstance(arch, str) or not arch):
            raise MicrokernelError(ErrorCode.INVALID_FIELD, f"arch must be a non-empty string, got {arch!r}")
        if config is not None and not isinstance(config, dict):
            raise MicrokernelError(ErrorCode.INVALID_FIELD, f"config must be a mapping, got {type(config).__name__}")
        if weights is not None and (not isinstance(weights, str) or not weights):
            raise MicrokernelError(ErrorCode.INVALID_FIELD, f"weights must be a store key or a file path, got {weights!r}")

        if weights is not None and is_file(weights):
            version = version or self.catalog.next_version(name)
            source, fetch = f"file:{weights}", {"path": weights}
            recorded_arch = arch
        else:
            key = weights or f"models/{name}"
            # Weights at the model's own key carry their store version; any other key gets the next one.
            stat = await self.call("store", "stat", key=key, version=version if weights is None else None)
            stored = int(stat["version"])
            if weights is None:
                version = stored
            version = version or self.catalog.next_version(name)
            source, fetch = f"store:{key}@{stored}", {"key": key, "version": stored}
            recorded_arch = arch or (stat.get("meta") or {}).get("arch")

        if requested is None:
            # The same source already loading (two replicas of one inferencer starting together):
            # one version, not one per caller. Once it is loaded, loading the source again is a reload.
            loading = next((e for e in self.catalog
                            if e.name == name and e.source == source and e.state == State.LOADING), None)
            if loading is not None:
                return await self._outcome(loading, wait)
        existing = self._existing(name, version)
        if existing is not None:
            if existing.source != source:
                raise MicrokernelError(ErrorCode.BAD_STATE, f"model {name!r} version {version} is already "
                                       f"{existing.state} from {existing.source}; unload it first")
            return await self._outcome(existing, wait)
        entry = self.catalog.add(Entry(name=name, version=version, arch=recorded_arch or "?", source=source,
                                       device=self.device))
        task = asyncio.get_running_loop().create_task(self._load(entry, fetch, arch, config or {}),
                                                      name=f"load {name} v{version}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await self._outcome(entry, wait)

    @rpc
    def unload(self, name: str, version: int | None = None) -> dict[str, Any]:
        """Unload one version of ``name`` (every version when None) and free its memory."""
        name, version = check_name(name), check_version(version)
        if version is None:
            entries = [e for e in self.catalog if e.name == name]
            if not entries:
                self.catalog.find(name)  # raises NOT_FOUND naming what is loaded
        else:
            entries = [self.catalog.find(name, version)]
        loading = [e.version for e in entries if e.state == State.LOADING]
        if loading:
            raise MicrokernelError(ErrorCode.BAD_STATE, f"model {name!r} version(s) {loading} still loading; unload once ready")
        freed, previous = 0, self.catalog.default(name)
        for entry in entries:
            was_ready = entry.state == State.READY
            self.catalog.remove(entry)
            freed += self._release(entry)
            if was_ready:
                self.publish("model.unloaded", {"name": entry.name, "version": entry.version})
        default = self.catalog.default(name)
        if default is not None and default != previous:
            # The default moved to another version: inferencers following it switch over.
            self.publish("model.defaulted", {"name": name, "version": default})
        _trim_heap()
        self.log.info("unloaded %s versions %s (%d bytes)", name, [e.version for e in entries], freed)
        return {"unloaded": [{"name": e.name, "version": e.version} for e in entries], "freed_bytes": freed}

    @rpc(name="list")
    def list_models(self) -> list[dict[str, Any]]:
        """Every model version: ``{name, version, default, arch, bytes, params, device, state, source[, error]}``."""
        return self.catalog.rows()

    @rpc
    def set_default(self, name: str, version: int) -> dict[str, Any]:
        """Make ``version`` the version of ``name`` that ``get(name)`` returns."""
        name = check_name(name)
        if check_version(version) is None:
            raise MicrokernelError(ErrorCode.INVALID_FIELD, "set_default needs a version")
        self.catalog.set_default(name, version)
        self.publish("model.defaulted", {"name": name, "version": version})
        return {"name": name, "version": version}

    @rpc
    async def get(self, name: str, version: int | None = None) -> dict[str, Any]:
        """The shared-memory handle of a ready version (waits while it loads):
        ``{name, version, arch, config, device, bytes, segment, size, tensors: {param: {dtype, shape, offset}}}``."""
        entry = self.catalog.find(check_name(name), check_version(version))
        await entry.done.wait()
        if entry.state != State.READY:
            raise MicrokernelError(ErrorCode.BAD_STATE, f"model {name!r} version {entry.version} failed to load: {entry.error}")
        layout: Layout = entry.layout
        return {"name": entry.name, "version": entry.version, "arch": entry.arch, "config": entry.config,
                "device": entry.device, "bytes": entry.bytes, "params": entry.params, "segment": entry.segment.name,
                "size": layout.size, "tensors": layout.to_wire()}

    async def teardown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for entry in list(self.catalog):
            self.catalog.remove(entry)
            self._release(entry)

    # --- loading -------------------------------------------------------------------------------

    def _existing(self, name: str, version: int) -> Entry | None:
        try:
            entry = self.catalog.find(name, version)
        except MicrokernelError:
            return None
        return None if entry.state == State.FAILED else entry

    async def _outcome(self, entry: Entry, wait: bool) -> dict[str, Any]:
        if wait:
            await entry.done.wait()
            if entry.state == State.FAILED:
                raise MicrokernelError(entry.code,
                                       f"loading model {entry.name!r} version {entry.version} failed: {entry.error}")
        return {"name": entry.name, "version": entry.version, "arch": entry.arch, "device": entry.device,
                "bytes": entry.bytes, "params": entry.params, "state": entry.state}

    async def _load(self, entry: Entry, fetch: dict[str, Any], arch: str | None, config: dict[str, Any]) -> None:
        started = time.perf_counter()
        try:
            await self._build(entry, fetch, arch, config)
        except asyncio.CancelledError:
            entry.state, entry.error = State.FAILED, "the loader stopped during the load"
            raise
        except Exception as exc:
            entry.state = State.FAILED
            entry.code = exc.code if isinstance(exc, MicrokernelError) else ErrorCode.HANDLER_ERROR
            entry.error = exc.reason if isinstance(exc, MicrokernelError) else f"{type(exc).__name__}: {exc}"
            self.log.warning("loading %s v%d from %s failed: %s", entry.name, entry.version, entry.source, entry.error)
        else:
            entry.state = State.READY
            self.log.info("loaded %s v%d (%s, %d bytes) on %s in %.2fs", entry.name, entry.version, entry.arch,
                          entry.bytes, entry.device, time.perf_counter() - started)
            self.publish("model.loaded", {"name": entry.name, "version": entry.version, "arch": entry.arch,
                                          "bytes": entry.bytes, "device": entry.device})
        finally:
            _trim_heap()
            entry.done.set()  # waiters see the final state

    async def _build(self, entry: Entry, fetch: dict[str, Any], arch: str | None, config: dict[str, Any]) -> None:
        """Fetch the weights, copy them into a segment and build the model over it (fills ``entry``)."""
        file: FileWeights | None = None
        try:
            if "path" in fetch:
                file = await asyncio.to_thread(read_file, fetch["path"])
                arrays, meta = file.arrays, dict(file.metadata)
            else:
                reply = await self._fetch(fetch["key"], fetch["version"])
                if "tensors" not in reply:
                    raise MicrokernelError(ErrorCode.INVALID_FIELD, f"store key {fetch['key']!r} holds a blob, not tensors")
                arrays, meta = dict(reply["tensors"]), dict(reply.get("meta") or {})
                del reply
            arch_name = arch or meta.get("arch")
            if not arch_name:
                raise MicrokernelError(ErrorCode.INVALID_FIELD, f"no architecture recorded with {entry.source}: pass arch=")
            entry.arch = str(arch_name)
            architecture = await asyncio.to_thread(resolve, entry.arch)
            merged = merge_config(architecture, {**meta_config(meta, entry.source), **config})
            segment, layout, model = await asyncio.to_thread(self._materialize, entry, architecture, merged, arrays)
        finally:
            arrays = {}  # the fetched copy (or the file's views) goes now, not with the frame
            if file is not None:
                file.close()
        entry.segment, entry.layout, entry.model, entry.config = segment, layout, model, merged
        entry.bytes, entry.params = layout.nbytes, sum(int(np.prod(s.shape)) for s in layout.tensors.values())

    async def _fetch(self, key: str, version: int) -> dict[str, Any]:
        try:
            return await self.call("store", "get", key=key, version=version, timeout=STORE_TIMEOUT_S)
        except RemoteError as exc:
            if exc.code != ErrorCode.TOO_LARGE:
                raise
        # More than one message holds: the store's chunked reads.
        return await get_large(self, key, version=version, timeout=STORE_TIMEOUT_S)

    def _materialize(self, entry: Entry, architecture: Architecture, config: dict[str, Any],
                     arrays: dict[str, np.ndarray]) -> tuple[Segment, Layout, Any]:
        """Copy the weights into a new segment and build the model over it (blocking: runs in a thread)."""
        arrays = {name: np.asarray(a) for name, a in arrays.items()}
        layout = plan(arrays)
        # The tag only helps a human reading /dev/shm: the segment name allows [A-Za-z0-9_-].
        tag = re.sub(r"[^A-Za-z0-9_-]", "_", f"{entry.name}-v{entry.version}-")[-24:]
        segment = Segment.create(layout.size, tag=tag)
        try:
            fill(segment.buffer, arrays, layout)
            arrays.clear()
            model = place(assemble(architecture, config, views(segment.buffer, layout)), entry.device)
        except BaseException:
            gc.collect()
            segment.unlink()
            _close(segment)
            raise
        return segment, layout, model

    def _release(self, entry: Entry) -> int:
        """Drop the entry's model and segment; returns the bytes it held."""
        segment, freed = entry.segment, entry.bytes if entry.state == State.READY else 0
        entry.model = entry.layout = entry.segment = None
        entry.state = "unloaded"
        gc.collect()  # the model's tensors are the last views of the mapping
        release_device_memory(entry.device)
        if segment is not None:
            segment.unlink()
            _close(segment)
        return freed


def _close(segment: Segment) -> None:
    try:
        segment.close()
    except BufferError:
        # A view is still referenced (a bug to fix, not a reason to fail the unload): the name is
        # unlinked, so the memory returns when the last view goes.
        pass
