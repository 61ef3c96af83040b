"""Service log files: rotation, reading the tail backwards, following across rotation, capture."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from microkernel.config import parse_config
from microkernel.config_observability import LogSettings
from microkernel.logs import ServiceLogs
from microkernel.logs.files import LogFile, rotated_path
from microkernel.logs.tail import Cursor, read_after, read_tail


def record(i: int, replica: int = 0, stream: str = "out") -> str:
    return f"2026-11-22T08:00:00.000Z {replica} {stream} line {i:05d}\n"


def write_lines(file: LogFile, numbers: range, replica: int = 0) -> None:
    for i in numbers:
        file.write(record(i, replica), "out")
    file.flush()


def all_lines(path: Path, backups: int) -> list[str]:
    """Every record in the live file and its backups, oldest first."""
    out: list[str] = []
    for index in range(backups, -1, -1):
        p = rotated_path(path, index)
        if p.exists():
            out += p.read_text().splitlines()
    return out


def test_rotation_keeps_backups_and_never_splits_a_record(tmp_path: Path) -> None:
    path = tmp_path / "svc.log"
    f = LogFile(path, max_bytes=1000, backups=2)
    write_lines(f, range(200))
    f.close()
    sizes = [rotated_path(path, i).stat().st_size for i in range(3)]
    assert all(0 < size <= 1000 for size in sizes)
    assert not rotated_path(path, 3).exists()
    kept = all_lines(path, 2)
    # The newest records survive, contiguous and in order.
    numbers = [int(line.rsplit(" ", 1)[1]) for line in kept]
    assert numbers == list(range(numbers[0], 200))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_zero_backups_truncates_instead(tmp_path: Path) -> None:
    path = tmp_path / "svc.log"
    f = LogFile(path, max_bytes=500, backups=0)
    write_lines(f, range(100))
    f.close()
    assert not rotated_path(path, 1).exists()
    assert 0 < path.stat().st_size <= 500


def test_a_reopened_file_is_appended_to(tmp_path: Path) -> None:
    path = tmp_path / "svc.log"
    write_lines(LogFile(path, max_bytes=10**6, backups=1), range(3))
    f = LogFile(path, max_bytes=10**6, backups=1)
    write_lines(f, range(3, 5))
    f.close()
    assert len(path.read_text().splitlines()) == 5


def test_tail_reads_the_last_records_across_backups_and_filters_by_replica(tmp_path: Path) -> None:
    path = tmp_path / "svc.log"
    f = LogFile(path, max_bytes=2000, backups=3)
    for i in range(120):
        f.write(record(i, replica=i % 2), "out")
    f.flush()
    lines, cursor = read_tail(path, backups=3, lines=50)
    assert [int(line.rsplit(" ", 1)[1]) for line in lines] == list(range(70, 120))
    st_ = path.stat()
    assert cursor == Cursor(dev=st_.st_dev, ino=st_.st_ino, offset=st_.st_size)
    odd, _ = read_tail(path, backups=3, lines=5, replica=1)
    assert [int(line.rsplit(" ", 1)[1]) for line in odd] == [111, 113, 115, 117, 119]
    f.close()


def test_tail_of_a_large_file_is_correct_and_skips_a_record_still_being_written(tmp_path: Path) -> None:
    path = tmp_path / "svc.log"
    with open(path, "w") as out:
        for i in range(200_000):  # ~9 MiB: read backwards in blocks, never whole
            out.write(record(i))
        out.write("2026-11-22T08:00:00.000Z 0 out half a rec")
    lines, cursor = read_tail(path, backups=0, lines=3)
    assert [int(line.rsplit(" ", 1)[1]) for line in lines] == [199_997, 199_998, 199_999]
    assert cursor.offset == path.stat().st_size - len("2026-11-22T08:00:00.000Z 0 out half a rec")


def test_tail_of_a_missing_file_is_empty_and_following_starts_when_it_appears(tmp_path: Path) -> None:
    path = tmp_path / "svc.log"
    lines, cursor = read_tail(path, backups=2, lines=10)
    assert lines == [] and cursor == Cursor()
    write_lines(LogFile(path, max_bytes=10**6, backups=2), range(2))
    lines, _ = read_after(path, cursor, backups=2)
    assert len(lines) == 2


def test_following_across_rotations_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "svc.log"
    f = LogFile(path, max_bytes=1500, backups=5)
    write_lines(f, range(10))
    _, cursor = read_tail(path, backups=5, lines=0)
    seen: list[int] = []
    n = 10
    for _ in range(6):
        write_lines(f, range(n, n + 45))  # ~1.5 rotations per step
        n += 45
        lines, cursor = read_after(path, cursor, backups=5, max_bytes=4000)
        while lines:
            seen += [int(line.rsplit(" ", 1)[1]) for line in lines]
            lines, cursor = read_after(path, cursor, backups=5, max_bytes=4000)
    assert seen == list(range(10, n))
    f.close()


def test_a_cursor_whose_file_is_gone_restarts_at_the_live_file(tmp_path: Path) -> None:
    path = tmp_path / "svc.log"
    write_lines(LogFile(path, max_bytes=10**6, backups=1), range(4))
    lines, _ = read_after(path, Cursor(dev=1, ino=999_999_999, offset=10), backups=1)
    assert len(lines) == 4


@pytest.mark.parametrize("bad", [None, [], {"dev": 1}, {"dev": 1, "ino": -1, "offset": 0}, {"dev": True, "ino": 1, "offset": 0}])
def test_malformed_cursors_are_refused(bad: object) -> None:
    if bad is None:
        assert Cursor.from_wire({"dev": 1, "ino": 2, "offset": 3}) == Cursor(dev=1, ino=2, offset=3)
        return
    with pytest.raises(ValueError, match="cursor"):
        Cursor.from_wire(bad)


def test_capture_writes_both_streams_partial_lines_and_switches_destination(tmp_path: Path) -> None:
    async def scenario() -> list[str]:
        logs = ServiceLogs(LogSettings(dir=str(tmp_path / "logs")), runtime_dir=tmp_path)
        cap = logs.open()  # unassigned, like a warm standby
        out, err = os.dup(cap.stdout), os.dup(cap.stderr)  # stand-ins for the child's fds 1 and 2
        logs.adopt(4242, cap)
        os.write(out, b"before assignment\n")
        cap._on_readable("out")  # what the loop would call: read it while no destination is known
        assert not (tmp_path / "logs" / "svc.log").exists()
        logs.assign(4242, "svc", 3)
        written = asyncio.ensure_future(logs.wait_written("svc", 10.0))
        os.write(err, b"to stderr\r\nbinary \xff\n")
        assert await written
        os.write(out, b"last words without newline")
        os.close(out)
        os.close(err)
        logs.release(4242)
        logs.close()
        return (tmp_path / "logs" / "svc.log").read_text().splitlines()

    lines = asyncio.run(scenario())
    fields = [line.split(" ", 3)[1:] for line in lines]
    assert ["3", "out", "before assignment"] in fields
    assert ["3", "err", "to stderr"] in fields
    assert ["3", "err", "binary \ufffd"] in fields
    assert fields[-1] == ["3", "out", "last words without newline"]
    assert stat.S_IMODE((tmp_path / "logs").stat().st_mode) == 0o700


def test_logs_and_metrics_config_defaults_and_errors() -> None:
    config = parse_config("")
    assert config.logs == LogSettings() and config.logs.max_bytes == 10 * 1024 * 1024 and config.logs.backups == 5
    assert not config.metrics.enabled and (config.metrics.address, config.metrics.port) == ("127.0.0.1", 9464)
    custom = parse_config('[logs]\ndir = "/var/log/mk"\nmax_bytes = "1MiB"\nbackups = 0\n'
                          '[metrics]\nenabled = true\naddress = "0.0.0.0"\nport = 9100\n')
    assert custom.logs.directory("/run/x") == Path("/var/log/mk") and custom.logs.max_bytes == 1 << 20
    assert LogSettings().directory("/run/x") == Path("/run/x/logs")
    assert custom.metrics.enabled and not custom.metrics.loopback
    for text, key in [('[logs]\nmax_bytes = "tiny"', "logs.max_bytes"), ("[logs]\nbackups = -1", "logs.backups"),
                      ('[logs]\ndir = "relative"', "logs.dir"), ("[logs]\nrotate = 1", "logs.rotate"),
                      ("[metrics]\nport = 70000", "metrics.port"), ('[metrics]\naddress = "my host"', "metrics.address"),
                      ('[metrics]\nenabled = "yes"', "metrics.enabled")]:
        with pytest.raises(Exception) as info:
            parse_config(text)
        assert key in str(info.value), (text, str(info.value))


def test_a_removed_service_s_file_is_closed_and_a_new_one_of_that_name_appends(tmp_path: Path) -> None:
    logs = ServiceLogs(LogSettings(dir=str(tmp_path / "logs")), runtime_dir=tmp_path)
    old = logs.file("web")
    write_lines(old, range(3))
    logs.forget("web")
    assert "web" not in logs.files and old._file is None  # the descriptor went back
    write_lines(logs.file("web"), range(3, 5))
    assert all_lines(logs.path_of("web"), 0) == [record(i).rstrip("\n") for i in range(5)]
    logs.forget("never-had-a-file")  # nothing to do, no error
    logs.close()
