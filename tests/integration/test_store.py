"""The store service under a real daemon: the RPC surface, errors, chunked transfers, backups, mkctl store."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from microkernel import cli_store
from microkernel.client import Client
from protocols.errors import ErrorCode, MicrokernelError, RemoteError
from protocols.store import BufferSource, download, run, upload
from services.store import safetensors
from services.store.integrity import SETTLE_NS
from tests.integration.conftest import KernelHandle

CEILING = 30.0
# A 1 MiB frame budget makes "larger than one message" cheap to test; a 64 KiB shared-memory
# threshold sends the store's replies from 64 KiB on through its pooled segments.
CONFIG = """
[kernel]
max_message_size = 1048576
[services.store]
entry = "services.store:Store"
env = {{ MK_SHM_THRESHOLD = "65536" }}
[services.store.config]
chunk_size = 262144
[services.spare]
entry = "services.store:Store"
[services.spare.config]
root = "{spare}"
upload_ttl = 1.0
[services.user]
entry = "tests.fixtures.store_user:StoreUser"
depends_on = ["store"]
"""


@pytest.fixture
def kernel_config(short_tmp: str) -> str:
    return CONFIG.format(spare=Path(short_tmp) / "spare-root")


@pytest.fixture
def store(kernel: KernelHandle) -> Iterator[Client]:
    with Client(runtime_dir=kernel.runtime_dir, timeout=CEILING) as c:
        c.wait_ready("store", timeout=CEILING)
        c.wait_ready("spare", timeout=CEILING)
        yield c


def code_of(c: Client, method: str, **args: Any) -> tuple[ErrorCode, str]:
    with pytest.raises(RemoteError) as err:
        c.call("store", method, **args)
    return err.value.code, err.value.reason


def blob_path(root: Path, digest: str) -> Path:
    generation = (root / "CURRENT").read_text().strip()
    return root / generation / "blobs" / digest[:2] / digest


def test_put_get_stat_list_delete_of_bytes_and_tensors(store: Client, short_tmp: str) -> None:
    first = store.call("store", "put", key="notes/a", data=b"hello", meta={"lang": "en"})
    assert first == {"key": "notes/a", "version": 1, "digest": hashlib.sha256(b"hello").hexdigest(), "size": 5, "kind": "bytes"}
    assert store.call("store", "put", key="notes/a", data=b"hello again")["version"] == 2
    big = os.urandom(200_000)  # above the inline limit: travels as a frame both ways
    store.call("store", "put", key="notes/b", data=big)
    got = store.call("store", "get", key="notes/a", version=1)
    assert bytes(got["data"]) == b"hello" and got["meta"] == {"lang": "en"} and got["version"] == 1
    assert bytes(store.call("store", "get", key="notes/a")["data"]) == b"hello again"
    assert bytes(store.call("store", "get", key="notes/b")["data"]) == big

    state = {"w": np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32),
             "step": np.array(7, dtype=np.int64), "mask": np.array([True, False]), "empty": np.zeros((0, 3), np.float16)}
    reply = store.call("store", "put", key="models/tiny", tensors=state, meta={"arch": "tiny"})
    assert reply["kind"] == "tensors" and reply["version"] == 1
    got = store.call("store", "get", key="models/tiny")
    assert got["kind"] == "tensors" and got["meta"] == {"arch": "tiny"}
    for name, array in state.items():
        assert got["tensors"][name].dtype == array.dtype and np.array_equal(got["tensors"][name], array)

    stat = store.call("store", "stat", key="notes/a")
    assert stat["versions"] == [1, 2] and stat["version"] == 2 and "data" not in stat and stat["size"] == 11
    listing = store.call("store", "list", prefix="notes/")
    assert [(e["key"], e["latest"], e["versions"]) for e in listing] == [("notes/a", 2, [1, 2]), ("notes/b", 1, [1])]
    assert [e["key"] for e in store.call("store", "list")] == ["models/tiny", "notes/a", "notes/b"]

    # Identical content is stored once; the blob goes when its last reference does.
    same = store.call("store", "put", key="notes/copy", data=big)
    assert same["digest"] == hashlib.sha256(big).hexdigest()
    assert store.call("store", "info")["blobs"] == 4
    assert store.call("store", "delete", key="notes/b") == {"deleted": 1}
    assert blob_path(Path(short_tmp) / "store", same["digest"]).exists()
    assert store.call("store", "delete", key="notes/copy") == {"deleted": 1}
    assert not blob_path(Path(short_tmp) / "store", same["digest"]).exists()
    assert store.call("store", "delete", key="notes/a", version=1) == {"deleted": 1}
    assert store.call("store", "put", key="notes/a", data=b"x")["version"] == 3  # never reused


def test_bad_keys_missing_keys_and_corrupted_blobs_get_clear_errors(store: Client, short_tmp: str) -> None:
    for key in ["", "../etc/passwd", "/abs", "a//b", "bad key", "x" * 600]:
        code, _ = code_of(store, "put", key=key, data=b"x")
        assert code is ErrorCode.INVALID_FIELD, key
    assert code_of(store, "put", key="k", data=b"x", tensors={"a": np.zeros(1)})[0] is ErrorCode.INVALID_FIELD
    assert code_of(store, "put", key="k", tensors={"a": np.zeros(1, np.complex64)})[0] is ErrorCode.INVALID_FIELD
    assert code_of(store, "get", key="missing") == (ErrorCode.NOT_FOUND, "store key 'missing' does not exist")
    store.call("store", "put", key="k", data=b"x" * 100_000)
    code, reason = code_of(store, "get", key="k", version=5)
    assert code is ErrorCode.NOT_FOUND and "has no version 5 (versions: 1)" in reason
    assert code_of(store, "get", key="k", version=0)[0] is ErrorCode.INVALID_FIELD

    victim = store.call("store", "put", key="data/victim", data=os.urandom(100_000))
    store.call("store", "put", key="data/healthy", data=b"fine")
    path = blob_path(Path(short_tmp) / "store", victim["digest"])
    with open(path, "r+b") as f:
        f.seek(1234)
        byte = f.read(1)
        f.seek(1234)
        f.write(bytes([byte[0] ^ 1]))
    code, reason = code_of(store, "get", key="data/victim")
    assert code is ErrorCode.CORRUPTED and "'data/victim' version 1" in reason
    code, reason = code_of(store, "read", key="data/victim", offset=1000, length=500)
    assert code is ErrorCode.CORRUPTED and "'data/victim' version 1" in reason
    # The store keeps serving everything else.
    assert bytes(store.call("store", "get", key="data/healthy")["data"]) == b"fine"
    assert store.call("store", "put", key="data/after", data=b"ok")["version"] == 1


def test_gets_reuse_segments_and_a_trusted_blob_is_checked_again_once_its_file_changes(store: Client, short_tmp: str) -> None:
    weights = {"w": np.arange(150_000, dtype=np.float32), "b": np.arange(5, dtype=np.int64)}
    put = store.call("store", "put", key="hot/weights", tensors=weights)
    path = blob_path(Path(short_tmp) / "store", put["digest"])

    def get_and_compare() -> None:
        got = store.call("store", "get", key="hot/weights")["tensors"]
        assert all(np.array_equal(got[n], a) for n, a in weights.items())
        assert not got["w"].flags.writeable  # a view of the store's segment, mapped read-only

    get_and_compare()
    pooled = store.call("store", "info")["pooled_bytes"]
    assert pooled >= put["size"]
    # Once the blob file's ctime is older than the settle time, a full check makes it trusted.
    remaining = os.stat(path).st_ctime_ns + SETTLE_NS - time.time_ns()
    if remaining > 0:
        threading.Event().wait(remaining / 1e9 + 0.02)
    get_and_compare()
    assert store.call("store", "info")["trusted"] == 1
    for _ in range(3):
        get_and_compare()
    assert store.call("store", "info")["pooled_bytes"] == pooled  # released segments were reused
    with open(path, "r+b") as f:  # a flipped byte changes the file's ctime: the trust is gone
        f.seek(put["size"] - 10)
        byte = f.read(1)
        f.seek(put["size"] - 10)
        f.write(bytes([byte[0] ^ 1]))
    code, reason = code_of(store, "get", key="hot/weights")
    assert code is ErrorCode.CORRUPTED and "'hot/weights' version 1" in reason and "CRC32" in reason
    assert store.call("store", "info")["trusted"] == 0


def test_payloads_beyond_one_message_move_in_chunks(store: Client, short_tmp: str) -> None:
    call = lambda method, args: store.call_args("store", method, args, timeout=CEILING)  # noqa: E731
    data = os.urandom(3 * 1024 * 1024 + 17)
    assert code_of(store, "put", key="big/blob", data=data)[0] is ErrorCode.TOO_LARGE
    reply = run(upload("big/blob", BufferSource(data), meta={"n": 1}), call)
    assert reply["size"] == len(data) and reply["digest"] == hashlib.sha256(data).hexdigest()
    code, reason = code_of(store, "get", key="big/blob")
    assert code is ErrorCode.TOO_LARGE and "read it in chunks" in reason
    sink = io.BytesIO()
    assert run(download("big/blob", sink), call)["version"] == 1 and sink.getvalue() == data
    part = store.call("store", "read", key="big/blob", offset=1_000_000, length=100)
    assert bytes(part["data"]) == data[1_000_000:1_000_100] and part["size"] == len(data)

    # Tensors too: a safetensors file uploaded in chunks comes back as arrays.
    weights = {"emb": np.arange(400_000, dtype=np.float32).reshape(1000, 400)}
    encoded = safetensors.dumps(weights)
    run(upload("big/tensors", BufferSource(encoded), kind="tensors"), call)
    assert store.call("store", "stat", key="big/tensors")["kind"] == "tensors"
    sink = io.BytesIO()
    run(download("big/tensors", sink), call)
    assert np.array_equal(safetensors.decode(sink.getvalue())[0]["emb"], weights["emb"])

    # The session rules: in order, the declared size, the client's digest, abort.
    begin = store.call("store", "put_begin", key="big/x", size=10)
    up = begin["upload"]
    assert begin["chunk_size"] == 262144
    assert code_of(store, "put_chunk", upload=up, offset=4, data=b"abcd")[0] is ErrorCode.BAD_STATE
    store.call("store", "put_chunk", upload=up, offset=0, data=b"0123")
    assert store.call("store", "put_chunk", upload=up, offset=0, data=b"0123")["received"] == 4  # a retry
    assert code_of(store, "put_commit", upload=up)[0] is ErrorCode.BAD_STATE
    assert code_of(store, "put_chunk", upload=up, offset=4, data=b"456789xx")[0] is ErrorCode.INVALID_FIELD
    store.call("store", "put_chunk", upload=up, offset=4, data=b"456789")
    assert code_of(store, "put_commit", upload=up, digest="0" * 64)[0] is ErrorCode.CORRUPTED
    assert code_of(store, "put_chunk", upload=up, offset=10, data=b"")[0] is ErrorCode.NOT_FOUND
    begin = store.call("store", "put_begin", key="big/y", size=3, kind="tensors")
    store.call("store", "put_chunk", upload=begin["upload"], offset=0, data=b"abc")
    assert code_of(store, "put_commit", upload=begin["upload"])[0] is ErrorCode.INVALID_FIELD
    up = store.call("store", "put_begin", key="big/z", size=3)["upload"]
    assert store.call("store", "put_abort", upload=up) == {"aborted": True}
    assert code_of(store, "stat", key="big/x")[0] is ErrorCode.NOT_FOUND
    tmp = Path(short_tmp) / "store" / (Path(short_tmp) / "store" / "CURRENT").read_text().strip() / "tmp"
    assert list(tmp.iterdir()) == []

    # An abandoned upload expires (upload_ttl = 1 s in "spare") and its temp file goes.
    with store.events("store.upload_expired") as events:
        up = store.call("spare", "put_begin", key="big/abandoned", size=10)["upload"]
        store.call("spare", "put_chunk", upload=up, offset=0, data=b"01234")
        env = events.next_event(timeout=CEILING)
    assert env is not None and env.message.data == {"upload": up, "key": "big/abandoned", "received": 5, "size": 10}
    with pytest.raises(RemoteError) as err:
        store.call("spare", "put_chunk", upload=up, offset=5, data=b"56789")
    assert err.value.code is ErrorCode.NOT_FOUND and "expired" in err.value.reason
    spare_root = Path(short_tmp) / "spare-root"
    assert list((spare_root / (spare_root / "CURRENT").read_text().strip() / "tmp").iterdir()) == []


def test_snapshot_and_restore_round_trip(store: Client, short_tmp: str) -> None:
    snap = Path(short_tmp) / "backup"
    store.call("store", "put", key="a", data=b"one")
    store.call("store", "put", key="a", data=b"two")
    store.call("store", "put", key="w", tensors={"x": np.arange(5, dtype=np.int32)}, meta={"m": 1})
    manifest = store.call("store", "snapshot", directory=str(snap))
    assert (manifest["keys"], manifest["objects"]) == (2, 3) and (snap / "MANIFEST.json").exists()
    before = store.call("store", "list")
    assert code_of(store, "snapshot", directory=str(snap))[0] is ErrorCode.INVALID_FIELD  # not empty
    assert code_of(store, "snapshot", directory="relative/dir")[0] is ErrorCode.INVALID_FIELD

    store.call("store", "delete", key="a")
    store.call("store", "put", key="new", data=b"after the snapshot")
    store.call("store", "restore", directory=str(snap))
    assert store.call("store", "list") == before
    assert bytes(store.call("store", "get", key="a", version=1)["data"]) == b"one"

    # Into another store with an empty root.
    assert store.call("spare", "list") == []
    store.call("spare", "restore", directory=str(snap))
    assert store.call("spare", "list") == before
    got = store.call("spare", "get", key="w")
    assert got["tensors"]["x"].tolist() == [0, 1, 2, 3, 4] and got["meta"] == {"m": 1}
    assert code_of(store, "restore", directory=str(Path(short_tmp) / "nothing-here"))[0] is ErrorCode.NOT_FOUND


def run_mkctl(client: Client, *argv: str) -> tuple[int, str]:
    """Parse ``mkctl store …`` with the module's own parser and run the handler, capturing stdout."""
    parser = argparse.ArgumentParser(prog="mkctl")
    sub = parser.add_subparsers(dest="command", required=True)
    handlers = cli_store.register(lambda name, help_text, **kw: sub.add_parser(name, help=help_text, **kw))
    args = parser.parse_args(["store", *argv])
    out = io.StringIO()
    with redirect_stdout(out):
        code = handlers[args.command](client, args)
    return code, out.getvalue()


