"""The shared chunked-transfer steps (protocols.store), driven sync and async against a small in-memory peer.

The peer follows the store's RPC contract for the calls the steps make; the real service is
exercised by tests/integration/test_store.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
from typing import Any

import pytest

from protocols.errors import ErrorCode, MicrokernelError
from protocols.store import BufferSource, FileSource, download, plan, run, run_async, upload


class Peer:
    """Just enough of the store's upload/read RPCs, recording every call."""

    def __init__(self, chunk_size: int, fail_chunk_at: int | None = None, corrupt_reads: bool = False) -> None:
        self.chunk_size = chunk_size
        self.fail_chunk_at = fail_chunk_at
        self.corrupt_reads = corrupt_reads
        self.calls: list[str] = []
        self.uploads: dict[str, bytearray] = {}
        self.blobs: dict[str, bytes] = {}

    def __call__(self, method: str, args: dict[str, Any]) -> Any:
        self.calls.append(method)
        if method == "put_begin":
            self.uploads["u1"] = bytearray()
            self.key = args["key"]
            return {"upload": "u1", "chunk_size": self.chunk_size, "expires_in": 60.0}
        if method == "put_chunk":
            if args["offset"] == self.fail_chunk_at:
                raise MicrokernelError(ErrorCode.UNAVAILABLE, "store went away")
            assert args["offset"] == len(self.uploads["u1"])
            self.uploads["u1"] += bytes(args["data"])
            return {"upload": "u1", "received": len(self.uploads["u1"])}
        if method == "put_commit":
            data = bytes(self.uploads.pop("u1"))
            assert hashlib.sha256(data).hexdigest() == args["digest"]
            self.blobs[self.key] = data
            return {"key": self.key, "version": 1, "digest": args["digest"], "size": len(data), "kind": "bytes"}
        if method == "put_abort":
            self.uploads.pop(args["upload"])
            return {"aborted": True}
        if method == "stat":
            data = self.blobs[args["key"]]
            return {"key": args["key"], "version": 1, "digest": hashlib.sha256(data).hexdigest(), "size": len(data),
                    "kind": "bytes", "meta": {}, "versions": [1]}
        if method == "read":
            data = self.blobs[args["key"]]
            part = data[args["offset"]:args["offset"] + (args["length"] or self.chunk_size)]
            if self.corrupt_reads:
                part = bytes(len(part))
            return {"data": part}
        raise AssertionError(method)


def test_plan_covers_the_size_exactly() -> None:
    assert [(c.offset, c.length) for c in plan(10, 4)] == [(0, 4), (4, 4), (8, 2)]
    assert plan(0, 4) == [] and len(plan(8, 4)) == 2
    with pytest.raises(ValueError):
        plan(5, 0)


def test_upload_and_download_in_chunks(tmp_path: Any) -> None:
    data = bytes(range(256)) * 40  # 10240 bytes: 3 chunks of 4000
    peer = Peer(chunk_size=4000)
    result = run(upload("k", BufferSource(data)), peer)
    assert result["size"] == len(data) and peer.calls.count("put_chunk") == 3
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    with FileSource(path) as source:
        run(upload("k2", source, chunk_size=1000), peer)
    assert peer.blobs["k2"] == data and peer.calls.count("put_chunk") == 3 + 11
    sink = io.BytesIO()
    info = run(download("k", sink), peer)
    assert sink.getvalue() == data and info["version"] == 1


def test_a_failed_upload_is_aborted_and_the_error_raised() -> None:
    peer = Peer(chunk_size=4, fail_chunk_at=8)
    with pytest.raises(MicrokernelError, match="store went away"):
        run(upload("k", BufferSource(b"0123456789ab")), peer)
    assert peer.calls[-1] == "put_abort" and not peer.uploads


def test_a_download_that_does_not_match_the_digest_is_corrupted() -> None:
    peer = Peer(chunk_size=4, corrupt_reads=True)
    peer.blobs["k"] = b"payload!"
    with pytest.raises(MicrokernelError) as err:
        run(download("k", io.BytesIO()), peer)
    assert err.value.code is ErrorCode.CORRUPTED


def test_the_async_driver_runs_the_same_steps() -> None:
    peer = Peer(chunk_size=3)

    async def call(method: str, args: dict[str, Any]) -> Any:
        return peer(method, args)

    async def main() -> bytes:
        await run_async(upload("k", BufferSource(b"abcdefgh")), call)
        sink = io.BytesIO()
        await run_async(download("k", sink), call)
        return sink.getvalue()

    assert asyncio.run(main()) == b"abcdefgh"
    failing = Peer(chunk_size=2, fail_chunk_at=2)

    async def fail_call(method: str, args: dict[str, Any]) -> Any:
        return failing(method, args)

    with pytest.raises(MicrokernelError, match="went away"):
        asyncio.run(run_async(upload("k", BufferSource(b"abcdef")), fail_call))
    assert failing.calls[-1] == "put_abort"
