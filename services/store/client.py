"""Chunked transfers with the store from inside a service: ``put_large`` and ``get_large``.

Use these for payloads that may exceed one message (``MK_MAX_MESSAGE_SIZE``); they drive the
shared transfer steps of ``protocols.store`` (the same ones ``mkctl store`` uses)::

    result = await put_large(self, "datasets/big", "/data/big.bin", meta={"source": "crawl"})
    got = await get_large(self, "checkpoints/job-1/step-200")          # {..., "tensors": {...}}
    await get_large(self, "datasets/big", path="/tmp/big.bin")         # straight to a file
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import numpy as np

from protocols.store import BufferSource, FileSource, Source, download, run_async, upload
from services.base import Service
from services.store import safetensors

DEFAULT_TIMEOUT = 60.0


async def put_large(service: Service, key: str, source: str | os.PathLike[str] | bytes | bytearray | memoryview, *,
                    meta: dict[str, Any] | None = None, kind: str = "bytes", store: str = "store",
                    chunk_size: int | None = None, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """Upload a file (a path) or a buffer to ``key`` in chunks; returns ``{key, version, digest, size, kind}``.

    ``kind="tensors"`` for a safetensors file. ``timeout`` applies to each call.
    """
    async def call(method: str, args: dict[str, Any]) -> Any:
        return await service.call(store, method, timeout=timeout, **args)

    if isinstance(source, (bytes, bytearray, memoryview)):
        return await run_async(upload(key, BufferSource(source), meta=meta, kind=kind, chunk_size=chunk_size), call)
    file_source: Source = await asyncio.to_thread(FileSource, source)
    try:
        return await run_async(upload(key, file_source, meta=meta, kind=kind, chunk_size=chunk_size), call)
    finally:
        file_source.close()  # type: ignore[attr-defined]


class _MemorySink:
    """Collects a download into one preallocated buffer."""

    def __init__(self) -> None:
        self.buffer: np.ndarray | None = None
        self.filled = 0

    def write(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        assert self.buffer is not None
        self.buffer[self.filled:self.filled + len(view)] = np.frombuffer(view, dtype=np.uint8)
        self.filled += len(view)


class _FileSink:
    """Writes a download to ``<path>.part``, renamed to ``path`` only when complete and verified."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.part = path.with_name(path.name + ".part")
        self.file = open(self.part, "wb")

    def write(self, data: Any) -> None:
        self.file.write(data)


async def get_large(service: Service, key: str, *, version: int | None = None, path: str | os.PathLike[str] | None = None,
                    store: str = "store", chunk_size: int | None = None, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """Download a version of ``key`` in chunks, verifying its sha256.

    Returns the ``stat`` fields plus ``data`` (a bytes-like numpy buffer) or, for tensors,
    ``tensors`` (arrays viewing that buffer); with ``path`` the bytes go to that file instead
    (written to ``<path>.part`` and renamed once verified) and ``path`` is returned.
    """
    async def call(method: str, args: dict[str, Any]) -> Any:
        return await service.call(store, method, timeout=timeout, **args)

    if path is not None:
        sink = await asyncio.to_thread(_FileSink, Path(path))
        try:
            info = await run_async(download(key, sink, version=version, chunk_size=chunk_size), call)
            await asyncio.to_thread(_close_and_publish, sink)
        except BaseException:
            await asyncio.to_thread(_discard, sink)
            raise
        return {**info, "path": str(sink.path)}
    memory = _MemorySink()
    info = await call("stat", {"key": key, "version": version})
    memory.buffer = np.empty(info["size"], dtype=np.uint8)
    info = await run_async(download(key, memory, version=info["version"], chunk_size=chunk_size), call)
    if info["kind"] == "tensors":
        tensors, _ = safetensors.decode(memory.buffer)
        return {**info, "tensors": tensors}
    return {**info, "data": memory.buffer}


def _close_and_publish(sink: _FileSink) -> None:
    sink.file.flush()
    os.fsync(sink.file.fileno())
    sink.file.close()
    os.replace(sink.part, sink.path)


def _discard(sink: _FileSink) -> None:
    sink.file.close()
    sink.part.unlink(missing_ok=True)
