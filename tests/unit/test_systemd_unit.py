"""docs/systemd/microkerneld.service: the keys the daemon's contract with systemd relies on."""

from __future__ import annotations

import configparser
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from microkernel.config import KernelSettings

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "docs" / "systemd" / "microkerneld.service"


def unit() -> configparser.ConfigParser:
    # systemd unit files are INI-like: keys are case-sensitive, '%' and '$' are no interpolation.
    parser = configparser.ConfigParser(interpolation=None, strict=False, comment_prefixes=("#", ";"),
                                       empty_lines_in_values=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def seconds(value: str) -> float:
    """A systemd time span such as ``45s``, ``10min`` or ``1min 30s``."""
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
    total = 0.0
    for number, unit_name in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit_name]
    return total


def test_service_type_reload_watchdog_and_stop() -> None:
    service = unit()["Service"]
    assert service["Type"] in ("notify", "notify-reload")
    if service["Type"] == "notify":
        assert shlex.split(service["ExecReload"])[-2:] == ["-HUP", "$MAINPID"]
    assert seconds(service["WatchdogSec"]) > 0
    assert service["KillMode"] == "mixed"
    # The daemon needs its whole shutdown_timeout before systemd's SIGKILL.
    assert seconds(service["TimeoutStopSec"]) > KernelSettings().shutdown_timeout
    assert service["Delegate"] == "yes"
    assert service.get("NotifyAccess", "main") == "main"


def test_runtime_directory_user_and_hardening() -> None:
    service = unit()["Service"]
    assert service["RuntimeDirectory"] == "microkernel" and service["RuntimeDirectoryMode"] == "0700"
    assert service["User"] not in ("", "root", "0")
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert "/var/lib/microkernel" in service["ReadWritePaths"].split()
    assert service["ProtectHome"] == "yes" and service["PrivateTmp"] == "yes"
    # These would break GPU device access, /dev/shm tensors, JIT compilers or the delegated cgroup.
    for key in ("PrivateDevices", "DevicePolicy", "DeviceAllow", "ProtectClock", "MemoryDenyWriteExecute",
                "ProtectControlGroups", "PrivateIPC"):
        assert service.get(key, "no") == "no", f"{key} must stay off"
    assert unit()["Install"]["WantedBy"] == "multi-user.target"


def test_exec_start_flags_exist_in_microkerneld_help() -> None:
    argv = shlex.split(unit()["Service"]["ExecStart"])
    assert Path(argv[0]).name == "microkerneld"
    assert argv[1:] == ["--config", "/etc/microkernel/microkernel.toml"]
    result = subprocess.run([sys.executable, "-m", "microkernel", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, check=True)
    for flag in (arg for arg in argv[1:] if arg.startswith("-")):
        assert re.search(rf"(^|\s|,){re.escape(flag)}(\s|,|=|$)", result.stdout, re.M), f"{flag} not in --help"


@pytest.mark.parametrize("key", ["ExecStart", "ExecReload", "Type", "WatchdogSec", "KillMode", "TimeoutStopSec"])
def test_no_key_is_given_twice(key: str) -> None:
    # configparser(strict=False) keeps the last value; systemd would too for these, silently.
    lines = [line for line in UNIT.read_text().splitlines() if line.startswith(f"{key}=")]
    assert len(lines) == 1
