"""Sweep jobs on SLURM: what ``omnimoe-train -m hydra/launcher=slurm ...`` needs in each job.

hydra-submitit-launcher submits one SLURM job per sweep point; in it, srun starts
``hydra.launcher.tasks_per_node`` tasks per node (one per GPU) and each runs the Hydra job
in-process (``cli._hydra_main``). Here:

- ``export_distributed_env``: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT from
  SLURM's task variables (submitit's ``TorchDistributedEnvironment``: the first node, a port drawn
  from the job id), so that ``distributed.init_runtime`` builds one world over all the job's
  tasks, as under torchrun.
- ``requeue_on_early_stop``: the launcher config has SLURM send USR1 ``signal_delay_s`` before
  the time limit (``SUBMITIT_PREEMPT_SIGNAL=USR1``); the trainer finishes its step, saves and
  exits with 75 (also when ``trainer.max_time`` is used up). Rank 0 then requeues the job
  (``scontrol requeue``), which reruns the same sweep point in the same folder and resumes from
  its checkpoint, at most ``hydra.launcher.max_num_timeout`` times; after that the job ends
  with an error that the sweep reports. submitit's own USR1 handler would requeue without the
  save: the trainer's handler replaces it while training runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from omegaconf import OmegaConf

EXIT_REQUEUE = 75
PREEMPT_SIGNAL_ENV = "SUBMITIT_PREEMPT_SIGNAL"
SWEPT_KEYS_ENV = "OMNIMOE_SWEPT_KEYS"
REPO_RESOLVER = "omnimoe_repo"


class SweepJobStopped(RuntimeError):
    """A sweep job stopped early with a checkpoint and may not be requeued again."""


def in_slurm_sweep_job() -> bool:
    """True inside a job that submitit started on SLURM."""
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm"


def use_usr1_for_preemption() -> None:
    """Make submitit ask SLURM for USR1 before the time limit (its default is USR2).

    Called before submitit is imported: submitit reads the variable once, at import, both in the
    submitting process (for ``#SBATCH --signal``) and in the jobs (which inherit it).
    """
    os.environ.setdefault(PREEMPT_SIGNAL_ENV, "USR1")


def register_repo_resolver() -> None:
    """``${omnimoe_repo:}``: the repository root, for the launcher config's ``setup`` lines."""
    if not OmegaConf.has_resolver(REPO_RESOLVER):
        OmegaConf.register_new_resolver(
            REPO_RESOLVER, lambda: str(Path(__file__).resolve().parents[1])
        )


def pass_swept_keys(keys: list[str]) -> None:
    """Hand the swept keys to the jobs (sbatch passes the environment on): they name the job's
    folder (``names.job_dirname``), and a SLURM job resolves that name itself."""
    os.environ[SWEPT_KEYS_ENV] = ",".join(keys)


def prepare_job_process() -> None:
    """In a sweep job: the resolvers ``conf/config.yaml`` uses and the swept keys, which the job
    needs before Hydra names its folder, i.e. before ``cli.main`` would have set them."""
    from omnimoe_train import names

    names.register_resolvers()
    names.set_swept_keys(k for k in os.environ.get(SWEPT_KEYS_ENV, "").split(",") if k)


def export_distributed_env() -> None:
    """Set torch's ``env://`` variables from SLURM's (unless a launcher already set RANK)."""
    if "RANK" in os.environ:
        return
    from submitit.helpers import TorchDistributedEnvironment

    # Each task keeps every GPU of its node visible and uses cuda:LOCAL_RANK, as under torchrun.
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def job_id() -> str:
    """The id ``scontrol requeue`` takes for this job (``<array id>_<index>`` in an array)."""
    array_id = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_id:
        return f"{array_id}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ["SLURM_JOB_ID"]


@contextmanager
def requeue_on_early_stop(max_requeues: int) -> Iterator[None]:
    """Around one sweep job's run: on the trainer's exit 75, rank 0 requeues the job.

    Raises:
        SweepJobStopped: on exit 75 once the job has been requeued ``max_requeues`` times
            (submitit records it as the job's error, the sweep reports it).
    """
    try:
        yield
    except SystemExit as exc:
        if exc.code != EXIT_REQUEUE:
            raise
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if restarts >= max_requeues:
            raise SweepJobStopped(
                f"stopped early with a checkpoint after {restarts} requeue(s) "
                f"(hydra.launcher.max_num_timeout={max_requeues}); rerun the sweep to continue"
            ) from None
        if int(os.environ.get("SLURM_PROCID", "0")) == 0:
            print(
                f"omnimoe-train: checkpoint saved; requeueing SLURM job {job_id()}",
                file=sys.stderr,
                flush=True,
            )
            subprocess.run(["scontrol", "requeue", job_id()], check=True, timeout=60)
        raise


if in_slurm_sweep_job():
    # submitit imports this module while it unpickles the job's task function (which refers to
    # it), before Hydra resolves the job's folder name in that process.
    prepare_job_process()
