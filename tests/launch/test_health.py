"""``omnimoe_train.health``, the node check ``launch/slurm.sbatch`` runs with
``OMNIMOE_HEALTH_CHECK=1`` (on 2 SLURM nodes in ``test_slurm.py``): one process here."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.launch.conftest import REPO, job_env


def _health(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = job_env(tmp_path)
    env.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env.pop("SLURM_GPUS_ON_NODE", None)
    return subprocess.run(
        [sys.executable, "-m", "omnimoe_train.health", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_health_check_passes_on_a_good_node(tmp_path: Path) -> None:
    result = _health(tmp_path)
    assert result.returncode == 0, result.stderr
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert f"health: ok: 1 ranks on 1 node(s), {device}" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_health_check_fails_when_the_gpus_are_missing(tmp_path: Path) -> None:
    result = _health(tmp_path, "--expect-gpus", "8")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert (
        lines[-1].startswith("health: FAILED on ")
        and "0 CUDA device(s) visible, 8 expected" in lines[-1]
    )
    assert "Traceback" not in result.stderr
