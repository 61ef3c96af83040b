"""The store service: durable, versioned, content-addressed artifacts and tensors.

RPC surface (all handlers are async; errors: ``invalid_field`` for bad keys/arguments,
``not_found`` for missing keys/versions/uploads, ``corrupted`` when stored data fails its check,
``too_large`` when a payload does not fit one message). See ``docs/draft-store.md``.

Threads: every index operation (and every change to the blob directory) runs on one dedicated
index thread, in order, so there is exactly one writer and no race between a put and a delete
of the same content. Bulk work (writing and hashing a new blob, reading and verifying one) runs
on the default thread pool. The event loop only moves messages.

Reads of at least the shared-memory threshold (``MK_SHM_THRESHOLD``) land in pooled segments
(``segments.py``), so the reply hands them to a same-host caller without another copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np

from protocols import shm
from protocols.errors import ErrorCode, MicrokernelError
from protocols.store import DEFAULT_CHUNK_SIZE
from protocols.wire import INLINE_BYTES_LIMIT
from services.base import Service, rpc
from services.store import safetensors
from services.store.blobs import BlobCorrupted, BlobStore, Staged
from services.store.index import Record
from services.store.integrity import DEFAULT_TTL_S
from services.store.keys import check_key, check_meta, check_prefix, check_version, invalid
from services.store.repository import Repository, StoreLocked
from services.store.segments import SegmentPool
from services.store.uploads import Uploads, finish_upload

T = TypeVar("T")

KINDS = ("bytes", "tensors")
DEFAULT_UPLOAD_TTL = 600.0
DEFAULT_MAX_MESSAGE = 64 << 20
_HEADROOM = 64 << 10  # room for the header and body frames next to a payload frame
_LOCK_WAIT_S = 15.0  # a previous store process on the root may still be exiting


def default_root() -> Path:
    """``<MK_RUNTIME_DIR>/../store``, or ``./mk-store`` outside a kernel."""
    runtime_dir = os.environ.get("MK_RUNTIME_DIR")
    return Path(runtime_dir).resolve().parent / "store" if runtime_dir else Path("mk-store").resolve()


def _setting(config: dict[str, Any], name: str, default: float, kind: type, *, zero: bool = False) -> Any:
    """A positive (``zero``: non-negative) number of type ``kind`` from the config."""
    value = config.get(name, default)
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (value == 0 and not zero)
            or (kind is int and not isinstance(value, int))):
        raise ValueError(f"[services.<store>.config] {name} must be a {'non-negative' if zero else 'positive'} "
                         f"{kind.__name__}, got {value!r}")
    return kind(value)


class Store(Service):
    """Durable artifact/tensor store. Config: ``root``, ``chunk_size``, ``upload_ttl`` (seconds),
    ``reverify_after`` (seconds), ``shm_pool_bytes``."""

    drain_timeout = 8.0  # in-flight writes may finish on graceful stop (below the default 10 s stop grace)

    async def setup(self) -> None:
        config = self.config
        root = config.get("root")
        if root is not None and (not isinstance(root, str) or not root):
            raise ValueError(f"[services.{self.name}.config] root must be a directory path, got {root!r}")
        self.root = Path(root).resolve() if root else default_root()
        max_message = int(os.environ.get("MK_MAX_MESSAGE_SIZE") or DEFAULT_MAX_MESSAGE)
        self.max_payload = max(1, max_message - min(_HEADROOM, max_message // 2))
        self.chunk_size = min(_setting(config, "chunk_size", DEFAULT_CHUNK_SIZE, int), self.max_payload)
        self.uploads = Uploads(_setting(config, "upload_ttl", DEFAULT_UPLOAD_TTL, float))
        self.reverify_after = _setting(config, "reverify_after", DEFAULT_TTL_S, float, zero=True)
        pool_bytes = shm.env_bytes("MK_SHM_POOL_BYTES", shm.DEFAULT_POOL_BYTES)
        self.segments = SegmentPool(_setting(config, "shm_pool_bytes", pool_bytes, int, zero=True))
        self.shm_threshold = shm.threshold_from_env()
        self._index_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-index")
        self.repo = await self._open_repository()
        sweep = self.repo.sweep
        self.log.info("store at %s (%s): %d objects; removed %d temp files, %d orphan blobs, %d stale generations",
                      self.root, self.repo.generation, (await self._on_index(self.repo.index.counts))["objects"],
                      sweep.temp_files, sweep.orphan_blobs, sweep.stale_generations)
        self._expiry = asyncio.create_task(self._expire_uploads(), name="store-upload-expiry")

    async def _open_repository(self) -> Repository:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _LOCK_WAIT_S
        while True:
            try:
                return await self._on_index(Repository, self.root, reverify_after=self.reverify_after)
            except StoreLocked:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.2)  # a lock has no wake-up to wait on; bounded retries

    async def teardown(self) -> None:
        self._expiry.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._expiry
        for upload in self.uploads.drain():
            await asyncio.to_thread(upload.temp.discard)
        await self._on_index(self.repo.close)
        self._index_thread.shutdown(wait=True)
        await asyncio.to_thread(self.segments.clear)

    async def _on_index(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on the index thread (the one writer)."""
        return await asyncio.get_running_loop().run_in_executor(self._index_thread, functools.partial(fn, *args, **kwargs))

    async def _expire_uploads(self) -> None:
        period = min(self.uploads.ttl / 4, 30.0)
        while True:
            await asyncio.sleep(period)
            for upload in self.uploads.expired():
                self.log.info("upload %s of %r expired after %gs idle", upload.id, upload.key, self.uploads.ttl)
                async with upload.lock:
                    await asyncio.to_thread(upload.temp.discard)
                self.publish("store.upload_expired", {"upload": upload.id, "key": upload.key,
                                                      "received": upload.received, "size": upload.size})
            try:  # idle read segments go back to the system
                await asyncio.to_thread(self.segments.trim)
            except OSError as exc:
                self.log.warning("releasing idle read segments failed: %s", exc)

    # -- helpers ---------------------------------------------------------------------------------

    def _allocate(self, nbytes: int) -> np.ndarray:
        """The buffer a read of ``nbytes`` fills (in a thread): a pooled shared-memory segment from
        the shared-memory threshold on (handed to a same-host caller as it is), else plain memory."""
        if self.shm_threshold is None or nbytes < self.shm_threshold:
            return np.empty(nbytes, dtype=np.uint8)
        return self.segments.buffer(nbytes)

    def _locate(self, key: str, version: int | None) -> tuple[Record, BlobStore]:
        # On the index thread: the record and the blob store it lives in (a restore swaps both).
        return self.repo.index.lookup(key, version), self.repo.blobs

    def _commit(self, staged: Staged, key: str, kind: str, meta_json: str) -> Record:
        # On the index thread. A restore between staging and commit deleted the staging directory.
        if staged.path.parent != self.repo.blobs.tmp_dir:
            raise MicrokernelError(ErrorCode.BAD_STATE, f"the store was restored while {key!r} was being written; put it again")
        return self.repo.commit(staged, key=key, kind=kind, meta_json=meta_json)

    async def _verified(self, record: Record, blobs: BlobStore, read: Callable[[BlobStore], T]) -> T:
        """Run ``read(blobs)`` in a thread; a failed check becomes ``corrupted`` naming the key and version."""
        try:
            return await asyncio.to_thread(read, blobs)
        except BlobCorrupted as exc:
            if blobs is not self.repo.blobs:  # a restore replaced the files under the read
                raise MicrokernelError(ErrorCode.BAD_STATE, f"store key {record.key!r} changed while being read "
                                       "(the store was restored); retry") from None
            try:
                current = await self._on_index(self.repo.index.lookup, record.key, record.version)
            except MicrokernelError:
                raise MicrokernelError(ErrorCode.NOT_FOUND, f"store key {record.key!r} version {record.version} "
                                       "was deleted while it was being read") from None
            if current.digest != record.digest:  # restored meanwhile: a different object now
                raise MicrokernelError(ErrorCode.BAD_STATE, f"store key {record.key!r} changed while being read; retry") from None
            self.log.error("corrupted: %r v%d: %s", record.key, record.version, exc)
            raise MicrokernelError(ErrorCode.CORRUPTED, f"store key {record.key!r} version {record.version} is corrupted "
                                   f"({exc}); nothing was returned", {"key": record.key, "version": record.version}) from None

    def _payload_fits(self, record: Record) -> None:
        if record.size > self.max_payload:
            raise MicrokernelError(ErrorCode.TOO_LARGE, f"store key {record.key!r} version {record.version} is {record.size} "
                                   f"bytes, more than one message holds ({self.max_payload}); read it in chunks with "
                                   "read(key, version, offset, length) (services.store.client.get_large, mkctl store get)")

    # -- one-message RPCs ------------------------------------------------------------------------

    @rpc
    async def put(self, key: str, data: Any = None, tensors: dict[str, Any] | None = None,
                  meta: dict[str, Any] | None = None) -> dict[str, Any]:
        """Store ``data`` (bytes) or ``tensors`` (name -> array, as safetensors) as the next version of ``key``.

        Returns ``{key, version, digest, size, kind}`` once the blob and the index are on disk.
        """
        key = check_key(key)
        meta_json = check_meta(meta, key)
        if (data is None) == (tensors is None):
            raise invalid(f"put of {key!r} takes exactly one of data (bytes) or tensors (a dict of arrays)")
        blobs = self.repo.blobs
        if data is not None:
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise invalid(f"data of {key!r} must be bytes, got {type(data).__name__}")
            kind = "bytes"
            staged = await asyncio.to_thread(blobs.stage, [data])
        else:
            if not isinstance(tensors, dict):
                raise invalid(f"tensors of {key!r} must be a dict of name -> array, got {type(tensors).__name__}")
            kind = "tensors"
            staged = await asyncio.to_thread(_stage_tensors, blobs, key, tensors)
        record = await self._on_index(self._commit, staged, key, kind, meta_json)
        return {"key": key, "version": record.version, "digest": record.digest, "size": record.size, "kind": kind}

    @rpc
    async def get(self, key: str, version: int | None = None) -> dict[str, Any]:
        """A version of ``key`` (latest when None) with its payload: ``data`` (bytes) or ``tensors`` (arrays)."""
        key = check_key(key)
        record, blobs = await self._on_index(self._locate, key, check_version(version, key))
        self._payload_fits(record)
        buffer = await self._verified(record, blobs, lambda b: b.read(record.digest, record.size, record.blocks,
                                                                      self._allocate))
        reply = record.describe()
        if record.kind == "tensors":
            try:
                reply["tensors"], _ = safetensors.decode(buffer)  # views of the one buffer
            except safetensors.SafetensorsError as exc:
                raise MicrokernelError(ErrorCode.CORRUPTED, f"store key {key!r} version {record.version}: {exc}") from None
        else:
            reply["data"] = buffer.tobytes() if record.size < INLINE_BYTES_LIMIT else memoryview(buffer)
        return reply

    @rpc
    async def stat(self, key: str, version: int | None = None) -> dict[str, Any]:
        """What ``get`` returns without the payload, plus ``versions`` and ``created_ns``."""
        key = check_key(key)
        version = check_version(version, key)

        def describe() -> dict[str, Any]:
            record = self.repo.index.lookup(key, version)
            return {**record.describe(), "created_ns": record.created_ns, "versions": self.repo.index.versions(key)}

        return await self._on_index(describe)

    @rpc(name="list")
    async def list_keys(self, prefix: str = "") -> list[dict[str, Any]]:
        """``[{key, latest, versions, size}]`` of every key starting with ``prefix``, sorted by key."""
        return await self._on_index(self.repo.index.list, check_prefix(prefix))

    @rpc
    async def delete(self, key: str, version: int | None = None) -> dict[str, Any]:
        """Delete one version, or every version of ``key``; ``{deleted: n}``. Versions are never reused."""
        key = check_key(key)
        return {"deleted": await self._on_index(self.repo.delete, key, check_version(version, key))}

    @rpc
    async def info(self) -> dict[str, Any]:
        """The store's settings and totals: ``{root, generation, chunk_size, max_payload, upload_ttl,
        reverify_after, uploads, trusted, pooled_bytes, keys, objects, blobs, bytes}``."""
        counts = await self._on_index(self.repo.index.counts)
        return {"root": str(self.root), "generation": self.repo.generation, "chunk_size": self.chunk_size,
                "max_payload": self.max_payload, "upload_ttl": self.uploads.ttl, "reverify_after": self.reverify_after,
                "uploads": len(self.uploads), "trusted": len(self.repo.blobs.verified),
                "pooled_bytes": self.segments.pooled_bytes, **counts}

    # -- large payloads --------------------------------------------------------------------------

    @rpc
    async def put_begin(self, key: str, size: int, meta: dict[str, Any] | None = None, kind: str = "bytes") -> dict[str, Any]:
        """Open an upload of ``size`` bytes to ``key``: ``{upload, chunk_size, expires_in}``.

        ``kind="tensors"`` declares the bytes a safetensors file (checked at commit).
        """
        key = check_key(key)
        meta_json = check_meta(meta, key)
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise invalid(f"size of the upload to {key!r} must be a non-negative integer, got {size!r}")
        if kind not in KINDS:
            raise invalid(f"kind of the upload to {key!r} must be one of {', '.join(KINDS)}, got {kind!r}")
        self.uploads.check_room()
        temp = await asyncio.to_thread(self.repo.blobs.temp, "upload")
        upload = self.uploads.begin(key=key, size=size, kind=kind, meta_json=meta_json, temp=temp)
        return {"upload": upload.id, "chunk_size": self.chunk_size, "expires_in": self.uploads.ttl}

    @rpc
    async def put_chunk(self, upload: str, offset: int, data: Any) -> dict[str, Any]:
        """Append ``data`` at ``offset`` (chunks in order; a repeated chunk is ignored): ``{upload, received}``."""
        session = self.uploads.get(upload)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise invalid(f"data of upload {upload} must be bytes, got {type(data).__name__}")
        async with session.lock:
            self.uploads.still_open(session)
            length = memoryview(data).nbytes
            if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
                raise invalid(f"offset of upload {upload} must be a non-negative integer, got {offset!r}")
            if offset + length <= session.received:
                return {"upload": session.id, "received": session.received}  # a retry of a chunk we hold
            if offset != session.received:
                raise MicrokernelError(ErrorCode.BAD_STATE, f"upload {upload} of {session.key!r} expects offset "
                                       f"{session.received}, got {offset} (chunks go in order)")
            if offset + length > session.size:
                raise invalid(f"upload {upload} of {session.key!r} declared {session.size} bytes; "
                              f"this chunk ends at {offset + length}")
            await asyncio.to_thread(session.temp.write, data)
        return {"upload": session.id, "received": session.received}

    @rpc
    async def put_commit(self, upload: str, digest: str | None = None) -> dict[str, Any]:
        """Finish an upload; ``digest`` (sha256 hex, optional) is checked against what arrived.

        Returns what ``put`` returns, once durable.
        """
        session = self.uploads.get(upload)
        async with session.lock:
            self.uploads.still_open(session)
            if session.received != session.size:
                raise MicrokernelError(ErrorCode.BAD_STATE, f"upload {upload} of {session.key!r} has {session.received} "
                                       f"of {session.size} bytes; send the rest before put_commit")
            self.uploads.close(session)
            try:
                staged = await asyncio.to_thread(finish_upload, session, digest)
            except BaseException:
                await asyncio.to_thread(session.temp.discard)
                raise
        record = await self._on_index(self._commit, staged, session.key, session.kind, session.meta_json)
        return {"key": record.key, "version": record.version, "digest": record.digest, "size": record.size,
                "kind": record.kind}

    @rpc
    async def put_abort(self, upload: str) -> dict[str, Any]:
        """Abandon an upload and delete what it sent: ``{aborted: true}``."""
        session = self.uploads.get(upload)
        async with session.lock:
            self.uploads.still_open(session)
            self.uploads.close(session)
            await asyncio.to_thread(session.temp.discard)
        return {"aborted": True}

    @rpc
    async def read(self, key: str, version: int | None = None, offset: int = 0, length: int | None = None) -> dict[str, Any]:
        """Bytes ``[offset, offset + length)`` of a version's blob (for tensors: of its safetensors file).

        ``length=None`` reads up to ``chunk_size`` bytes; the reply is cut at the end of the blob.
        Returns ``{key, version, digest, size, offset, data}``.
        """
        key = check_key(key)
        record, blobs = await self._on_index(self._locate, key, check_version(version, key))
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= record.size:
            raise invalid(f"offset of a read of {key!r} v{record.version} must be in [0, {record.size}], got {offset!r}")
        if length is None:
            length = self.chunk_size
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise invalid(f"length of a read of {key!r} must be a non-negative integer or None, got {length!r}")
        if length > self.max_payload:
            raise MicrokernelError(ErrorCode.TOO_LARGE, f"a read of {length} bytes exceeds one message ({self.max_payload})")
        length = min(length, record.size - offset)
        view = await self._verified(record, blobs, lambda b: b.read_range(record.digest, record.size, record.blocks,
                                                                          offset, length, self._allocate))
        data = view.tobytes() if length < INLINE_BYTES_LIMIT else view
        return {"key": key, "version": record.version, "digest": record.digest, "size": record.size,
                "offset": offset, "data": data}

    # -- backups ---------------------------------------------------------------------------------

    @rpc
    async def snapshot(self, directory: str) -> dict[str, Any]:
        """Write a consistent copy of the store to ``directory`` (absolute; new or empty).

        Writes wait while it runs; reads go on. Returns the manifest plus ``directory``.
        """
        target = self._directory_arg(directory, "snapshot")
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise invalid(f"snapshot directory {target} exists and is not an empty directory")
        try:
            manifest = await self._on_index(self.repo.snapshot, target)
        except BlobCorrupted as exc:
            owner = await self._on_index(self.repo.index.owner_of, exc.digest)
            named = f"store key {owner[0]!r} version {owner[1]}" if owner else "a blob"
            raise MicrokernelError(ErrorCode.CORRUPTED, f"snapshot to {target} stopped: {named} is corrupted ({exc})") from None
        return {**manifest, "directory": str(target)}

    @rpc
    async def restore(self, directory: str) -> dict[str, Any]:
        """Replace the store's whole content by the snapshot in ``directory``; open uploads are aborted.

        Every blob is verified before the switch, which is atomic. Returns the manifest plus ``directory``.
        """
        source = self._directory_arg(directory, "restore")
        for upload in self.uploads.drain():
            async with upload.lock:
                await asyncio.to_thread(upload.temp.discard)
        try:
            manifest = await self._on_index(self.repo.restore, source)
        except BlobCorrupted as exc:
            raise MicrokernelError(ErrorCode.CORRUPTED, f"snapshot {source} has a corrupted blob ({exc}); "
                                   "the store was not changed") from None
        self.log.info("restored from %s: %s objects", source, manifest.get("objects"))
        return {**manifest, "directory": str(source)}

    def _directory_arg(self, directory: Any, what: str) -> Path:
        if not isinstance(directory, str) or not directory or not os.path.isabs(directory):
            raise invalid(f"{what} directory must be an absolute path on the store's host, got {directory!r}")
        path = Path(directory).resolve()
        if path == self.root or self.root in path.parents or path in self.root.parents:
            raise invalid(f"{what} directory {path} overlaps the store root {self.root}")
        return path


def _stage_tensors(blobs: BlobStore, key: str, tensors: dict[str, Any]) -> Staged:
    """Encode ``tensors`` as safetensors (arrays written from their own buffers) into a staged blob."""
    try:
        encoded = safetensors.encode(tensors)
    except (safetensors.SafetensorsError, TypeError, ValueError) as exc:
        raise invalid(f"tensors of {key!r}: {exc}") from None
    return blobs.stage(encoded.buffers())
