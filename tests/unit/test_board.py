"""The heartbeat board: a kernel-created file that replicas attach to and beat into."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from protocols.board import BoardError, HeartbeatBoard


def test_beats_written_by_another_process_are_read_by_the_creator(tmp_path) -> None:
    board = HeartbeatBoard.create(tmp_path / "hb", slots=8)
    board.claim(5, owner=3)
    assert board.last_beat(5) == 0 and board.owner(5) == 3
    before = time.monotonic_ns()
    code = f"from protocols.board import HeartbeatBoard; HeartbeatBoard.attach({str(tmp_path / 'hb')!r}).beat(5)"
    subprocess.run([sys.executable, "-c", code], check=True)
    beat = board.last_beat(5)
    assert before < beat <= time.monotonic_ns()  # CLOCK_MONOTONIC is shared by every process
    assert all(board.last_beat(s) == 0 for s in range(8) if s != 5)
    board.release(5)
    assert board.last_beat(5) == 0 and board.owner(5) == 0
    assert oct(os.stat(tmp_path / "hb").st_mode & 0o777) == "0o600"


def test_claim_resets_a_previous_owners_beat(tmp_path) -> None:
    board = HeartbeatBoard.create(tmp_path / "hb", slots=2)
    board.beat(1, now_ns=123)
    board.claim(1, owner=9)
    assert board.last_beat(1) == 0


@pytest.mark.parametrize("content", [b"", b"garbage" * 20, b"MKHB\x00\x00\x01\x00" + b"\xff\xff\x00\x00" + b"\x00" * 52])
def test_attaching_to_something_else_fails_clearly(tmp_path, content: bytes) -> None:
    (tmp_path / "hb").write_bytes(content)
    with pytest.raises(BoardError):
        HeartbeatBoard.attach(tmp_path / "hb")


def test_missing_board_and_bad_slots(tmp_path) -> None:
    with pytest.raises(BoardError):
        HeartbeatBoard.attach(tmp_path / "nope")
    board = HeartbeatBoard.create(tmp_path / "hb", slots=2)
    with pytest.raises(BoardError):
        board.beat(2)
    with pytest.raises(BoardError):
        board.last_beat(-1)
