"""services.dataplane with shared memory: on for same-host endpoints only; dropped replies reclaimed."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import numpy as np
import pytest
import zmq

from protocols import handover, messages, shm, wire
from protocols.errors import ErrorCode, ProtocolError
from services.base import Service, rpc
from services.dataplane import DataPlane
from services.handlers import bind_rpc_handlers

pytestmark = [pytest.mark.skipif(not shm.available(), reason="needs /dev/shm"),
              pytest.mark.usefixtures("no_leftover_segments")]

MIB = 1 << 20


class Big(Service):
    @rpc
    def big(self) -> np.ndarray:
        return np.ones(MIB, dtype=np.uint8)

    @rpc
    def size(self, x: Any) -> int:
        return int(memoryview(x).nbytes)


def _serve(endpoint: str, **kw: Any) -> tuple[DataPlane, list[Any]]:
    dp = DataPlane(zmq.Context.instance(), endpoint, bind_rpc_handlers(Big()), service="big", sender="svc:big.0.1",
                   log=logging.getLogger("test"), **kw)
    dp.serve()
    return dp, []


def _request(method: str, **args: Any) -> list[Any]:
    return [b"\x00\x80\x00\x00\x29", *wire.encode(messages.RpcRequest(method=method, args=args), sender="t")]




def test_same_host_replies_hand_over_and_dropped_ones_are_reclaimed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MK_SHM_THRESHOLD", str(MIB))

    async def main() -> None:
        dp, sent = _serve("inproc://shm-dp")
        assert dp.shm_threshold == MIB
        monkeypatch.setattr(dp.socket, "send", lambda frames: sent.append(frames) or True)
        dp._on_message(_request("big"))
        reply = wire.decode(sent.pop()[1:])
        assert reply.message.result.sum() == MIB and not reply.buffers  # no frame: shared memory
        monkeypatch.setattr(dp.socket, "send", lambda frames: sent.append(frames) and False)  # the queue is full
        dp._on_message(_request("big"))
        assert handover.pending() == []  # the dropped reply's hand-over is gone already
        with pytest.raises(ProtocolError) as info:
            wire.decode(sent.pop()[1:])
        assert info.value.code is ErrorCode.NOT_FOUND
        dp.close(linger=0)

    asyncio.run(main())


def test_tcp_endpoints_send_frames_and_refuse_shared_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MK_SHM_THRESHOLD", str(MIB))

    async def main() -> None:
        dp, sent = _serve("tcp://127.0.0.1:*")
        assert dp.shm_threshold is None
        monkeypatch.setattr(dp.socket, "send", lambda frames: sent.append(frames) or True)
        dp._on_message(_request("big"))
        assert len(wire.decode(sent.pop()[1:]).buffers) == 1
        request = [b"\x00\x80\x00\x00\x29", *wire.encode(
            messages.RpcRequest(method="size", args={"x": np.ones(MIB, dtype=np.uint8)}), sender="t", shm_threshold=MIB)]
        names = handover.pending()
        dp._on_message(request)
        error = wire.decode(sent.pop()[1:])
        assert error.is_error and error.message.code == ErrorCode.FORBIDDEN
        assert all(os.path.exists(os.path.join(shm.SHM_DIR, n)) for n in names)  # not claimed
        dp.close(linger=0)

    asyncio.run(main())


def test_shared_memory_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MK_SHM_THRESHOLD", "off")

    async def main() -> None:
        dp, _ = _serve("inproc://shm-off")
        assert dp.shm_threshold is None
        dp.close(linger=0)
        dp2, _ = _serve("inproc://shm-explicit", shm_threshold=4 * MIB)
        assert dp2.shm_threshold == 4 * MIB
        dp2.close(linger=0)

    asyncio.run(main())
