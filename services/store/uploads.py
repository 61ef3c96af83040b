"""Upload sessions: a blob too large for one message arrives as ``put_chunk`` calls in order.

Each session owns a temp file in the store's ``tmp/`` (hashed while written, see ``blobs.TempBlob``).
Chunks must arrive in order; a chunk the session already holds (a retry after a lost reply) is
accepted and ignored. A session idle for longer than the TTL is aborted and its temp file deleted.
Sessions live in the store process's memory: a restarted store has none (its start-up sweep
deletes their temp files), and the client starts the upload again.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field

import numpy as np

from protocols.errors import ErrorCode, MicrokernelError
from services.store import safetensors
from services.store.blobs import Staged, TempBlob
from services.store.keys import invalid

MAX_OPEN_UPLOADS = 64


@dataclass(slots=True, kw_only=True)
class Upload:
    """One open upload session (mutable: it grows with each chunk)."""

    id: str
    key: str
    size: int
    kind: str
    meta_json: str
    temp: TempBlob
    touched: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one chunk at a time per session

    @property
    def received(self) -> int:
        """Bytes received so far (they arrive in order)."""
        return self.temp.size


class Uploads:
    """The open upload sessions of one store replica."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._open: dict[str, Upload] = {}

    def __len__(self) -> int:
        return len(self._open)

    def begin(self, *, key: str, size: int, kind: str, meta_json: str, temp: TempBlob) -> Upload:
        """Register a new session writing to ``temp``."""
        upload = Upload(id=secrets.token_hex(12), key=key, size=size, kind=kind, meta_json=meta_json, temp=temp)
        self._open[upload.id] = upload
        return upload

    def check_room(self) -> None:
        """Refuse a new session when too many are open (each holds a file and disk space)."""
        if len(self._open) >= MAX_OPEN_UPLOADS:
            raise MicrokernelError(ErrorCode.OVERLOADED, f"{len(self._open)} uploads are open (limit {MAX_OPEN_UPLOADS}); "
                                   "finish or abort some first")

    def get(self, upload_id: object) -> Upload:
        """The open session ``upload_id``; ``not_found`` if it finished, expired or never existed."""
        upload = self._open.get(upload_id) if isinstance(upload_id, str) else None
        if upload is None:
            raise MicrokernelError(ErrorCode.NOT_FOUND, f"upload {upload_id!r} is not open (committed, aborted, expired "
                                   f"after {self.ttl:g}s idle, or the store restarted); start it again with put_begin")
        upload.touched = time.monotonic()
        return upload

    def still_open(self, upload: Upload) -> None:
        """Raise ``not_found`` if ``upload`` was closed (expired, aborted, restored) while its caller waited."""
        if self._open.get(upload.id) is not upload:
            self.get(upload.id)

    def close(self, upload: Upload) -> None:
        """Forget a session (its temp file is the caller's to commit or discard)."""
        self._open.pop(upload.id, None)

    def expired(self, now: float | None = None) -> list[Upload]:
        """Sessions idle for longer than the TTL, removed from the open set."""
        now = time.monotonic() if now is None else now
        gone = [u for u in self._open.values() if now - u.touched > self.ttl]
        for upload in gone:
            self.close(upload)
        return gone

    def drain(self) -> list[Upload]:
        """Every open session, removed (on restore and on stop)."""
        gone = list(self._open.values())
        self._open.clear()
        return gone


def finish_upload(session: Upload, digest: str | None) -> Staged:
    """fsync the upload's temp file and check it: the client's digest, and a tensors file's header."""
    staged = session.temp.finish()
    if digest is not None and digest != staged.digest:
        raise MicrokernelError(ErrorCode.CORRUPTED, f"upload {session.id} of {session.key!r}: the bytes received hash to "
                               f"{staged.digest}, the client sent {digest}; nothing was stored")
    if session.kind == "tensors":
        with open(staged.path, "rb") as f:
            head = f.read(8)
            need = 8 + (int.from_bytes(head, "little") if len(head) == 8 else 0)
            head += f.read(min(need, safetensors.MAX_HEADER + 8) - len(head))
        try:
            safetensors.read_header(np.frombuffer(head, dtype=np.uint8), file_size=staged.size)
        except safetensors.SafetensorsError as exc:
            raise invalid(f"upload {session.id} of {session.key!r} is declared tensors but is not a safetensors file: {exc}") from None
    return staged
