"""Sweep jobs on SLURM: what ``omnimoe-train -m hydra/launcher=slurm ...`` needs in each job.

hydra-submitit-launcher submits one SLURM job per sweep point, through our launcher plugin
(``hydra_plugins.omnimoe_slurm_launcher``). A job runs in one of two layouts
(``job_layout``): srun starts one task per GPU of every node and each runs the Hydra job
in-process (``cli._hydra_main``) as one training rank; or, with ``hydra.launcher.torchrun=true``,
one task per node, in which torch's elastic agent starts the workers
(``omnimoe_train.sweep_torchrun``). Here:

- ``job_layout``: the srun tasks and training processes per node from the launcher keys, with
  the rule that they match the GPUs.
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
  save: the trainer's handler replaces it while training runs (in a torchrun job, the agent's
  handler, which passes the signal to the workers).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from omnimoe_train.validation import ConfigError

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


def register_launcher_plugin() -> None:
    """Make ``hydra_plugins.omnimoe_slurm_launcher`` known to Hydra (its config schema and class).

    Hydra finds plugins by listing the ``hydra_plugins`` namespace package; an editable install
    by setuptools >= 64 is reached through an import hook that such listing does not see (Hydra
    issue 2359), so the launcher is imported and registered here (``Plugins.register``, Hydra's
    way to add a plugin by hand). In an environment installed before the plugin existed, the
    module is missing (or hydra-submitit-launcher is not installed): then
    ``hydra/launcher=slurm`` fails to compose, which ``cli.precheck`` reports in one line, and
    nothing else changes.
    """
    from hydra.core.plugins import Plugins

    # The scan first: where it does list the module (run from the repository root, or a regular
    # install) it executes it again, redefining the class that must be registered (and pickled
    # into the jobs).
    plugins = Plugins.instance()
    try:
        from hydra_plugins.omnimoe_slurm_launcher import SlurmLauncher
    except ModuleNotFoundError as exc:
        # Missing plugin, or missing submitit launcher it extends (a machine that only trains,
        # e.g. inside a job): training does not need it, and asking for the launcher then
        # fails to compose with Hydra's own one-line message.
        optional = ("hydra_plugins.omnimoe_slurm_launcher", "hydra_plugins.hydra_submitit_launcher")
        if exc.name not in (*optional, "submitit"):
            raise
        return
    plugins.register(SlurmLauncher)


@dataclass(frozen=True)
class JobLayout:
    """The processes of one sweep job on each of its nodes."""

    tasks_per_node: int  # srun tasks
    nproc_per_node: int  # training processes (ranks)
    torchrun: bool  # True: one task per node, whose elastic agent starts nproc_per_node workers


def _count(launcher: Mapping[str, Any], key: str, minimum: int) -> int | None:
    value = launcher.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"hydra.launcher.{key}", f"must be an integer, got {value!r}")
    if value is not None and value < minimum:
        raise ConfigError(f"hydra.launcher.{key}", f"must be >= {minimum}, got {value}")
    return value


def job_layout(launcher: Mapping[str, Any]) -> JobLayout:
    """The srun tasks and training processes per node that ``hydra.launcher`` asks for.

    One task per GPU (default): ``tasks_per_node`` unset = ``gpus_per_node`` (1 without GPUs,
    where CPU ranks may be more). torchrun (``torchrun: true``): one task per node and
    ``nproc_per_node`` workers, unset = ``gpus_per_node`` (1 without GPUs).

    Raises:
        ConfigError: a hand-set ``tasks_per_node``/``nproc_per_node`` that does not give one
            rank per GPU, a torchrun job with more than one task per node, or
            ``nproc_per_node`` without torchrun.
    """
    gpus = _count(launcher, "gpus_per_node", 0) or 0
    tasks = _count(launcher, "tasks_per_node", 1)
    nproc = _count(launcher, "nproc_per_node", 1)
    if launcher.get("torchrun", False):
        if tasks not in (None, 1):
            raise ConfigError(
                "hydra.launcher.tasks_per_node",
                f"is {tasks}, but a torchrun job runs one task per node (its agent starts "
                "nproc_per_node workers): leave it unset",
            )
        if gpus and nproc not in (None, gpus):
            raise ConfigError(
                "hydra.launcher.nproc_per_node",
                f"is {nproc}, but gpus_per_node is {gpus}: one worker per GPU; leave it unset",
            )
        return JobLayout(tasks_per_node=1, nproc_per_node=nproc or max(gpus, 1), torchrun=True)
    if nproc is not None:
        raise ConfigError(
            "hydra.launcher.nproc_per_node",
            "is for torchrun jobs: use hydra/launcher=slurm_torchrun (or "
            "hydra.launcher.torchrun=true), or tasks_per_node for one task per rank",
        )
    if gpus and tasks not in (None, gpus):
        raise ConfigError(
            "hydra.launcher.tasks_per_node",
            f"is {tasks}, but gpus_per_node is {gpus}: one task per GPU; leave it unset (derived)",
        )
    tasks = tasks or max(gpus, 1)
    return JobLayout(tasks_per_node=tasks, nproc_per_node=tasks, torchrun=False)


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
