"""The TOML config: a full example, defaults, and every validation error with its key and line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from microkernel.config import ConfigError, KernelConfig, KernelSettings, load_config, parse_config
from microkernel.supervisor.distributed import DistributedSpec, free_port, rank_environment
from microkernel.supervisor.spec import BackoffSpec, GroupSpec, ReadyMode, RestartType, ServiceSpec, Strategy
from protocols.endpoints import default_runtime_dir

FULL_EXAMPLE = """\
[kernel]
runtime_dir = "/run/microkernel"
heartbeat_interval = "1s"      # duration string or number of seconds
heartbeat_liveness = 3
max_message_size = "64MiB"
event_history = 1024
shutdown_timeout = "30s"
log_level = "info"
thread_pool_size = 4

[services.store]
command = ["python", "-m", "http.server"]

[services.loader]
entry = "loader-plugin"
depends_on = ["store"]
restart = "transient"

[services.echo]
entry = "tests.fixtures.echo:Echo"   # or: command = ["python", "-m", "http.server"]
replicas = 2
restart = "permanent"
depends_on = ["store"]
start_timeout = "30s"
stop_timeout = "10s"
env = { FOO = "bar" }
cwd = "/srv"
autostart = true
intensity = 5
period = "60s"
backoff = { initial = "100ms", factor = 2.0, max = "30s", reset_after = "30s" }
ready = "message"
heartbeat = true
python = "/usr/bin/python3"
[services.echo.config]
greeting = "hi"
nested = { depth = [1, 2, 3] }

