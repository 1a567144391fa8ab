"""The SLURM launchers against a real SLURM (``slurm_cluster.py``: munge, slurmctld, two
slurmd as two nodes on this machine): the sbatch template on 2 nodes x 1 CPU process, a
preempted job that requeues and resumes, and a Hydra sweep through hydra-submitit-launcher.

The times printed (run with ``-s``) are what the closing notes quote; nothing asserts on them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launch.conftest import REPO, TINY, job_env
from tests.launch.slurm_cluster import SlurmCluster

SBATCH = str(REPO / "launch" / "slurm.sbatch")
# The test nodes have no GPUs and 2 CPUs: these override the template's GPU-node #SBATCH lines.
CPU_NODES = ["--gpus-per-node=0", "--cpus-per-task=1", "--time=15"]
JOB_TIMEOUT = 300
# The preemption tests need only what every test here needs: the ``slurm`` fixture (it skips
# without SLURM, and fails under OMNIMOE_REQUIRE_SLURM=1). They once also skipped until
# checkpoint/session.py existed; that condition could skip them in CI with SLURM present.


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip().endswith("}")]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def sweep_with_usr1_to_first_job(
    slurm: SlurmCluster, tiny_cache: Path, tmp_path: Path, overrides: list[str]
) -> tuple[int, str, str, Path]:
    """Run ``omnimoe-train -m`` (TINY + ``overrides``) into ``tmp_path/sweep``; once the first
    job's run dir logged 3 steps, send that job USR1 and wait for the sweep to end.
    Returns (exit code, output, the signalled job id, its run dir)."""
    sweep = tmp_path / "sweep"
    sweeping = subprocess.Popen(
        [
            sys.executable, "-m", "omnimoe_train.cli", "-m", *TINY, *overrides,
            "trainer.eval_interval=50", f"hydra.sweep.dir={sweep}",
            "hydra.launcher.timeout_min=10", "hydra.launcher.max_num_timeout=2",
        ],
        cwd=tmp_path, env=slurm.env(**job_env(tiny_cache)), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + JOB_TIMEOUT
        run_dir = sweep / "none yet"
        while len(train_losses(run_dir)) < 3 and time.monotonic() < deadline:
            run_dir = next(sweep.glob("0_*"), run_dir)
            assert sweeping.poll() is None, sweeping.communicate()[0][-3000:]
            time.sleep(0.1)
        jobs = slurm.run("squeue", "-h", "-o", "%i").stdout.split()
        # An array job's tasks are <id>_<index>; a single job has a plain id.
        job = next((j for j in jobs if j.endswith("_0")), jobs[0])
        slurm.run("scancel", "--signal=USR1", job)
        out, _ = sweeping.communicate(timeout=2 * JOB_TIMEOUT)
    finally:
        sweeping.kill()
    return sweeping.returncode, out, job, run_dir


def wait_until(predicate, what: str, cluster: SlurmCluster, job: str, timeout: float) -> float:  # noqa: ANN001
    """Poll ``predicate`` every 0.1 s; return the time it became true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        info = cluster.job_info(job)
        if info.get("JobState") in {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}:
            break
        time.sleep(0.1)
    raise AssertionError(f"{what}: not seen; job {job}: {cluster.job_info(job)}")


def output_of(submit_dir: Path, job: str) -> str:
    return (submit_dir / f"slurm-omnimoe-{job}.out").read_text()


