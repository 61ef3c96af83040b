"""Roles, the requirement table, key files, the [security] table and the per-request decision."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest
import zmq.auth

from protocols import messages as m
from protocols import wire
from protocols.credentials import with_token
from protocols.registry import registered_types
from microkernel.client_base import events_address, no_reply
from microkernel.config import ConfigError, parse_config
from microkernel.handlers import all_handlers
from microkernel.security import audit
from microkernel.security.entries import EntryCatalog
from microkernel.security.guard import Guard
from microkernel.security.keys import KeyFileError, client_keys, load_authorized, load_secret, write_key_pair
from microkernel.security.roles import REQUIREMENTS, SERVICE, Role, requirement
from microkernel.security.settings import SecuritySettings
from microkernel.security.tokens import is_replica, replica_token


# --- the requirement table ---------------------------------------------------------------------


def test_every_request_the_kernel_handles_has_a_requirement() -> None:
    handled = {_msg_type(cls) for cls in all_handlers()}
    missing = sorted(handled - set(REQUIREMENTS))
    assert not missing, f"add these to microkernel/security/roles.py REQUIREMENTS: {missing}"


def _msg_type(cls: type) -> str:
    return next(name for name, registered in registered_types().items() if registered is cls)


def test_the_table_names_only_registered_messages() -> None:
    assert set(REQUIREMENTS) <= set(registered_types())


def test_roles_include_the_weaker_ones() -> None:
    assert Role.ADMIN.allows(Role.OPERATOR) and Role.ADMIN.allows(Role.READER)
    assert Role.OPERATOR.allows(Role.READER) and not Role.OPERATOR.allows(Role.ADMIN)
    assert not Role.READER.allows(Role.OPERATOR)


def test_issue_roles() -> None:
    needs = {name: req.needs for name, req in REQUIREMENTS.items()}
    for name in ("status_request", "list_request", "events_request", "logs_request", "lookup_request", "ping_request"):
        assert needs[name] is Role.READER
    for name in ("start_request", "stop_request", "restart_request", "scale_request", "reload_request"):
        assert needs[name] is Role.OPERATOR
    assert needs["shutdown_request"] is Role.ADMIN
    for name in ("ready_request", "heartbeat", "progress_request"):
        assert needs[name] == SERVICE
    assert requirement("never_heard_of_request").needs is Role.ADMIN  # fail closed


# --- key files -----------------------------------------------------------------------------------


def test_keygen_writes_files_zmq_auth_reads(tmp_path: Path) -> None:
    public_path, secret_path = write_key_pair(tmp_path, "alice")
    assert (public_path.name, secret_path.name) == ("alice.key", "alice.key_secret")
    assert stat.S_IMODE(secret_path.stat().st_mode) == 0o600
    public, secret = zmq.auth.load_certificate(secret_path)
    assert secret is not None and len(secret) == 40
    assert zmq.auth.load_certificate(public_path) == (public, None)
    assert zmq.auth.load_certificates(tmp_path) == {public: True}
    assert load_authorized(tmp_path) == ({public: "alice"}, [])
    with pytest.raises(KeyFileError, match="already exists"):
        write_key_pair(tmp_path, "alice")


def test_a_secret_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    _, secret_path = write_key_pair(tmp_path, "server")
    os.chmod(secret_path, 0o640)
    with pytest.raises(KeyFileError, match="must be 0600"):
        load_secret(secret_path)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give a file away")
def test_a_secret_key_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    _, secret_path = write_key_pair(tmp_path, "server")
    os.chown(secret_path, 65534, 65534)
    with pytest.raises(KeyFileError, match="belongs to uid 65534"):
        load_secret(secret_path)


def test_client_keys_come_from_arguments_or_the_environment(tmp_path: Path) -> None:
    write_key_pair(tmp_path, "alice")
    write_key_pair(tmp_path, "server")
    env = {"MICROKERNEL_CLIENT_KEY": str(tmp_path / "alice.key_secret"), "MICROKERNEL_SERVER_KEY": str(tmp_path / "server.key")}
    keys = client_keys(environ=env)
    assert keys is not None and keys.server == zmq.auth.load_certificate(tmp_path / "server.key")[0]
    assert client_keys(environ={}) is None
    with pytest.raises(KeyFileError, match="MICROKERNEL_SERVER_KEY"):
        client_keys(client_key=tmp_path / "alice.key_secret", environ={})


# --- the [security] table --------------------------------------------------------------------------


def _secure_config(tmp_path: Path, extra: str = "") -> str:
    write_key_pair(tmp_path, "server")
    (tmp_path / "auth").mkdir(exist_ok=True)
    return (f'[security]\ncontrol_tcp = "tcp://127.0.0.1:7071"\nserver_secret_key = "{tmp_path}/server.key_secret"\n'
            f'authorized_keys = "{tmp_path}/auth"\n{extra}')


def test_tcp_without_curve_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config('[security]\ncontrol_tcp = "tcp://0.0.0.0:7071"\n')
    assert err.value.key == "security.control_tcp" and "CURVE" in err.value.message
    with pytest.raises(ConfigError) as err:
        parse_config('[security]\nevents_tcp = "tcp://0.0.0.0:7072"\nserver_secret_key = "/nonexistent"\n')
    assert err.value.key == "security.events_tcp" and "authorized_keys" in err.value.message


def test_a_valid_secure_config(tmp_path: Path) -> None:
    config = parse_config(_secure_config(tmp_path, 'roles = { alice = "operator" }\nipc_role = "reader"\n'))
    sec = config.security
    assert sec.curve and sec.tcp and sec.role_of("alice") is Role.OPERATOR and sec.role_of("bob") is Role.READER
    assert sec.ipc_role is Role.READER
    assert parse_config("").security.ipc_role is Role.ADMIN


def test_a_key_file_with_bad_permissions_is_refused(tmp_path: Path) -> None:
    text = _secure_config(tmp_path)
    os.chmod(tmp_path / "server.key_secret", 0o644)
    with pytest.raises(ConfigError) as err:
        parse_config(text)
    assert err.value.key == "security.server_secret_key" and "0600" in err.value.message


def test_an_unknown_role_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(_secure_config(tmp_path, 'roles = { alice = "oprator" }\n'))
    assert err.value.key == "security.roles.alice" and "did you mean 'operator'" in err.value.message
    with pytest.raises(ConfigError) as err:
        parse_config('[security]\nipc_role = "root"\n')
    assert err.value.key == "security.ipc_role"


def test_a_malformed_endpoint_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(_secure_config(tmp_path).replace("tcp://127.0.0.1:7071", "ipc:///tmp/x"))
    assert err.value.key == "security.control_tcp"


# --- replica tokens --------------------------------------------------------------------------------


def test_replica_tokens_prove_the_identity() -> None:
    token = replica_token("echo", 0, 3)
    assert is_replica(b"svc:echo.0.3", with_token("svc:echo.0.3", token))
    assert not is_replica(b"svc:echo.0.4", with_token("svc:echo.0.4", token))  # another replica's token
    assert not is_replica(b"svc:echo.0.3", "svc:echo.0.3")  # no token
    assert not is_replica(b"mkctl", with_token("mkctl", token))


# --- the per-request decision ----------------------------------------------------------------------


class _Socket:
    def __init__(self, peer: str = "") -> None:
        self.peer = peer


def _env(message: object, *, sender: str = "mkctl", identity: bytes = b"\x00\x01") -> wire.Envelope:
    header = wire.Header(msg_id=b"1", msg_type=wire.msg_type_of(message), version=(1, 3), sender=sender, ts_ns=0)
    return wire.Envelope(routing=[identity], header=header, message=message, buffers=[])


def _guard(remote: bool, **settings: object) -> Guard:
    return Guard(SecuritySettings(**settings), remote=remote, catalog=EntryCatalog(),  # type: ignore[arg-type]
                 configured_entries=lambda: ["tests.fixtures.echo:Echo"])


@pytest.fixture
def audit_lines(caplog: pytest.LogCaptureFixture) -> list[dict]:
    caplog.set_level(logging.INFO, logger="microkernel.audit")
    lines: list[dict] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            parsed = audit.parse_line(record.getMessage())
            if parsed is not None:
                lines.append(parsed)

    handler = Collect()
    audit.audit_log.addHandler(handler)
    yield lines
    audit.audit_log.removeHandler(handler)


def test_tcp_keys_get_their_roles_rights(audit_lines: list[dict]) -> None:
    guard = _guard(True, roles={"alice": Role.OPERATOR, "root": Role.ADMIN})
    ci, alice, root = _Socket("ci"), _Socket("alice"), _Socket("root")
    assert guard.check(_env(m.StatusRequest()), ci) is None
    assert guard.check(_env(m.StopRequest(service="echo")), ci) == "role reader may not stop services; needs operator"
    assert guard.check(_env(m.StopRequest(service="echo")), alice) is None
    assert guard.check(_env(m.ShutdownRequest()), alice) == "role operator may not shut the kernel down; needs admin"
    assert guard.check(_env(m.ShutdownRequest()), root) is None
    decisions = [(line["peer"], line["msg_type"], line["decision"]) for line in audit_lines]
    assert decisions == [
        ("tcp:ci", "stop_request", "denied"),
        ("tcp:alice", "stop_request", "allowed"),
        ("tcp:alice", "shutdown_request", "denied"),
        ("tcp:root", "shutdown_request", "allowed"),
    ]
    assert audit_lines[0]["service"] == "echo" and audit_lines[0]["role"] == "reader" and audit_lines[0]["time"]


def test_a_tcp_client_can_never_pose_as_a_replica() -> None:
    guard = _guard(True, default_role=Role.ADMIN)
    ready = m.ReadyRequest(service="echo", replica=0, incarnation=1, endpoint="ipc:///x", methods=[], pid=1)
    sender = with_token("svc:echo.0.1", replica_token("echo", 0, 1))
    reason = guard.check(_env(ready, sender=sender, identity=b"svc:echo.0.1"), _Socket("root"))
    assert reason is not None and "only the kernel's own service replicas" in reason


def test_replicas_keep_working_when_ipc_clients_are_readers() -> None:
    guard = _guard(False, ipc_role=Role.READER)
    ready = m.ReadyRequest(service="echo", replica=0, incarnation=1, endpoint="ipc:///x", methods=[], pid=1)
    sender = with_token("svc:echo.0.1", replica_token("echo", 0, 1))
    assert guard.check(_env(ready, sender=sender, identity=b"svc:echo.0.1"), _Socket()) is None
    assert guard.check(_env(m.LeaseAcquireRequest(), sender=sender, identity=b"svc:echo.0.1"), _Socket()) is None
    # the same messages from a reader client (or a forged identity without the token) are refused
    assert guard.check(_env(ready, sender="svc:echo.0.1", identity=b"svc:echo.0.1"), _Socket()) is not None
    assert guard.check(_env(m.LeaseAcquireRequest()), _Socket()) is not None
    # a replica is not an operator: it may not stop services
    assert guard.check(_env(m.StopRequest(service="echo"), sender=sender, identity=b"svc:echo.0.1"), _Socket()) is not None


def test_ipc_clients_are_admin_by_default() -> None:
    guard = _guard(False)
    assert guard.check(_env(m.ShutdownRequest()), _Socket()) is None
    heartbeat = m.Heartbeat(service="echo", replica=0, incarnation=1)
    assert guard.check(_env(heartbeat, sender="svc:echo.0.1", identity=b"svc:echo.0.1"), _Socket()) is None


@pytest.mark.parametrize(
    ("request_fields", "needs"),
    [
        ({"entry": "tests.fixtures.echo:Echo"}, None),  # configured for a service
        ({"entry": "greeter"}, None),  # an installed entry point (by name)
        ({"entry": "services.examples.greeter:Greeter"}, None),  # ... or by target
        ({"entry": "os:system"}, "admin"),  # arbitrary code
        ({"command": ["sh", "-c", "id"]}, "admin"),
        ({"entry": "greeter", "options": {"env": {"LD_PRELOAD": "/tmp/x.so"}}}, "admin"),
        ({"entry": "greeter", "options": {"python": "/tmp/evil"}}, "admin"),
        ({"entry": "greeter", "options": {"cwd": "/tmp"}}, "admin"),
    ],
)
def test_only_admins_may_make_the_kernel_run_code_of_their_choosing(request_fields: dict, needs: str | None) -> None:
    request = m.AddServiceRequest(name="x", **request_fields)
    operator = _guard(False, ipc_role=Role.OPERATOR).check(_env(request), _Socket())
    admin = _guard(False, ipc_role=Role.ADMIN).check(_env(request), _Socket())
    assert admin is None
    if needs is None:
        assert operator is None
    else:
        assert operator is not None and operator.endswith("needs admin")


def test_audit_lines_are_one_json_object(audit_lines: list[dict]) -> None:
    fields = audit.record(peer="tcp:ci", role="reader", msg_type="stop_request", service="echo", decision="denied",
                          reason="role reader may not stop services; needs operator")
    assert audit_lines == [json.loads(json.dumps(fields))]


# --- the client side ---------------------------------------------------------------------------------


def test_a_tcp_client_without_reply_is_told_about_keys() -> None:
    assert "is your key authorized" in no_reply("tcp://10.0.0.1:7071", 5).reason
    assert "is your key" not in no_reply("ipc:///run/mk/control.sock", 5).reason


def test_a_wildcard_event_host_becomes_the_control_host() -> None:
    assert events_address("tcp://0.0.0.0:7072", "tcp://gpu-box:7071") == "tcp://gpu-box:7072"
    assert events_address("tcp://10.1.1.1:7072", "tcp://gpu-box:7071") == "tcp://10.1.1.1:7072"
    assert events_address("ipc:///x/events.sock", "ipc:///x/control.sock") == "ipc:///x/events.sock"


def test_mkctl_keygen_needs_no_kernel(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from microkernel import cli

    assert cli.main(["--endpoint", "tcp://127.0.0.1:9", "keygen", "--dir", str(tmp_path), "--name", "ci"]) == 0
    public, secret = zmq.auth.load_certificate(tmp_path / "ci.key_secret")
    assert secret is not None and zmq.auth.load_certificate(tmp_path / "ci.key")[0] == public
    assert "ci.key_secret" in capsys.readouterr().out
    assert cli.main(["keygen", "--dir", str(tmp_path), "--name", "ci"]) == 1  # never overwrites silently