def test_mkctl_store_commands(store: Client, short_tmp: str) -> None:
    src = Path(short_tmp) / "in.bin"
    data = os.urandom(700_000)  # three chunks of 256 KiB
    src.write_bytes(data)
    code, out = run_mkctl(store, "put", "files/in", str(src), "--meta", '{"origin": "test"}')
    assert code == 0 and "stored files/in version 1" in out
    dst = Path(short_tmp) / "out.bin"
    code, out = run_mkctl(store, "get", "files/in", "-o", str(dst))
    assert code == 0 and dst.read_bytes() == data and not dst.with_name("out.bin.part").exists()
    weights = Path(short_tmp) / "w.safetensors"
    weights.write_bytes(safetensors.dumps({"a": np.ones(3, np.float32)}))
    run_mkctl(store, "put", "files/w", str(weights))
    assert store.call("store", "get", key="files/w")["tensors"]["a"].tolist() == [1.0, 1.0, 1.0]
    code, out = run_mkctl(store, "stat", "files/in", "--json")
    assert json.loads(out)["meta"] == {"origin": "test"}
    code, out = run_mkctl(store, "ls", "files/")
    assert out.splitlines()[0].split() == ["KEY", "LATEST", "VERSIONS", "SIZE"] and "files/w" in out
    code, out = run_mkctl(store, "snapshot", str(Path(short_tmp) / "snap"))
    assert "written to" in out
    code, out = run_mkctl(store, "rm", "files/in")
    assert out.strip() == "deleted 1 version of files/in"
    run_mkctl(store, "restore", str(Path(short_tmp) / "snap"))
    assert store.call("store", "stat", key="files/in")["size"] == len(data)
    with pytest.raises(MicrokernelError, match="cannot read"):
        run_mkctl(store, "put", "files/none", str(Path(short_tmp) / "does-not-exist"))
    with pytest.raises(RemoteError) as err:
        run_mkctl(store, "get", "files/none", "-o", str(dst))
    assert err.value.code is ErrorCode.NOT_FOUND and dst.read_bytes() == data


def test_services_move_large_payloads_with_the_async_helpers(store: Client, short_tmp: str) -> None:
    store.wait_ready("user", timeout=CEILING)
    reply = store.call("user", "round_trip_bytes", key="svc/bytes", size=2_500_000, timeout=CEILING)
    assert reply["sent"] == reply["received"] == reply["put"]["digest"] and reply["meta"] == {"by": "store_user"}
    src, dst = Path(short_tmp) / "src.bin", Path(short_tmp) / "dst.bin"
    src.write_bytes(os.urandom(1_500_000))
    store.call("user", "round_trip_file", key="svc/file", source=str(src), target=str(dst), timeout=CEILING)
    assert dst.read_bytes() == src.read_bytes()
    for rows in (10, 2000):  # one message, then chunks (2 MiB of float32)
        reply = store.call("user", "round_trip_tensors", key=f"svc/t{rows}", rows=rows, timeout=CEILING)
        assert reply["same"] and reply["kind"] == "tensors"