@pytest.mark.slow
def test_sbatch_trains_on_two_nodes(slurm: SlurmCluster, tiny_cache: Path, tmp_path: Path) -> None:
    env = slurm.env(**job_env(tiny_cache, OMNIMOE_HEALTH_CHECK="1"))
    submitted = time.monotonic()
    job = slurm.sbatch(*CPU_NODES, SBATCH, *TINY, "trainer.max_steps=10", cwd=tmp_path, env=env)
    run_dir = tmp_path / "outputs" / "slurm" / f"omnimoe-{job}"
    first_step = wait_until(
        lambda: bool(train_losses(run_dir)), "first step", slurm, job, JOB_TIMEOUT
    )
    print(f"\nsbatch -> first training step: {first_step - submitted:.1f} s (health check on)")
    info = slurm.wait_for(job, {"COMPLETED", "FAILED", "CANCELLED"}, JOB_TIMEOUT)
    out = output_of(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", out
    assert "2 node(s) (omnimoe-n[1-2]) x 1 worker(s)" in out
    assert "health: ok: 2 ranks on 2 node(s), cpu" in out
    assert sorted(train_losses(run_dir)) == list(range(1, 11))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["last_train"]["step"] == 10
    # One rank per node, each with its own log files under the run directory.
    logs = run_dir / "logs" / f"{job}.0" / "omnimoe_train.cli"
    assert {p.name for p in logs.iterdir()} == {"node0", "node1"}
    assert all(any((logs / n).rglob("stderr.log")) for n in ("node0", "node1"))


@pytest.mark.slow
def test_preempted_job_requeues_and_resumes_the_same_curve(
    slurm: SlurmCluster, tiny_cache: Path, tmp_path: Path
) -> None:
    """USR1 (what --signal=B:USR1@<s> sends before the time limit) mid-run: the trainer saves and
    exits 75, the job requeues itself, resumes in the same run dir and ends at the same step
    with the same losses as an uninterrupted job running next to it."""
    steps = 200
    args = [*CPU_NODES, SBATCH, *TINY, f"trainer.max_steps={steps}", "trainer.eval_interval=50"]
    env = slurm.env(**job_env(tiny_cache))
    reference = slurm.sbatch(*args, cwd=tmp_path, env=env)
    job = slurm.sbatch(*args, cwd=tmp_path, env=env)
    run_dir = tmp_path / "outputs" / "slurm" / f"omnimoe-{job}"
    wait_until(lambda: len(train_losses(run_dir)) >= 3, "step 3", slurm, job, JOB_TIMEOUT)
    signalled = time.monotonic()
    slurm.run("scancel", "--batch", "--signal=USR1", job)
    wait_until(
        lambda: int(slurm.job_info(job).get("Restarts", "0")) >= 1, "requeue", slurm, job, 120
    )
    stopped_at = max(train_losses(run_dir))
    assert stopped_at < steps, "the job ended before the signal came: make it longer"
    resumed = wait_until(
        lambda: max(train_losses(run_dir)) > stopped_at, "a step after the requeue", slurm, job,
        JOB_TIMEOUT,
    )  # fmt: skip
    print(f"\nUSR1 -> first step after the requeue: {resumed - signalled:.1f} s")
    for j in (reference, job):
        info = slurm.wait_for(j, {"COMPLETED", "FAILED", "CANCELLED"}, JOB_TIMEOUT)
        assert info["JobState"] == "COMPLETED", output_of(tmp_path, j)
    out = output_of(tmp_path, job)
    assert "requeueing job" in out and "start 2:" in out, out  # one log file, appended
    assert "resumed from" in out
    ref_dir = tmp_path / "outputs" / "slurm" / f"omnimoe-{reference}"
    ref_losses, losses = train_losses(ref_dir), train_losses(run_dir)
    assert sorted(losses) == list(range(1, steps + 1))  # every step once, none repeated
    assert losses == ref_losses
    summary = json.loads((run_dir / "summary.json").read_text())
    ref_summary = json.loads((ref_dir / "summary.json").read_text())
    assert summary["last_train"]["step"] == ref_summary["last_train"]["step"] == steps
    assert summary["final_val_loss"] == ref_summary["final_val_loss"]


@pytest.mark.slow
def test_hydra_sweep_on_slurm_through_submitit(
    slurm: SlurmCluster, tiny_cache: Path, tmp_path: Path
) -> None:
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [
            sys.executable, "-m", "omnimoe_train.cli", "-m", "hydra/launcher=slurm", *TINY,
            "trainer.max_steps=3", "trainer.seed=1,2", f"hydra.sweep.dir={sweep}",
            "hydra.launcher.timeout_min=10",
        ],
        cwd=tmp_path, env=slurm.env(**job_env(tiny_cache)), capture_output=True, text=True,
        timeout=JOB_TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # Each job named its folder after the swept key, as a local sweep does.
    jobs = sorted(p.name for p in sweep.iterdir() if p.name[0].isdigit())
    assert jobs == ["0_trainer.seed=1", "1_trainer.seed=2"]
    for job in jobs:
        assert sorted(train_losses(sweep / job)) == [1, 2, 3]
        assert json.loads((sweep / job / "summary.json").read_text())["last_train"]["step"] == 3
    # The launcher config's preemption settings reached sbatch.
    script = next((sweep / ".submitit").glob("*submission*.sh")).read_text()
    assert "#SBATCH --signal=USR1@300" in script and "#SBATCH --requeue" in script


@pytest.mark.slow
def test_sweep_job_requeues_itself_after_usr1(
    slurm: SlurmCluster, tiny_cache: Path, tmp_path: Path
) -> None:
    """A sweep job signalled as SLURM does before its time limit (USR1 to the job's tasks)
    saves, requeues itself through ``sweep_jobs.requeue_on_early_stop`` and completes."""
    steps = 200
    sweep = tmp_path / "sweep"
    returncode, out, job, run_dir = sweep_with_usr1_to_first_job(
        slurm, tiny_cache, tmp_path, ["hydra/launcher=slurm", f"trainer.max_steps={steps}"]
    )
    assert returncode == 0, out[-3000:]
    assert int(slurm.job_info(job).get("Restarts", "0")) == 1
    assert sorted(train_losses(run_dir)) == list(range(1, steps + 1))
    log = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_0_log.err"))
    assert "requeueing SLURM job" in log and "resumed from" in log, log[-3000:]


@pytest.mark.slow
def test_sweep_job_requeue_on_exit_75(
    slurm: SlurmCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``sweep_jobs.requeue_on_early_stop`` in a real submitit job: exit 75 requeues the job,
    which then finishes; with no requeue left, the job fails with one clear error."""
    import submitit

    from tests.launch.sweep_job_fns import stop_early_on_first_start

    for key, value in slurm.env(PYTHONPATH=str(REPO)).items():
        monkeypatch.setenv(key, value)
    executor = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    executor.update_parameters(
        timeout_min=5, cpus_per_task=1, slurm_additional_parameters={"requeue": True}
    )
    requeued = executor.submit(stop_early_on_first_start, 1)
    stopped = executor.submit(stop_early_on_first_start, 0)
    assert requeued.result() == "1"
    with pytest.raises(submitit.core.utils.FailedJobError, match="stopped early with a checkpoint"):
        stopped.result()
    assert slurm.job_info(stopped.job_id)["Restarts"] == "0"
