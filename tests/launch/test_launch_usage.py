"""Usage errors at the launchers: ``launch/torchrun.sh`` given a bad NPROC, and
``launch/slurm.sbatch`` given a bad config, print one line, exit 2, and make nothing that looks
like a started run. The SLURM script runs here with stand-ins for ``scontrol`` and ``srun`` (it
needs no cluster to refuse a config); the real-cluster tests are in ``test_slurm.py``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch.conftest import REPO, job_env

USAGE = "usage: launch/torchrun.sh NPROC [omnimoe-train overrides...]"


@pytest.mark.parametrize("nproc", [None, "abc", "0", "-1", "model=a80m"])
def test_torchrun_sh_bad_nproc_is_one_line(nproc: str | None, tmp_path: Path) -> None:
    """Was bash's ``line 17: 1: usage: ...`` (exit 1) with no argument, else a torch traceback
    (exit 1) after the script had printed an output dir."""
    args = ["bash", str(REPO / "launch" / "torchrun.sh")]
    args += [] if nproc is None else [nproc, "trainer.max_steps=1"]
    result = subprocess.run(
        args, cwd=tmp_path, env=job_env(tmp_path), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "launch/torchrun.sh: error: NPROC: must be the number of ranks, a positive integer (or "
        f"auto, gpu, cpu) (got '{nproc or ''}'); {USAGE}"
    ]
    assert result.stdout == "" and not any(tmp_path.iterdir())


def test_nproc_gpu_without_a_gpu_is_one_line(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: --nproc-per-node gpu is valid here")
    result = subprocess.run(
        [sys.executable, "-m", "omnimoe_train.torchrun", "--standalone", "--nproc-per-node",
         "gpu", "-m", "omnimoe_train.cli"],
        cwd=tmp_path, env=job_env(tmp_path), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "omnimoe torchrun: error: --nproc-per-node: Cuda is not available."
    ]


@pytest.fixture
def fake_slurm(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """The environment of a 2-node batch job whose ``scontrol`` and ``srun`` only record how
    they were called (in the returned log file)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for name, body in {
        "scontrol": 'case "$1 $2" in "show hostnames") echo node-a; echo node-b ;; esac',
        "srun": "",
    }.items():
        script = bin_dir / name
        script.write_text(f'#!/bin/bash\necho "{name} $*" >> "{log}"\n{body}\n')
        script.chmod(0o755)
    env = {k: v for k, v in job_env(tmp_path).items() if not k.startswith("SLURM")}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
        SLURM_JOB_ID="41",
        SLURM_JOB_NAME="omnimoe",
        SLURM_SUBMIT_DIR=str(tmp_path / "submit"),
        SLURM_JOB_NUM_NODES="2",
        SLURM_JOB_NODELIST="node-[a-b]",
        OMNIMOE_NPROC_PER_NODE="1",
        OMNIMOE_REPO=str(REPO),
        OMNIMOE_PYTHON=sys.executable,
    )
    env.pop("OMNIMOE_RUN_DIR", None)
    (tmp_path / "submit").mkdir()
    return env, log


def _sbatch(env: dict[str, str], *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(REPO / "launch" / "slurm.sbatch"), *overrides],
        cwd=env["SLURM_SUBMIT_DIR"], env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_sbatch_bad_config_is_one_line_before_the_run_dir(
    fake_slurm: tuple[dict[str, str], Path],
) -> None:
    """Was: the job's header line, the run directory made, every node's launcher printing the
    error, then "training exited with status 2"."""
    env, log = fake_slurm
    result = _sbatch(env, "model.num_experts=1000")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "omnimoe-train: error: model.num_experts: must be a perfect square n*n for the "
        "Cartesian router (got 1000)"
    ]
    assert not any(Path(env["SLURM_SUBMIT_DIR"]).iterdir())  # no outputs/slurm/omnimoe-41
    assert not log.exists() or "srun" not in log.read_text()  # no node started


def test_sbatch_checks_the_config_for_the_whole_world(
    fake_slurm: tuple[dict[str, str], Path],
) -> None:
    """The check counts every node's workers: tp2 fits 2 nodes x 1, and the nodes start."""
    env, log = fake_slurm
    result = _sbatch(env, "parallel=tp2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "run dir " in result.stdout and result.stderr == ""
    assert (
        f"srun --nodes=2 --ntasks-per-node=1 --wait=300 {REPO}/launch/slurm_node.sh "
        "omnimoe_train.cli parallel=tp2"
    ) in log.read_text().splitlines()
    refused = _sbatch({**env, "SLURM_JOB_NUM_NODES": "1"}, "parallel=tp2")
    assert refused.returncode == 2, refused.stderr
    assert "parallel.tp*parallel.pp = 2*1 = 2 must divide the world size" in refused.stderr
    assert "(the number of processes: 1)" in refused.stderr
