"""Chunked transfers to and from the store service, written once for every kind of client.

A blob larger than one message (``MK_MAX_MESSAGE_SIZE``, 64 MiB by default) moves in chunks:
``put_begin`` → ``put_chunk`` × n → ``put_commit`` to upload, ``stat`` → ``read`` × n to
download. The steps are plain generators that *yield* the calls to make and receive their
results (no sockets here), so the same logic drives the blocking client (``mkctl store``, via
:func:`run`) and services (``services.store.client``, via :func:`run_async`)::

    result = run(upload("data/big", FileSource(path)), lambda method, args: client.call("store", method, **args))

Both directions check the sha256 end to end: an upload sends the digest it computed and the store
refuses a commit whose content differs; a download compares the bytes it received with the
digest ``stat`` reported, and raises ``corrupted`` on a mismatch.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any, Protocol

from protocols.errors import ErrorCode, MicrokernelError

DEFAULT_CHUNK_SIZE = 16 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class Chunk:
    """One piece of a transfer: ``length`` bytes at ``offset``."""

    offset: int
    length: int


def plan(size: int, chunk_size: int) -> list[Chunk]:
    """Cut ``size`` bytes into chunks of at most ``chunk_size`` (none for an empty blob)."""
    if size < 0 or chunk_size < 1:
        raise ValueError(f"cannot plan {size} bytes in chunks of {chunk_size}")
    return [Chunk(offset=o, length=min(chunk_size, size - o)) for o in range(0, size, chunk_size)]


@dataclass(frozen=True, slots=True, kw_only=True)
class Call:
    """One RPC of the store a transfer needs next."""

    method: str
    args: dict[str, Any]


Steps = Generator[Call, Any, dict[str, Any]]


class Source(Protocol):
    """Where an upload's bytes come from."""

    size: int

    def read(self, offset: int, length: int) -> Any:
        """``length`` bytes at ``offset`` (any buffer)."""
        ...


class BufferSource:
    """Upload from memory: chunks are views of the buffer, not copies."""

    def __init__(self, data: Any) -> None:
        self._view = memoryview(data).cast("B")
        self.size = len(self._view)

    def read(self, offset: int, length: int) -> memoryview:
        return self._view[offset:offset + length]


class FileSource:
    """Upload from a file, read chunk by chunk (the whole file is never in memory)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.size = os.fstat(self._fd).st_size

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise MicrokernelError(ErrorCode.BAD_STATE, f"file shrank while uploading: {len(data)} bytes at {offset}, expected {length}")
        return data

    def close(self) -> None:
        """Close the file."""
        os.close(self._fd)

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def upload(key: str, source: Source, *, meta: dict[str, Any] | None = None, kind: str = "bytes",
           chunk_size: int | None = None) -> Steps:
    """The steps of a chunked upload of ``source`` to ``key``; returns ``put_commit``'s result.

    ``kind="tensors"`` marks the bytes as a safetensors file (the store checks its header).
    ``chunk_size`` caps the store's chunk size (never raises it). A failed upload is aborted.
    """
    begin = yield Call(method="put_begin", args={"key": key, "size": source.size, "meta": meta, "kind": kind})
    upload_id = begin["upload"]
    size = min(begin["chunk_size"], chunk_size or begin["chunk_size"])
    sha = hashlib.sha256()
    try:
        for chunk in plan(source.size, size):
            data = source.read(chunk.offset, chunk.length)
            sha.update(data)
            yield Call(method="put_chunk", args={"upload": upload_id, "offset": chunk.offset, "data": data})
        result = yield Call(method="put_commit", args={"upload": upload_id, "digest": sha.hexdigest()})
    except Exception:
        with contextlib.suppress(Exception):  # best effort: the store expires it anyway
            yield Call(method="put_abort", args={"upload": upload_id})
        raise
    return result


class Sink(Protocol):
    """Where a download's bytes go, in order."""

    def write(self, data: Any) -> Any:
        """Append ``data``."""
        ...


def download(key: str, sink: Sink, *, version: int | None = None, chunk_size: int | None = None) -> Steps:
    """The steps of a chunked download of ``key`` (latest version when None) into ``sink``.

    Returns ``stat``'s result (the version read is pinned, so a concurrent put cannot mix
    versions). Raises ``corrupted`` if the bytes received do not match the stored digest.
    """
    info = yield Call(method="stat", args={"key": key, "version": version})
    pinned, size = info["version"], info["size"]
    sha = hashlib.sha256()
    offset = 0
    while offset < size:
        part = yield Call(method="read", args={"key": key, "version": pinned, "offset": offset, "length": chunk_size})
        data = part["data"]
        if not len(data):
            raise MicrokernelError(ErrorCode.INTERNAL, f"store returned no bytes for {key!r} v{pinned} at offset {offset} of {size}")
        sha.update(data)
        sink.write(data)
        offset += len(data)
    if sha.hexdigest() != info["digest"]:
        raise MicrokernelError(ErrorCode.CORRUPTED, f"{key!r} v{pinned}: the bytes received do not match the stored sha256")
    return info


def _advance(steps: Steps, reply: Any, failure: BaseException | None) -> tuple[bool, Any]:
    """Resume ``steps``: ``(True, result)`` when they are done, else ``(False, next Call)``.

    StopIteration is turned into a value here because it cannot cross a thread's future.
    """
    try:
        return False, (steps.send(reply) if failure is None else steps.throw(failure))
    except StopIteration as stop:
        return True, stop.value


def run(steps: Steps, call: Callable[[str, dict[str, Any]], Any]) -> dict[str, Any]:
    """Drive transfer ``steps`` with a blocking ``call(method, args)``; returns their result."""
    reply: Any = None
    failure: BaseException | None = None
    while True:
        done, step = _advance(steps, reply, failure)
        if done:
            return step
        reply, failure = None, None
        try:
            reply = call(step.method, step.args)
        except Exception as exc:  # handed to the steps, which abort the upload and re-raise
            failure = exc


async def run_async(steps: Steps, call: Callable[[str, dict[str, Any]], Awaitable[Any]]) -> dict[str, Any]:
    """Drive transfer ``steps`` with an async ``call(method, args)``.

    The steps themselves (file reads, hashing) run in a worker thread, off the event loop.
    """
    reply: Any = None
    failure: BaseException | None = None
    while True:
        done, step = await asyncio.to_thread(_advance, steps, reply, failure)
        if done:
            return step
        reply, failure = None, None
        try:
            reply = await call(step.method, step.args)
        except Exception as exc:  # handed to the steps, which abort the upload and re-raise
            failure = exc
