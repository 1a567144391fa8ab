"""Functions the submitit tests run as SLURM jobs (importable there: the repository root is on
the jobs' PYTHONPATH)."""

from __future__ import annotations

import os
import sys

EXIT_REQUEUE = 75


def stop_early_on_first_start(max_requeues: int) -> str:
    """Exit like the trainer after a preemption save on the job's first start; finish on the
    next. Returns the restart count it finished on."""
    from omnimoe_train.sweep_jobs import requeue_on_early_stop

    with requeue_on_early_stop(max_requeues):
        if os.environ.get("SLURM_RESTART_COUNT", "0") == "0":
            sys.exit(EXIT_REQUEUE)
    return os.environ.get("SLURM_RESTART_COUNT", "0")
