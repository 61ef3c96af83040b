"""The daemon as an operator meets it: command line, runtime directory, single instance, signals."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

from microkernel.client import Client
from tests.integration.conftest import REPO_ROOT, kernel_env, start_kernel

CEILING = 30.0


def run_daemon(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "microkernel", *args], cwd=REPO_ROOT, env=kernel_env(),
                          capture_output=True, text=True, timeout=CEILING)


def test_runtime_dir_is_private_and_cleaned_up_on_sigterm(short_tmp: str) -> None:
    with start_kernel('[services.w]\nentry = "tests.fixtures.crashy:Crashy"\n', short_tmp) as k:
        mode = stat.S_IMODE(k.runtime_dir.stat().st_mode)
        assert mode == 0o700
        assert (k.runtime_dir / "control.sock").exists()
        assert int((k.runtime_dir / "kernel.pid").read_text()) == k.proc.pid
        with Client(runtime_dir=k.runtime_dir) as c:
            c.wait_ready("w", timeout=CEILING)
        k.proc.send_signal(signal.SIGTERM)
        assert k.proc.wait(timeout=CEILING) == 0
        left = sorted(p.name for p in k.runtime_dir.iterdir())
        assert "control.sock" not in left and "kernel.pid" not in left
        assert not list((k.runtime_dir / "svc").iterdir())


def test_a_second_daemon_on_the_same_runtime_dir_is_refused(short_tmp: str) -> None:
    with start_kernel("", short_tmp) as k:
        second = run_daemon("--runtime-dir", str(k.runtime_dir))
        assert second.returncode == 1
        assert f"another microkerneld (pid {k.proc.pid}) is running" in second.stderr
        with Client(runtime_dir=k.runtime_dir) as c:  # the first one is unaffected
            assert c.ping()["pid"] == k.proc.pid


def test_invalid_config_is_rejected_with_the_key_and_line(short_tmp: str) -> None:
    config = Path(short_tmp) / "bad.toml"
    config.write_text('[services.echo]\nentry = "tests.fixtures.echo:Echo"\nreplicas = "two"\n')
    result = run_daemon("--config", str(config), "--runtime-dir", str(Path(short_tmp) / "rt"))
    assert result.returncode == 2
    assert "services.echo.replicas" in result.stderr and "bad.toml:3" in result.stderr
    assert not (Path(short_tmp) / "rt" / "control.sock").exists()


def test_check_validates_without_starting(short_tmp: str) -> None:
    config = Path(short_tmp) / "ok.toml"
    config.write_text('[services.echo]\nentry = "tests.fixtures.echo:Echo"\n')
    result = run_daemon("--config", str(config), "--check")
    assert result.returncode == 0 and "ok (1 services)" in result.stdout


def test_runtime_dir_owned_by_group_or_others_is_tightened(short_tmp: str) -> None:
    rt = Path(short_tmp) / "rt"
    rt.mkdir(mode=0o755)
    os.chmod(rt, 0o755)
    with start_kernel("", short_tmp) as k:
        assert stat.S_IMODE(k.runtime_dir.stat().st_mode) == 0o700
