"""mkctl's argument parsing and output formatting, and the client's pure policy (milliseconds)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import numpy as np
import pytest
import uvloop

from protocols import messages, wire
from protocols.endpoints import ENDPOINT_ENV, RUNTIME_DIR_ENV

from microkernel import cli
from microkernel.cli_format import (
    event_line,
    event_record,
    format_duration,
    format_exit,
    list_table,
    lookup_text,
    render_table,
    service_detail,
    status_table,
    to_jsonable,
)
from microkernel.client_base import describe_progress, readiness, resolve_endpoint
from microkernel.client_events import (
    HISTORY_PAGE,
    AsyncEventStream,
    HistoryReplay,
    envelope_from_history,
    event_seq,
)

# --- argument parsing -----------------------------------------------------------------------------


def test_global_options_before_or_after_the_command() -> None:
    before = cli.parse_args(["--json", "--runtime-dir", "/r", "--timeout", "2.5", "status", "echo"])
    after = cli.parse_args(["status", "echo", "--json", "--runtime-dir", "/r", "--timeout", "2.5"])
    for args in (before, after):
        assert (args.command, args.name, args.json, args.runtime_dir, args.timeout) == ("status", "echo", True, "/r", 2.5)


def test_defaults() -> None:
    args = cli.parse_args(["status"])
    assert (args.name, args.json, args.endpoint, args.runtime_dir, args.timeout) == (None, False, None, None, None)
    assert cli.parse_args(["start", "echo"]).wait is True
    assert cli.parse_args(["restart", "echo", "--no-wait"]).wait is False


def test_scale_call_and_events_arguments() -> None:
    scale = cli.parse_args(["scale", "echo", "3", "--no-wait"])
    assert (scale.name, scale.replicas, scale.wait) == ("echo", 3, False)

    call = cli.parse_args(["call", "echo", "echo", '{"text": "hi", "n": [1, 2]}'])
    assert (call.service, call.method, call.args) == ("echo", "echo", {"text": "hi", "n": [1, 2]})
    assert cli.parse_args(["call", "echo", "ping"]).args == {}

    events = cli.parse_args(["events", "service.*", "train.progress", "--since", "12", "-n", "2"])
    assert (events.patterns, events.since, events.count) == (["service.*", "train.progress"], 12, 2)
    plain = cli.parse_args(["events"])
    assert (plain.patterns, plain.since, plain.count) == ([], None, None)


@pytest.mark.parametrize(
    "argv, complaint",
    [
        ([], "COMMAND"),
        (["frobnicate"], "invalid choice"),
        (["scale", "echo", "-1"], "must be >= 0"),
        (["scale", "echo", "many"], "not an integer"),
        (["call", "echo", "echo", "{nope"], "not valid JSON"),
        (["call", "echo", "echo", "[1, 2]"], "must be a JSON object"),
        (["events", "-n", "0"], "must be >= 1"),
        (["--timeout", "0", "ping"], "must be > 0"),
        (["start"], "NAME"),
    ],
)
def test_usage_errors_exit_2(argv: list[str], complaint: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert complaint in err and "Traceback" not in err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "exit codes" in out and "events" in out
    assert cli.main(["call", "--help"]) == 0
    assert '{"$bytes": N}' in capsys.readouterr().out


# --- small formatters ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seconds, text",
    [(None, "-"), (-1, "-"), (0.25, "250ms"), (12.34, "12.3s"), (312, "5m12s"), (7380, "2h03m"), (273600, "3d04h")],
)
def test_format_duration(seconds: float | None, text: str) -> None:
    assert format_duration(seconds) == text


def test_format_exit() -> None:
    assert format_exit(None) == "-"
    assert format_exit({"kind": "exit", "code": 1, "signal": None, "detail": "", "text": "exit(1)"}) == "exit(1)"
    assert format_exit({"kind": "signal", "signal": 9}) == "signal(9)"
    assert format_exit({"kind": "heartbeat"}) == "heartbeat"


def test_render_table_aligns_columns() -> None:
    table = render_table(["NAME", "N"], [["a", 1], ["longer", None]])
    assert table.splitlines() == ["NAME    N", "a       1", "longer  -"]


# --- status / list / lookup ---------------------------------------------------------------------


def _replica(i: int, state: str, pid: int | None, uptime: float | None, last_exit: dict | None = None,
             started: int = 0) -> dict:
    return {"replica": i, "incarnation": 2, "state": state, "pid": pid, "endpoint": f"ipc:///r/svc/echo.{i}.2.sock",
            "started_at_ns": started, "ready_at_ns": started, "restarts": 1, "last_exit": last_exit, "uptime_s": uptime}


SERVICES = [
    {"name": "echo", "state": "ready", "desired_replicas": 2, "ready_replicas": 2, "restarts": 3, "group": None,
     "depends_on": ["store"], "entry": "tests.fixtures.echo:Echo",
     "replicas": [_replica(0, "ready", 101, 75.0, {"kind": "exit", "code": 1, "text": "exit(1)"}, started=5),
                  _replica(1, "ready", 102, 12.5, {"kind": "signal", "signal": 9, "text": "signal(9)"}, started=9)]},
    {"name": "trainer", "state": "stopped", "desired_replicas": 0, "ready_replicas": 0, "restarts": 0,
     "group": None, "depends_on": [], "entry": "services.trainer:Trainer", "replicas": []},
]


def test_status_table() -> None:
    lines = status_table(SERVICES).splitlines()
    assert lines[0].split() == ["NAME", "STATE", "READY", "RESTARTS", "PID(S)", "UPTIME", "LAST-EXIT"]
    # The youngest replica's uptime; the last exit of the replica that (re)started last.
    assert lines[1].split() == ["echo", "ready", "2/2", "3", "101,102", "12.5s", "signal(9)"]
    assert lines[2].split() == ["trainer", "stopped", "0/0", "0", "-", "-", "-"]
    # Columns line up: every row's READY column starts where the header's does.
    column = lines[0].index("READY")
    assert all(line[column - 2:column] == "  " for line in lines)
    assert status_table([]) == "no services configured"


def test_service_detail_has_a_replica_table() -> None:
    text = service_detail(SERVICES[0])
    assert text.startswith("echo: ready  2/2 ready  restarts 3")
    assert "depends on: store" in text
    header, first, second = text.split("\n\n")[1].splitlines()
    assert header.split()[:3] == ["REPLICA", "INCARNATION", "STATE"]
    assert first.split() == ["0", "2", "ready", "101", "1m15s", "1", "exit(1)", "ipc:///r/svc/echo.0.2.sock"]
    assert second.split()[-2] == "signal(9)"
    assert service_detail(SERVICES[1]).endswith("no replicas")


def test_list_and_lookup_text() -> None:
    table = list_table([
        {"name": "echo", "entry": "tests.fixtures.echo:Echo", "command": None, "replicas": 2, "restart": "permanent",
         "group": None, "depends_on": [], "autostart": True},
        {"name": "web", "entry": None, "command": ["python", "-m", "http.server"], "replicas": 1,
         "restart": "transient", "group": "front", "depends_on": ["echo"], "autostart": False},
    ]).splitlines()
    assert table[0].split() == ["NAME", "ENTRY", "REPLICAS", "RESTART", "GROUP", "DEPENDS-ON", "AUTOSTART"]
    assert table[1].split() == ["echo", "tests.fixtures.echo:Echo", "2", "permanent", "-", "-", "yes"]
    assert "python -m http.server" in table[2] and table[2].split()[-1] == "no"
    text = lookup_text({"service": "echo", "endpoints": ["ipc:///a", "ipc:///b"], "methods": ["echo", "add"],
                        "ready": 2, "replicas": 2})
    assert text.splitlines() == ["echo: 2/2 replicas ready", "  methods: echo, add", "  ipc:///a", "  ipc:///b"]


# --- events -------------------------------------------------------------------------------------


def _envelope(message: object, ts_ns: int, topic: str | None = None) -> wire.Envelope:
    frames = wire.encode(message, sender="kernel", topic=topic or wire.msg_type_of(message))
    env = wire.decode(frames, topic=True)
    env.header = env.header._replace(ts_ns=ts_ns)
    return env


def _clock(ts_ns: int) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts_ns // 10**9)) + f".{ts_ns // 10**6 % 1000:03d}"


def test_event_line_for_kernel_events() -> None:
    ts = 1_700_000_000_123_456_789
    ready = messages.ServiceReady(seq=7, service="echo", replica=0, incarnation=1, pid=123, endpoint="ipc:///r/e.sock",
                                  startup_ms=53.125)
    assert event_line(_envelope(ready, ts)) == (
        f"{_clock(ts)} service.ready echo[0] incarnation=1 pid=123 endpoint=ipc:///r/e.sock startup_ms=53.12 seq=7"
    )
    exited = messages.ServiceExited(seq=8, service="echo", replica=1, incarnation=1, pid=124, uptime_s=2.0,
                                    will_restart=True, reason={"kind": "signal", "signal": 9, "text": "signal(9)"})
    assert "echo[1]" in event_line(_envelope(exited, ts)) and "reason=signal(9)" in event_line(_envelope(exited, ts))
    failed = messages.ServiceFailed(seq=9, service="echo", reason="more than 3 restarts in 5s")
    assert event_line(_envelope(failed, ts)).endswith('service.failed echo reason="more than 3 restarts in 5s" seq=9')


def test_event_line_and_record_for_service_events() -> None:
    ts = 1_700_000_000_000_000_000
    env = _envelope(wire.Event("train.progress", {"job": "j1", "step": 10, "loss": 0.5, "blob": b"\x00" * 4}), ts)
    assert event_seq(env) is None
    assert event_line(env) == f"{_clock(ts)} train.progress job=j1 step=10 loss=0.5 blob={{\"$bytes\":4}}"
    record = event_record(env)
    assert record == {"seq": None, "topic": "train.progress", "ts_ns": ts, "sender": "kernel",
                      "data": {"job": "j1", "step": 10, "loss": 0.5, "blob": {"$bytes": 4, "$base64": "AAAAAA=="}}}
    json.dumps(record)  # a valid JSON line


# --- JSON conversion ----------------------------------------------------------------------------


def test_to_jsonable_converts_arrays_and_binaries() -> None:
    value = {
        "matrix": np.arange(4, dtype=np.float32).reshape(2, 2),
        "scalar": np.int64(3),
        "view": memoryview(b"abc"),
        "raw": wire.RawArray("<f4", (2,), memoryview(bytes(8))),
        1: (True, None, float("nan")),
    }
    assert to_jsonable(value) == {
        "matrix": [[0.0, 1.0], [2.0, 3.0]],
        "scalar": 3,
        "view": {"$bytes": 3},
        "raw": {"$array": {"dtype": "<f4", "shape": [2]}, "$bytes": 8},
        "1": [True, None, "nan"],
    }
    assert to_jsonable(b"hi", "base64") == {"$bytes": 2, "$base64": "aGk="}


def test_call_results_through_the_wire_print_as_json() -> None:
    # What `mkctl call` actually receives: decoded frames, with arrays and buffers as views.
    result = {"arr": np.arange(3, dtype=np.int32), "big": bytes(70_000), "small": b"xy"}
    env = wire.decode(wire.encode(messages.RpcReply(result=result), sender="svc"))
    converted = to_jsonable(env.message.result)
    assert converted == {"arr": [0, 1, 2], "big": {"$bytes": 70_000}, "small": {"$bytes": 2}}


# --- client policy ------------------------------------------------------------------------------


def test_resolve_endpoint_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENDPOINT_ENV, raising=False)
    monkeypatch.setenv(RUNTIME_DIR_ENV, "/rt-from-env")
    assert resolve_endpoint() == "ipc:///rt-from-env/control.sock"
    monkeypatch.setenv(ENDPOINT_ENV, "tcp://127.0.0.1:5555")
    assert resolve_endpoint() == "tcp://127.0.0.1:5555"
    assert resolve_endpoint(runtime_dir="/explicit") == "ipc:///explicit/control.sock"
    assert resolve_endpoint("ipc:///given.sock", "/explicit") == "ipc:///given.sock"


def test_readiness_verdicts() -> None:
    assert readiness({"state": "ready", "desired_replicas": 2, "ready_replicas": 2}) == "ready"
    assert readiness({"state": "starting", "desired_replicas": 2, "ready_replicas": 1}) is None
    assert readiness({"state": "stopped", "desired_replicas": 0, "ready_replicas": 0}) is None
    assert readiness({"state": "failed", "desired_replicas": 1, "ready_replicas": 0}) == "failed"
    entry = {"state": "backoff", "desired_replicas": 1, "ready_replicas": 0,
             "replicas": [{"last_exit": {"kind": "exit", "code": 3, "text": "exit(3)"}}]}
    assert describe_progress(entry) == "state backoff, 0/1 replicas ready, last exit exit(3)"


def _history_entry(seq: int, topic: str = "service.stopped", service: str = "echo") -> dict:
    return {"seq": seq, "topic": topic, "ts_ns": 1, "data": {"seq": seq, "service": service}}


def test_history_replay_pages_and_filters() -> None:
    replay = HistoryReplay(5, ["service.stopped"])
    first = replay.request()
    assert (first.since_seq, first.pattern, first.limit) == (5, "service.stopped", HISTORY_PAGE)
    replay.absorb(messages.EventsReply(endpoint="ipc:///e", events=[_history_entry(s) for s in range(5, 5 + HISTORY_PAGE)],
                                       next_seq=2000))
    assert not replay.done and replay.request().since_seq == 5 + HISTORY_PAGE
    replay.absorb(messages.EventsReply(endpoint="ipc:///e", events=[_history_entry(1005)], next_seq=2000))
    assert replay.done and replay.live_from == 2000
    assert [event_seq(e) for e in replay.events] == list(range(5, 1006))

    several = HistoryReplay(0, ["service.ready", "kernel.*"])
    assert several.request().pattern == "*"  # several patterns: filtered here, not by the kernel
    several.absorb(messages.EventsReply(endpoint="ipc:///e", events=[_history_entry(1), _history_entry(2, "kernel.stopping")],
                                        next_seq=3))
    assert several.done and several.live_from == 3
    # service.stopped is filtered out; kernel.stopping lacks its reason, so it stays raw data.
    assert [e.message for e in several.events] == [wire.Event("kernel.stopping", {"seq": 2, "service": "echo"})]


def test_envelope_from_history_looks_like_a_live_event() -> None:
    env = envelope_from_history({"seq": 4, "topic": "service.scaled", "ts_ns": 99,
                                 "data": {"service": "echo", "replicas": 3, "previous": 2}})
    assert env.message == messages.ServiceScaled(seq=4, service="echo", replicas=3, previous=2)
    assert (env.topic, env.header.ts_ns, env.header.sender, event_seq(env)) == ("service.scaled", 99, "history", 4)
    custom = envelope_from_history({"seq": 5, "topic": "train.progress", "ts_ns": 1, "data": {"step": 1}})
    assert custom.message == wire.Event("train.progress", {"step": 1})


class _FakeSubscriber:
    closed = False

    def close(self) -> None:
        self.closed = True


def test_async_stream_replays_then_drops_duplicates_and_ends_on_close() -> None:
    replay = HistoryReplay(1, ["service.*"])
    replay.absorb(messages.EventsReply(endpoint="ipc:///e", events=[_history_entry(1), _history_entry(2)], next_seq=3))
    subscriber = _FakeSubscriber()

    async def main() -> list[int | None]:
        async def opener(on_event):  # noqa: ANN001, ANN202 - the stream's callback
            # Live delivery overlaps the history (seq 2) and goes on (seq 3, a service event).
            on_event(envelope_from_history(_history_entry(2)))
            on_event(envelope_from_history(_history_entry(3)))
            on_event(_envelope(wire.Event("service.custom", {"service": "echo"}), 1))
            return subscriber, replay

        stream = await AsyncEventStream(opener)
        seqs = [event_seq(await stream.next_event(1.0)) for _ in range(4)]
        assert await stream.next_event(0.01) is None  # nothing more: a timeout, not a hang
        stream.close()
        assert [env async for env in stream] == []
        return seqs

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(main()) == [1, 2, 3, None]
    assert subscriber.closed
