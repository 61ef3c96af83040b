"""The README's first command: the end-to-end demo runs through (its short form) and exits cleanly."""

from __future__ import annotations

import subprocess
import sys

from tests.integration.conftest import REPO_ROOT, kernel_env

CEILING_S = 600.0  # a ceiling on a loaded 2-core machine; the demo takes about a minute


def test_the_demo_trains_loads_serves_and_shuts_down() -> None:
    done = subprocess.run([sys.executable, "-m", "microkernel.demo", "--quick"], cwd=REPO_ROOT, env=kernel_env(),
                          capture_output=True, text=True, timeout=CEILING_S)
    out = done.stdout
    assert done.returncode == 0, out[-4000:] + done.stderr[-4000:]
    assert "finished at step 60" in out  # the job ran to its end, fed by train.* events
    assert "requests from 16 concurrent clients" in out
    assert '"mean_batch_size"' in out  # the inferencer's stats were shown
    assert "daemon exited with code 0" in out
