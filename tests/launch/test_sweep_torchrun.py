"""Sweep jobs as torchrun jobs (``hydra/launcher=slurm_torchrun``) against the real SLURM of
``slurm_cluster.py``: one srun task per job whose elastic agent starts 2 CPU workers (gloo);
and one such worker alone, stopped while it starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.launch.conftest import TINY, job_env
from tests.launch.slurm_cluster import SlurmCluster
from tests.launch.test_slurm import (
    JOB_TIMEOUT,
    sweep_with_usr1_to_first_job,
    train_losses,
)


def test_worker_stopped_by_usr1_while_starting_exits_75(tmp_path: Path) -> None:
    """A sweep job's torchrun worker (the agent passes USR1 on) died of USR1 while it started
    (138: the agent exits 1 and the job is not requeued); now one line, its status and 75."""
    run_dir, config = tmp_path / "run", tmp_path / "config.yaml"
    run_dir.mkdir()
    os.mkfifo(config)  # the worker reads the job's config first: held there until the signal
    worker = subprocess.Popen(
        [sys.executable, "-m", "omnimoe_train.sweep_torchrun", str(config), str(run_dir)],
        env=job_env(tmp_path), stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    writer = None
    try:
        deadline = time.monotonic() + 60
        while writer is None:  # opening the writing end succeeds once the worker reads
            assert worker.poll() is None and time.monotonic() < deadline, worker.returncode
            try:
                writer = os.open(config, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                time.sleep(0.02)
        worker.send_signal(signal.SIGUSR1)
        err = worker.communicate(timeout=60)[1]
    finally:
        worker.kill()
        if writer is not None:
            os.close(writer)
    assert worker.returncode == 75, err
    (line,) = err.strip().splitlines()
    assert line.startswith("omnimoe-train: stopped: stop requested (SIGUSR1) before training")
    assert json.loads((run_dir / "exit_status.json").read_text())["exit_code"] == 75


def derived(run_dir: Path) -> dict:
    """The ``derived`` section run.py appends to the run's ``config.yaml``."""
    return yaml.safe_load((run_dir / "config.yaml").read_text())["derived"]


def test_sweep_jobs_run_as_torchrun_jobs(
    slurm: SlurmCluster, tiny_cache: Path, tmp_path: Path
) -> None:
    """A 2-point sweep, each job one srun task whose torchrun agent starts 2 CPU workers (gloo):
    both jobs train with world size 2 and their run directories hold the metrics."""
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [
            sys.executable, "-m", "omnimoe_train.cli", "-m", "hydra/launcher=slurm_torchrun",
            *TINY, "trainer.max_steps=3", "trainer.seed=1,2", f"hydra.sweep.dir={sweep}",
            "hydra.launcher.timeout_min=10", "hydra.launcher.nproc_per_node=2",
            "hydra.launcher.cpus_per_task=2",
        ],
        cwd=tmp_path, env=slurm.env(**job_env(tiny_cache)), capture_output=True, text=True,
        timeout=JOB_TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dirs = sorted(p for p in sweep.iterdir() if p.name[0].isdigit())
    assert [p.name for p in run_dirs] == ["0_trainer.seed=1", "1_trainer.seed=2"]
    for rd in run_dirs:
        assert sorted(train_losses(rd)) == [1, 2, 3], rd
        assert derived(rd)["world_size"] == 2 and derived(rd)["dp"] == 2, rd
        # Each worker's own log, under the run directory.
        assert {p.parent.name for p in (rd / "logs").rglob("stderr.log")} == {"0", "1"}, rd
    losses = [train_losses(rd)[1] for rd in run_dirs]
    assert losses[0] != losses[1]  # each job trained its own sweep point (seed)
    # One srun task per node (the agent), with the CPUs of both workers.
    script = next((sweep / ".submitit").glob("*submission*.sh")).read_text()
    assert "#SBATCH --ntasks-per-node=1" in script and "#SBATCH --cpus-per-task=2" in script


