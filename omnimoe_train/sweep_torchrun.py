"""A sweep job on SLURM as a torchrun job (``hydra/launcher=slurm_torchrun``).

hydra-submitit-launcher runs the sweep job's Hydra job in one srun task per node
(``tasks_per_node`` = 1). There, ``run_job`` becomes torchrun's elastic agent for this node, in
this process, started exactly as ``launch/slurm_node.sh`` starts it in a ``launch/slurm.sbatch``
job: ``omnimoe_train.torchrun.main`` (``torch.distributed.run`` with the signal and exit-status
handling a preemptible job needs) on ``torchrun.slurm_node_args``, given

- the rendezvous on the first node of the job's allocation, the port drawn from the job id
  (submitit's ``TorchDistributedEnvironment``, as for the one-task-per-GPU layout);
- ``nproc_per_node`` workers, each ``python -m omnimoe_train.sweep_torchrun CONFIG RUN_DIR``:
  the job's config, composed and resolved once by Hydra in this process and handed over as a
  YAML file (node-local, removed at the end), so that every worker trains exactly that config;
- per-rank logs under ``<run dir>/logs/<job id>.<restart>/``.

In this process the agent's SIGUSR1 handler (which passes the signal to the workers) replaces
submitit's, which would requeue the job at once, before the workers have saved. When the
workers stop with a checkpoint (exit 75), ``run_job`` exits 75 as the in-process trainer would,
and ``sweep_jobs.requeue_on_early_stop`` requeues the job.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from omnimoe_train.config import RootConfig


def config_yaml(cfg: RootConfig) -> str:
    """``cfg`` as YAML, every value resolved (what ``load_config`` reads back as equal)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg), resolve=True)


def load_config(path: Path) -> RootConfig:
    """A config written by ``config_yaml``, typed by the schema again."""
    merged = OmegaConf.merge(OmegaConf.structured(RootConfig), OmegaConf.load(path))
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def run_job(cfg: RootConfig, run_dir: Path, nproc_per_node: int) -> float | None:
    """Train ``cfg`` in ``run_dir`` with ``nproc_per_node`` torchrun workers on this node.

    Returns the final validation loss (rank 0's ``summary.json``), or None.

    Raises:
        SystemExit: with the agent's status when the workers did not all finish: 75 when they
            stopped early with a checkpoint, 2 on a usage error they printed, 1 on a crash,
            128 + N when a signal N stopped the agent.
    """
    from submitit.helpers import TorchDistributedEnvironment

    from omnimoe_train import torchrun
    from omnimoe_train.sweep_jobs import job_id

    first_node = TorchDistributedEnvironment()  # hostnames[0], a port drawn from the job id
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    env = {
        **os.environ,
        "OMNIMOE_RDZV_HOST": first_node.master_addr,
        "OMNIMOE_RDZV_PORT": str(first_node.master_port),
        "OMNIMOE_NPROC_PER_NODE": str(nproc_per_node),
        "OMNIMOE_LOG_DIR": str(run_dir / "logs" / f"{job_id()}.{restart}"),
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    # Node-local, one per agent: the nodes of a job share the run dir, not this file.
    with tempfile.NamedTemporaryFile(
        "w", prefix="omnimoe-sweep-job-", suffix=".yaml", delete=True
    ) as config_file:
        config_file.write(config_yaml(cfg))
        config_file.flush()
        worker_args = [config_file.name, str(run_dir)]
        status = torchrun.main(torchrun.slurm_node_args(__name__, worker_args, env))
    if status != 0:
        raise SystemExit(status)
    summary = run_dir / "summary.json"
    return json.loads(summary.read_text()).get("final_val_loss") if summary.exists() else None


def worker_main(argv: list[str]) -> int:
    """One torchrun worker: ``python -m omnimoe_train.sweep_torchrun CONFIG RUN_DIR``."""
    from omnimoe_train.checkpoint.signals import StartupStop, StoppedBeforeTraining
    from omnimoe_train.run import (
        quiet_libraries,
        run,
        say_stop_after_training,
        stopped_before_training,
    )

    config_file, run_dir = argv
    # The agent passes SIGUSR1 on at any time: until the trainer's handler, one line and 75 (the
    # job requeues), as in the CLI, not death by the signal (138, and no requeue); after
    # training, one line and 0.
    startup = StartupStop(lambda: Path(run_dir))
    startup.install()
    try:
        quiet_libraries()
        run(load_config(Path(config_file)), Path(run_dir))  # exits with its code unless 0
    except StoppedBeforeTraining as exc:
        stopped_before_training(exc)
    say_stop_after_training(startup.hand_over())
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