[groups.pipeline]
strategy = "rest_for_one"
services = ["store", "loader"]
intensity = 10
period = "60s"
"""


def config_error(text: str, *, source: str = "kernel.toml") -> ConfigError:
    """Parse ``text`` (dedented) expecting a ConfigError, and return it."""
    with pytest.raises(ConfigError) as info:
        parse_config(textwrap.dedent(text), source=source)
    return info.value


# --- valid configs -----------------------------------------------------------------------------


def test_full_example_parses_to_the_expected_specs() -> None:
    config = parse_config(FULL_EXAMPLE, source="kernel.toml")

    assert config.source == "kernel.toml"
    assert config.kernel == KernelSettings(
        runtime_dir="/run/microkernel",
        heartbeat_interval=1.0,
        heartbeat_liveness=3,
        max_message_size=64 * 1024 * 1024,
        event_history=1024,
        shutdown_timeout=30.0,
        log_level="info",
        thread_pool_size=4,
    )
    assert list(config.services) == ["store", "loader", "echo"]
    assert config.services["echo"] == ServiceSpec(
        name="echo",
        entry="tests.fixtures.echo:Echo",
        replicas=2,
        restart=RestartType.PERMANENT,
        depends_on=("store",),
        start_timeout=30.0,
        stop_timeout=10.0,
        env={"FOO": "bar"},
        cwd="/srv",
        autostart=True,
        intensity=5,
        period=60.0,
        backoff=BackoffSpec(initial=0.1, factor=2.0, max=30.0, reset_after=30.0),
        ready=ReadyMode.MESSAGE,
        heartbeat=True,
        config={"greeting": "hi", "nested": {"depth": [1, 2, 3]}},
        group=None,
        python="/usr/bin/python3",
    )
    store = config.services["store"]
    assert store.command == ("python", "-m", "http.server")
    assert store.entry is None
    assert store.ready is ReadyMode.SPAWN
    assert store.heartbeat is False
    assert store.group == "pipeline"
    loader = config.services["loader"]
    assert loader.entry == "loader-plugin"
    assert loader.restart is RestartType.TRANSIENT
    assert loader.group == "pipeline"
    assert config.groups == {
        "pipeline": GroupSpec(
            name="pipeline", strategy=Strategy.REST_FOR_ONE, services=("store", "loader"), intensity=10, period=60.0
        )
    }
    assert config.group_of("loader") == config.groups["pipeline"]
    assert config.group_of("echo") is None
    assert config.start_order() == ["store", "loader", "echo"]
    assert config.stop_order() == ["echo", "loader", "store"]


def test_empty_config_gives_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MICROKERNEL_RUNTIME_DIR", "/tmp/mk-test-runtime")
    config = parse_config("")
    assert config == KernelConfig(kernel=KernelSettings(), services={}, groups={}, source="<string>")
    assert config.kernel.runtime_dir == "/tmp/mk-test-runtime"
    assert config.kernel.heartbeat_interval == 1.0
    assert config.kernel.heartbeat_liveness == 3
    assert config.kernel.max_message_size == 64 * 1024 * 1024
    assert config.kernel.event_history == 1024
    assert config.kernel.shutdown_timeout == 30.0
    assert config.kernel.log_level == "info"
    assert config.kernel.thread_pool_size == 4
    assert config.start_order() == []


def test_default_runtime_dir_comes_from_protocols() -> None:
    assert KernelSettings().runtime_dir == str(default_runtime_dir())


def test_empty_services_section_is_allowed() -> None:
    assert parse_config("[services]\n[groups]\n").services == {}


def test_service_defaults_for_entry_and_command() -> None:
    config = parse_config(
        textwrap.dedent(
            """
            [services.a]
            entry = "pkg.mod:Svc"
            [services.b]
            command = ["sleep", "100"]
            """
        )
    )
    a, b = config.services["a"], config.services["b"]
    assert (a.ready, a.heartbeat, b.ready, b.heartbeat) == (ReadyMode.MESSAGE, True, ReadyMode.SPAWN, False)
    for spec in (a, b):
        assert spec.replicas == 1
        assert spec.restart is RestartType.PERMANENT
        assert spec.depends_on == ()
        assert spec.start_timeout == 30.0
        assert spec.stop_timeout == 10.0
        assert spec.env == {}
        assert spec.cwd is None
        assert spec.autostart is True
        assert spec.intensity == 5
        assert spec.period == 60.0
        assert spec.backoff == BackoffSpec()
        assert spec.config == {}
        assert spec.group is None
        assert spec.python is None


def test_numbers_are_seconds_and_bytes_and_overrides_apply() -> None:
    config = parse_config(
        textwrap.dedent(
            """
            [kernel]
            heartbeat_interval = 0.5
            shutdown_timeout = 5
            max_message_size = 1048576
            log_level = "DEBUG"
            [services.w]
            command = ["w"]
            ready = "message"
            heartbeat = true
            replicas = 0
            stop_timeout = 0
            [services.w.backoff]
            initial = 1
            factor = 3
            """
        )
    )
    assert config.kernel.heartbeat_interval == 0.5
    assert config.kernel.shutdown_timeout == 5.0
    assert config.kernel.max_message_size == 1048576
    assert config.kernel.log_level == "debug"
    w = config.services["w"]
    assert (w.ready, w.heartbeat, w.replicas, w.stop_timeout) == (ReadyMode.MESSAGE, True, 0, 0.0)
    assert w.backoff == BackoffSpec(initial=1.0, factor=3.0, max=30.0, reset_after=30.0)


def test_start_order_follows_dependencies_then_config_order() -> None:
    config = parse_config(
        textwrap.dedent(
            """
            [services.web]
            command = ["web"]
            depends_on = ["db", "cache"]
            [services.cache]
            command = ["cache"]
            [services.db]
            command = ["db"]
            depends_on = ["cache"]
            [services.tool]
            command = ["tool"]
            """
        )
    )
    assert config.start_order() == ["cache", "db", "web", "tool"]
    assert config.stop_order() == ["tool", "web", "db", "cache"]


def test_quoted_and_dotted_keys_are_understood() -> None:
    config = parse_config(
        textwrap.dedent(
            """
            services.a.command = ["a"]
            [services."b"]
            "command" = ["b"]
            env.'X_Y' = "1"
            """
        )
    )
    assert config.services["b"].env == {"X_Y": "1"}


def test_load_config_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "kernel.toml"
    path.write_text(FULL_EXAMPLE, encoding="utf-8")
    config = load_config(path)
    assert config.source == str(path)
    assert config.services["echo"].replicas == 2


def test_load_config_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert str(info.value).startswith(f"{missing}: cannot read config file")

    bad = tmp_path / "bad.toml"
    bad.write_text('[services.echo]\nreplicas = "three"\ncommand = ["x"]\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert str(info.value) == f"{bad}:2: services.echo.replicas: expected an integer >= 0, got 'three'"

    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"[kernel]\n\xff\xfe = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(binary)
    assert (info.value.line, info.value.message) == (2, "not valid UTF-8")


# --- errors: the message format ----------------------------------------------------------------


def test_error_format_matches_the_documented_example() -> None:
    error = config_error(
        """\
        [kernel]
        log_level = "info"

        [services.echo]
        entry = "m:C"
        replicas = "three"
        """
    )
    assert str(error) == "kernel.toml:6: services.echo.replicas: expected an integer >= 0, got 'three'"
    assert (error.key, error.line, error.source) == ("services.echo.replicas", 6, "kernel.toml")


def test_toml_syntax_errors_carry_the_line() -> None:
    error = config_error(
        """\
        [kernel]
        log_level = "info"
        thread_pool_size = = 4
        """
    )
    assert error.line == 3
    assert error.key is None
    assert str(error).startswith("kernel.toml:3: invalid TOML: ")
    assert "column" in str(error)


def test_toml_syntax_error_at_end_of_document() -> None:
    error = config_error('[kernel]\nlog_level = "info')
    assert error.line == 2
    assert str(error).startswith("kernel.toml:2: invalid TOML: ")
    assert "end of document" in str(error)


# --- errors: every validation, with key and line ----------------------------------------------

BAD_CONFIGS = [
    pytest.param(
        """\
        [kernal]
        """,
        "kernal",
        1,
        "unknown key kernal (did you mean 'kernel'?)",
        id="unknown-top-level-table",
    ),
    pytest.param(
        """\
        [kernel]
        log_level = "info"
        heartbeat_intervall = "1s"
        """,
        "kernel.heartbeat_intervall",
        3,
        "did you mean 'heartbeat_interval'?",
        id="unknown-kernel-key",
    ),
    pytest.param(
        """\
        [services.echo]
        entry = "m:C"

        replcas = 2
        """,
        "services.echo.replcas",
        4,
        "unknown key services.echo.replcas (did you mean 'replicas'?)",
        id="unknown-service-key",
    ),
    pytest.param(
        """\
        [services.echo]
        entry = "m:C"
        backoff = { initial = "1s", fator = 2 }
        """,
        "services.echo.backoff.fator",
        3,
        "did you mean 'factor'?",
        id="unknown-backoff-key-inline",
    ),
    pytest.param(
        """\
        [services.a]
        command = ["a"]
        [groups.g]
        services = ["a"]
        strategie = "one_for_all"
        """,
        "groups.g.strategie",
        5,
        "did you mean 'strategy'?",
        id="unknown-group-key",
    ),
    pytest.param("kernel = 3\n", "kernel", 1, "expected a table, got 3", id="kernel-not-a-table"),
    pytest.param("services = 3\n", "services", 1, "expected a table", id="services-not-a-table"),
    pytest.param("[services]\necho = 3\n", "services.echo", 2, "expected a table", id="service-not-a-table"),
    pytest.param(
        """\
        [kernel]
        heartbeat_liveness = 0
        """,
        "kernel.heartbeat_liveness",
        2,
        "expected an integer >= 1, got 0",
        id="liveness-zero",
    ),
    pytest.param(
        """\
        [kernel]
        thread_pool_size = 2.5
        """,
        "kernel.thread_pool_size",
        2,
        "expected an integer >= 1, got 2.5",
        id="pool-size-float",
    ),
    pytest.param(
        """\
        [kernel]
        event_history = -1
        """,
        "kernel.event_history",
        2,
        "expected an integer >= 0, got -1",
        id="event-history-negative",
    ),
    pytest.param(
        """\
        [kernel]
        heartbeat_interval = "0s"
        """,
        "kernel.heartbeat_interval",
        2,
        "expected a duration > 0, got '0s'",
        id="heartbeat-interval-zero",
    ),
    pytest.param(
        """\
        [kernel]
        shutdown_timeout = "soon"
        """,
        "kernel.shutdown_timeout",
        2,
        "expected a duration",
        id="bad-duration",
    ),
    pytest.param(
        """\
        [kernel]
        max_message_size = "64mib"
        """,
        "kernel.max_message_size",
        2,
        "did you mean 'MiB'?",
        id="bad-size-unit",
    ),
    pytest.param(
        """\
        [kernel]
        max_message_size = 0
        """,
        "kernel.max_message_size",
        2,
        "expected a size >= 1 bytes",
        id="size-zero",
    ),
    pytest.param(
        """\
        [kernel]
        log_level = "verbose"
        """,
        "kernel.log_level",
        2,
        "expected one of 'debug', 'info', 'warning', 'error', got 'verbose'",
        id="unknown-log-level",
    ),
    pytest.param(
        """\
        [kernel]
        log_level = "warn"
        """,
        "kernel.log_level",
        2,
        "did you mean 'warning'?",
        id="log-level-suggestion",
    ),
    pytest.param(
        """\
        [kernel]
        runtime_dir = ""
        """,
        "kernel.runtime_dir",
        2,
        "expected a non-empty string",
        id="runtime-dir-empty",
    ),
    pytest.param(
        """\
        [services.echo]
        entry = "m:C"
        replicas = -1
        """,
        "services.echo.replicas",
        3,
        "expected an integer >= 0, got -1",
        id="replicas-negative",
    ),
    pytest.param(
        """\
        [services.echo]
        entry = "m:C"
        replicas = true
        """,
        "services.echo.replicas",
        3,
        "expected an integer >= 0, got true",
        id="replicas-bool",
    ),
    pytest.param(
        """\
        [services.echo]
        entry = "m:C"
        intensity = -2
        """,
        "services.echo.intensity",
        3,
        "expected an integer >= 0, got -2",
        id="intensity-negative",
    ),
    pytest.param(
        """\
        [services.echo]
        entry = "m:C"
        period = 0
        """,
        "services.echo.period",
        3,
        "expected a duration > 0",
        id="period-zero",
    ),
    pytest.param(
        """\
        [services.echo]
        entry = "m:C"
        start_timeout = "-1s"
        """,
        "services.echo.start_timeout",
        3,
        "must not be negative",
        id="start-timeout-negative",
    ),
    pytest.param(
        """\
        [services.echo]
        entry = "m:C"
        stop_timeout = []
        """,
        "services.echo.stop_timeout",
        3,
        "expected a duration",
        id="stop-timeout-wrong-type",
    ),
    pytest.param(
        """\
        [services.echo]
        entry = "m:C"
        command = ["x"]
        """,
        "services.echo.command",
        3,
        "entry and command are both set; give exactly one",
        id="entry-and-command",
    ),
    pytest.param(
        """\
        [services.echo]
        replicas = 1
        """,
        "services.echo",
        1,
        "missing entry or command",
        id="neither-entry-nor-command",
    ),
    pytest.param(
        """\
        [services.echo]
        entry = "not a valid entry"
        """,
        "services.echo.entry",
        2,
        "expected 'module:Class' or an entry-point name, got 'not a valid entry'",
        id="entry-format",
    ),
    pytest.param(
        """\
        [services.echo]
        entry = "pkg.mod:"
        """,
        "services.echo.entry",
        2,
        "expected 'module:Class'",
        id="entry-missing-class",
    ),
    pytest.param(
        """\
        [services.echo]
        entry = 3
        """,
        "services.echo.entry",
        2,
        "expected a string, got 3",
        id="entry-not-a-string",
    ),
    pytest.param(
        """\
        [services.echo]
        command = []
        """,
        "services.echo.command",
        2,
        "expected a non-empty array of strings",
        id="command-empty",
    ),
    pytest.param(
        """\
        [services.echo]
        command = ["python", 3]
        """,
        "services.echo.command",
        2,
        "expected an array of strings, got ['python', 3]",
        id="command-non-string",
    ),
    pytest.param(
        """\
        [services.echo]
        command = "python -m http.server"
        """,
        "services.echo.command",
        2,
        "expected an array of strings",
        id="command-is-a-string",
    ),
    pytest.param(
        """\
        [services.echo]
        command = ["", "x"]
        """,
        "services.echo.command",
        2,
        "the program must be non-empty",
        id="command-empty-program",
    ),
    pytest.param(
        """\
        [services.echo]
        command = ["x"]
        python = "/usr/bin/python3"
        """,
        "services.echo.python",
        3,
        "python only applies to entry services",
        id="python-with-command",
    ),
    pytest.param(
        """\
        [services.Echo]
        entry = "m:C"
        """,
        "services.Echo",
        1,
        "invalid service name 'Echo'",
        id="service-name-uppercase",
    ),
    pytest.param(
        """\
        [services."my.svc"]
        entry = "m:C"
        """,
        'services."my.svc"',
        1,
        "invalid service name 'my.svc'",
        id="service-name-dot",
    ),
    pytest.param(
        """\
        [services._x]
        entry = "m:C"
        """,
        "services._x",
        1,
        "starting with a letter or digit",
        id="service-name-leading-underscore",
    ),
    pytest.param(
        f"""\
        [services.{"a" * 64}]
        entry = "m:C"
        """,
        f"services.{'a' * 64}",
        1,
        "use 1-63",
        id="service-name-too-long",
    ),
    pytest.param(
        """\
        [services.echo]
        entry = "m:C"
        restart = "permanant"
        """,
        "services.echo.restart",
        3,
        "expected one of 'permanent', 'transient', 'temporary', got 'permanant' (did you mean 'permanent'?)",
        id="restart-unknown",
    ),
    pytest.param(
        """\
        [services.echo]
        entry = "m:C"
        ready = "timer"
        """,
        "services.echo.ready",
        3,
        "expected one of 'message', 'spawn'",
        id="ready-unknown",
    ),
    pytest.param(
        """\
        [services.echo]
        entry = "m:C"
        autostart = "yes"
        """,
        "services.echo.autostart",
        3,
        "expected true or false, got 'yes'",
        id="autostart-not-bool",
    ),
    pytest.param(
        """\
        [services.echo]
        entry = "m:C"
        heartbeat = 1
        """,
        "services.echo.heartbeat",
        3,
        "expected true or false, got 1",
        id="heartbeat-not-bool",
    ),
    pytest.param(
        """\
        [services.echo]
        entry = "m:C"
        cwd = 7
        """,
        "services.echo.cwd",
        3,
        "expected a non-empty string, got 7",
        id="cwd-not-a-string",
    ),
    pytest.param(
        """\
        [services.echo]
        entry = "m:C"
        env = { FOO = 1 }
        """,
        "services.echo.env.FOO",
        3,
        "expected a string (environment values are strings), got 1",
        id="env-value-not-a-string",
    ),
    pytest.param(
        """\
        [services.echo]
        entry = "m:C"

        [services.echo.env]
        OK = "1"
        PORT = 8080
        """,
        "services.echo.env.PORT",
        6,
        "expected a string",
        id="env-table-value-not-a-string",
    ),
    pytest.param(
        """\
        [services.echo]
        entry = "m:C"
        env = { "A=B" = "x" }
        """,
        'services.echo.env."A=B"',
        3,
        "without '='",
        id="env-name-with-equals",
    ),
    pytest.param(
        """\
        [services.echo]
        entry = "m:C"
        env = "FOO=bar"
        """,
        "services.echo.env",
        3,
        "expected a table, got 'FOO=bar'",
        id="env-not-a-table",
    ),
    pytest.param(
        """\
        [services.echo]
        entry = "m:C"
        config = 3
        """,
        "services.echo.config",
        3,
        "expected a table",
        id="config-not-a-table",
    ),
    pytest.param(
        """\
        [services.echo]
        entry = "m:C"
        [services.echo.config]
        when = 2024-01-01
        """,
        "services.echo.config.when",
        4,
        "dates and times are not supported",
        id="config-datetime",
    ),
    pytest.param(
        """\
        [services.echo]
        entry = "m:C"
        backoff = { factor = 0.5 }
        """,
        "services.echo.backoff.factor",
        3,
        "expected a number >= 1, got 0.5",
        id="backoff-factor-below-one",
    ),
    pytest.param(
        """\
        [services.echo]
        entry = "m:C"
        backoff = { initial = "10s", max = "1s" }
        """,
        "services.echo.backoff.max",
        3,
        "must be >= backoff.initial",
        id="backoff-max-below-initial",
    ),
    pytest.param(
        """\
        [services.echo]
        entry = "m:C"
        [services.echo.backoff]
        reset_after = "forever"
        """,
        "services.echo.backoff.reset_after",
        4,
        "expected a duration",
        id="backoff-table-bad-duration",
    ),
    pytest.param(
        """\
        [services.echo]
        entry = "m:C"
        depends_on = "store"
        """,
        "services.echo.depends_on",
        3,
        "expected an array of strings, got 'store'",
        id="depends-on-not-a-list",
    ),
    pytest.param(
        """\
        [services.store]
        command = ["s"]
        [services.echo]
        entry = "m:C"
        depends_on = ["stor"]
        """,
        "services.echo.depends_on",
        5,
        "unknown service 'stor' (did you mean 'store'?)",
        id="depends-on-unknown",
    ),
    pytest.param(
        """\
        [services.echo]
        entry = "m:C"
        depends_on = ["echo"]
        """,
        "services.echo.depends_on",
        3,
        "a service cannot depend on itself",
        id="depends-on-self",
    ),
    pytest.param(
        """\
        [services.store]
        command = ["s"]
        [services.echo]
        entry = "m:C"
        depends_on = ["store", "store"]
        """,
        "services.echo.depends_on",
        5,
        "'store' is listed twice",
        id="depends-on-duplicate",
    ),
    pytest.param(
        """\
        [services.a]
        command = ["a"]
        depends_on = ["b"]
        [services.b]
        command = ["b"]
        depends_on = ["c"]
        [services.c]
        command = ["c"]
        depends_on = ["a"]
        """,
        "services.a.depends_on",
        3,
        "dependency cycle: a -> b -> c -> a",
        id="dependency-cycle",
    ),
    pytest.param(
        """\
        [services.a]
        command = ["a"]
        [groups.g]
        services = ["a", "ghost"]
        """,
        "groups.g.services",
        4,
        "unknown service 'ghost'",
        id="group-unknown-service",
    ),
    pytest.param(
        """\
        [services.a]
        command = ["a"]
        [groups.g]
        services = []
        """,
        "groups.g.services",
        4,
        "expected a non-empty array of service names",
        id="group-empty",
    ),
    pytest.param(
        """\
        [services.a]
        command = ["a"]
        [groups.g]
        strategy = "one_for_one"
        """,
        "groups.g.services",
        3,
        "expected a non-empty array of service names",
        id="group-without-services",
    ),
    pytest.param(
        """\
        [services.a]
        command = ["a"]
        [services.b]
        command = ["b"]
        [groups.g1]
        services = ["a"]
        [groups.g2]
        services = ["b", "a"]
        """,
        "groups.g2.services",
        8,
        "service 'a' is already in group 'g1'",
        id="service-in-two-groups",
    ),
    pytest.param(
        """\
        [services.a]
        command = ["a"]
        [groups.g]
        services = ["a", "a"]
        """,
        "groups.g.services",
        4,
        "'a' is listed twice",
        id="service-twice-in-a-group",
    ),
    pytest.param(
        """\
        [services.a]
        command = ["a"]
        [groups.g]
        services = ["a"]
        strategy = "one_for_none"
        """,
        "groups.g.strategy",
        5,
        "expected one of 'one_for_one', 'one_for_all', 'rest_for_one'",
        id="group-strategy-unknown",
    ),
    pytest.param(
        """\
        [services.a]
        command = ["a"]
        [groups.g]
        services = ["a"]
        intensity = -1
        """,
        "groups.g.intensity",
        5,
        "expected an integer >= 0, got -1",
        id="group-intensity-negative",
    ),
    pytest.param(
        """\
        [services.a]
        command = ["a"]
        [groups.G]
        services = ["a"]
        """,
        "groups.G",
        3,
        "invalid group name 'G'",
        id="group-name-invalid",
    ),
    pytest.param(
        """\
        [services.store]
        command = ["s"]
        [services.loader]
        command = ["l"]
        depends_on = ["store"]
        [groups.pipeline]
        strategy = "rest_for_one"
        services = ["loader", "store"]
        """,
        "groups.pipeline.services",
        8,
        "'loader' is listed before its dependency 'store'",
        id="rest-for-one-order-against-dependencies",
    ),
    pytest.param(
        """\
        [services.t]
        entry = "m:C"
        distributed = "yes"
        """,
        "services.t.distributed",
        3,
        "expected a table",
        id="distributed-not-a-table",
    ),
    pytest.param(
        """\
        [services.t]
        entry = "m:C"
        distributed = { backend = "tcp" }
        """,
        "services.t.distributed.backend",
        3,
        "expected one of gloo, nccl, mpi",
        id="distributed-backend-unknown",
    ),
    pytest.param(
        """\
        [services.t]
        entry = "m:C"
        distributed = { port = 70000 }
        """,
        "services.t.distributed.port",
        3,
        "expected a TCP port",
        id="distributed-port-out-of-range",
    ),
]


@pytest.mark.parametrize(("text", "key", "line", "fragment"), BAD_CONFIGS)
def test_validation_error_names_key_and_line(text: str, key: str, line: int, fragment: str) -> None:
    error = config_error(text)
    assert error.key == key
    assert error.line == line
    assert error.source == "kernel.toml"
    assert fragment in error.message
    assert str(error) == f"kernel.toml:{line}: {key}: {error.message}"


def test_line_locator_handles_dotted_keys_and_multiline_strings() -> None:
    error = config_error(
        '''\
        [services.echo]
        entry = "m:C"
        config.notes = """
        replicas = 5
        [services.fake]
        """
        replicas = "x"
        '''
    )
    assert (error.key, error.line) == ("services.echo.replicas", 7)


def test_line_locator_ignores_nested_arrays_that_look_like_headers() -> None:
    error = config_error(
        """\
        [services.echo]
        entry = "m:C"
        [services.echo.config]
        matrix = [
          ["a"],
        ]
        [services.other]
        entry = "m:C"
        replicas = -1
        """
    )
    assert (error.key, error.line) == ("services.other.replicas", 9)


def test_line_locator_for_top_level_dotted_keys() -> None:
    error = config_error(
        """\
        services.a.command = ["a"]
        services.a.replicas = "many"
        """
    )
    assert (error.key, error.line) == ("services.a.replicas", 2)


def test_error_without_source_uses_placeholder() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("[kernel]\nlog_level = 3\n")
    assert str(info.value) == "<string>:2: kernel.log_level: expected a string, got 3"


# --- the specs the config produces --------------------------------------------------------------


def test_differs_from_ignores_replicas_only() -> None:
    base = ServiceSpec(name="echo", entry="m:C", env={"A": "1"})
    assert not base.differs_from(ServiceSpec(name="echo", entry="m:C", env={"A": "1"}, replicas=7))
    assert base.differs_from(ServiceSpec(name="echo", entry="m:C", env={"A": "2"}))
    assert base.differs_from(ServiceSpec(name="echo", entry="m:D", env={"A": "1"}))
    assert base.differs_from(ServiceSpec(name="echo", entry="m:C", env={"A": "1"}, backoff=BackoffSpec(max=5.0)))
    assert base.differs_from(ServiceSpec(name="echo", entry="m:C", env={"A": "1"}, config={"x": 1}))


def test_service_spec_copies_mutable_inputs_and_resolves_defaults() -> None:
    env = {"A": "1"}
    spec = ServiceSpec(name="w", command=["sleep", "1"], env=env, ready="message", restart="transient")  # type: ignore[arg-type]
    env["A"] = "2"
    assert spec.env == {"A": "1"}
    assert spec.command == ("sleep", "1")
    assert spec.ready is ReadyMode.MESSAGE
    assert spec.restart is RestartType.TRANSIENT
    assert spec.heartbeat is False


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"entry": "m:C", "command": ("x",)},
        {"command": ()},
        {"entry": "m:C", "replicas": -1},
        {"entry": "m:C", "intensity": -1},
        {"entry": "m:C", "period": 0.0},
        {"entry": "m:C", "start_timeout": 0.0},
    ],
)
def test_service_spec_rejects_invalid_programmatic_construction(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ServiceSpec(name="w", **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs", [{"initial": -1.0}, {"factor": 0.5}, {"initial": 5.0, "max": 1.0}, {"reset_after": -1.0}]
)
def test_backoff_spec_rejects_invalid_values(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        BackoffSpec(**kwargs)


def test_group_spec_normalises_and_validates() -> None:
    group = GroupSpec(name="g", strategy="one_for_all", services=["a", "b"])  # type: ignore[arg-type]
    assert group.strategy is Strategy.ONE_FOR_ALL
    assert group.services == ("a", "b")
    with pytest.raises(ValueError):
        GroupSpec(name="g", intensity=-1)
    with pytest.raises(ValueError):
        GroupSpec(name="g", strategy="one_for_none")  # type: ignore[arg-type]


def test_distributed_is_a_flag_or_a_table() -> None:
    flag = parse_config('[services.t]\nentry = "m:C"\ndistributed = true\n').services["t"]
    assert flag.distributed == DistributedSpec()
    off = parse_config('[services.t]\nentry = "m:C"\ndistributed = false\n').services["t"]
    assert off.distributed is None
    table = parse_config('[services.t]\nentry = "m:C"\n'
                         'distributed = { backend = "nccl", port = 29500, master_addr = "10.0.0.1" }\n').services["t"]
    assert table.distributed == DistributedSpec(backend="nccl", port=29500, master_addr="10.0.0.1")


def test_rank_environment_is_torchs_env_rendezvous() -> None:
    env = rank_environment(DistributedSpec(), rank=1, world_size=2, port=29500)
    assert env["RANK"] == env["MK_RANK"] == env["LOCAL_RANK"] == "1"
    assert env["WORLD_SIZE"] == env["MK_WORLD_SIZE"] == "2"
    assert (env["MASTER_ADDR"], env["MASTER_PORT"], env["MK_DIST_BACKEND"]) == ("127.0.0.1", "29500", "gloo")
    with pytest.raises(ValueError):
        rank_environment(DistributedSpec(), rank=2, world_size=2, port=29500)
    assert 0 < free_port() < 65536
