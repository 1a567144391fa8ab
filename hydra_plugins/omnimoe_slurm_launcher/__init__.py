"""omnimoe-train's Hydra launcher: hydra-submitit-launcher's SLURM launcher, with the processes
of each sweep job laid out from the GPUs asked for (``conf/hydra/launcher/slurm.yaml`` and
``slurm_torchrun.yaml`` use it).

It adds three keys to the plugin's ``submitit_slurm`` config:

- ``tasks_per_node``: left unset (null) it is derived, one srun task per GPU of a node (1 on
  nodes without GPUs) or 1 for a torchrun job; set by hand it must match, since a mismatch would
  run a different number of ranks than GPUs without saying so (``sweep_jobs.job_layout``).
- ``torchrun``: true runs each sweep job as a torchrun job: one srun task per node, in which
  torch's elastic agent starts ``nproc_per_node`` workers (``omnimoe_train.sweep_torchrun``).
- ``nproc_per_node``: workers per node of a torchrun job; null = ``gpus_per_node`` (1 without
  GPUs; CPU workers need it set).

Why a subclass, not only config: the plugin's ``submitit_slurm`` schema is a structured
config (a key it lacks cannot be set) and submitit rejects parameters it does not know, so
neither a launcher YAML nor ``setup``/``srun_args`` can carry ``torchrun``/``nproc_per_node``
to the job, and no interpolation can reject a hand-set ``tasks_per_node`` that contradicts the
GPUs. The subclass only adds the keys to the schema, computes ``tasks_per_node`` and takes the
two new keys out before handing the rest to submitit; the job reads them back from its
``hydra.launcher`` config. Submitting, the sbatch script and requeueing stay the plugin's.

Hydra finds launchers by listing the ``hydra_plugins`` namespace, which an editable install
(setuptools >= 64) does not expose, so ``omnimoe-train`` also registers this one by hand
(``sweep_jobs.register_launcher_plugin``).
"""

# No `from __future__ import annotations`: Hydra's plugin scan may execute this module before it
# is in sys.modules, and dataclasses cannot resolve string annotations then.
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf

SCHEMA_NAME = "omnimoe_slurm"


@dataclass
class OmnimoeSlurmQueueConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.omnimoe_slurm_launcher.SlurmLauncher"
    tasks_per_node: int | None = None  # type: ignore[assignment]  # None = derived
    torchrun: bool = False
    nproc_per_node: int | None = None


ConfigStore.instance().store(
    group="hydra/launcher", name=SCHEMA_NAME, node=OmnimoeSlurmQueueConf(), provider="omnimoe"
)


class SlurmLauncher(submitit_launcher.SlurmLauncher):
    """``SlurmLauncher`` whose ``tasks_per_node`` comes from ``sweep_jobs.job_layout``.

    Raises:
        ConfigError: the keys ask for a layout that does not match the GPUs (``omnimoe-train``
            reports it in one line before Hydra gets here).
    """

    def __init__(
        self, torchrun: bool = False, nproc_per_node: int | None = None, **params: Any
    ) -> None:
        from omnimoe_train.sweep_jobs import job_layout

        layout = job_layout({**params, "torchrun": torchrun, "nproc_per_node": nproc_per_node})
        super().__init__(**{**params, "tasks_per_node": layout.tasks_per_node})