def test_torchrun_sweep_job_over_two_nodes(
    slurm: SlurmCluster, tiny_cache: Path, tmp_path: Path
) -> None:
    """``hydra.launcher.nodes=2``: one agent per node, the rendezvous on the first node joins
    them into one world (2 nodes x 1 worker), which trains the sweep point."""
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [
            sys.executable, "-m", "omnimoe_train.cli", "-m", "hydra/launcher=slurm_torchrun",
            *TINY, "trainer.max_steps=3", "trainer.seed=3", f"hydra.sweep.dir={sweep}",
            "hydra.launcher.timeout_min=10", "hydra.launcher.nodes=2",
            "hydra.launcher.nproc_per_node=1", "hydra.launcher.cpus_per_task=1",
        ],
        cwd=tmp_path, env=slurm.env(**job_env(tiny_cache)), capture_output=True, text=True,
        timeout=JOB_TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run_dir,) = (p for p in sweep.iterdir() if p.name[0].isdigit())
    assert sorted(train_losses(run_dir)) == [1, 2, 3]
    assert derived(run_dir)["world_size"] == 2 and derived(run_dir)["dp"] == 2
    # One agent per node, each with its worker's log.
    nodes = {p.name for p in (run_dir / "logs").glob("*/*/node*")}
    assert nodes == {"node0", "node1"}


@pytest.mark.slow
def test_sweep_jobs_as_torchrun_jobs_one_requeued_after_usr1(
    slurm: SlurmCluster, tiny_cache: Path, tmp_path: Path
) -> None:
    """A 2-point sweep of one config (``trainer.seed=1,1``), each job a torchrun job of 2
    workers: both train with world size 2. The first gets USR1 mid-run, as SLURM sends it before
    the time limit: its workers save and exit 75, the job requeues itself, resumes and ends on
    the same losses as the uninterrupted second job."""
    steps = 150
    sweep = tmp_path / "sweep"
    returncode, out, job, _ = sweep_with_usr1_to_first_job(
        slurm, tiny_cache, tmp_path,
        [
            "hydra/launcher=slurm_torchrun", f"trainer.max_steps={steps}", "trainer.seed=1,1",
            "hydra.launcher.nproc_per_node=2", "hydra.launcher.cpus_per_task=2",
        ],
    )  # fmt: skip
    assert returncode == 0, out[-3000:]
    other = job[:-1] + "1"
    assert int(slurm.job_info(job).get("Restarts", "0")) == 1
    assert int(slurm.job_info(other).get("Restarts", "0")) == 0
    run_dirs = sorted(p for p in sweep.iterdir() if p.name[0].isdigit())
    assert [p.name for p in run_dirs] == ["0_trainer.seed=1", "1_trainer.seed=1"]
    for rd in run_dirs:
        assert derived(rd)["world_size"] == 2 and derived(rd)["dp"] == 2, rd
        # Both workers' own logs, per start of the job, under the run dir.
        rank_logs = {p.parent.name for p in (rd / "logs").rglob("stderr.log")}
        assert rank_logs == {"0", "1"}, rd
    assert {p.name for p in (run_dirs[0] / "logs").iterdir()} == {f"{job}.0", f"{job}.1"}
    resumed, uninterrupted = (train_losses(rd) for rd in run_dirs)
    assert sorted(resumed) == list(range(1, steps + 1))  # every step once, none repeated
    assert resumed == uninterrupted
    # One srun task per node (the agent), with the CPUs for both workers.
    script = next((sweep / ".submitit").glob("*submission*.sh")).read_text()
    assert "#SBATCH --ntasks-per-node=1" in script and "#SBATCH --cpus-per-task=2" in script
    log = "".join(p.read_text() for p in (sweep / ".submitit").rglob(f"{job}_0_log.err"))
    assert "saved a checkpoint and stopped early (exit 75)" in log, log[-3000:]
    assert "requeueing SLURM job" in log and "resumed from" in log, log[-3000:]
