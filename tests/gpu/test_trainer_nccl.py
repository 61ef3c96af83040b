"""The trainer's nccl path on real GPUs: 2 ranks match 1 rank (skipped without 2 CUDA devices)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests.integration.conftest import REPO_ROOT, kernel_env  # noqa: E402
from tests.integration.test_trainer_distributed import GLOBAL_BATCH, OPTIMIZER, STEPS, free_port  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
]


def test_two_nccl_ranks_match_one_rank(short_tmp: str) -> None:
    tmp, port = Path(short_tmp), free_port()
    cmd = [sys.executable, "-m", "services.trainer.standalone", "--steps", str(STEPS), "--batch-size", str(GLOBAL_BATCH),
           "--optimizer", OPTIMIZER]
    procs = []
    for rank in (0, 1):
        env = kernel_env() | {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                              "MASTER_PORT": str(port), "MK_DIST_BACKEND": "nccl"}
        procs.append(subprocess.Popen([*cmd, "--out", str(tmp / f"nccl-{rank}.npz")], cwd=REPO_ROOT, env=env,
                                      stdout=subprocess.PIPE))
    single = subprocess.run([*cmd, "--out", str(tmp / "one.npz")], cwd=REPO_ROOT, env=kernel_env(), check=True,
                            capture_output=True, timeout=300)
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert json.loads(outs[0].decode().splitlines()[-1])["world_size"] == 2
    assert json.loads(single.stdout.decode().splitlines()[-1])["world_size"] == 1
    a, b = np.load(tmp / "one.npz"), np.load(tmp / "nccl-0.npz")
    for name in a.files:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-3, atol=1e-4, err_msg=name)
