"""The processes of a SLURM sweep job (``sweep_jobs.job_layout``), what the launcher plugin hands
submitit, the one-line error for a layout that does not match the GPUs, and the config a torchrun
worker reads back; no SLURM needed."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.plugins import Plugins
from hydra.utils import instantiate

from hydra_plugins.omnimoe_slurm_launcher import OmnimoeSlurmQueueConf
from omnimoe_train import sweep_jobs
from omnimoe_train.cli import to_root_config
from omnimoe_train.config import register_configs
from omnimoe_train.sweep_jobs import JobLayout, job_layout
from omnimoe_train.sweep_torchrun import config_yaml, load_config
from omnimoe_train.validation import ConfigError
from tests.launch.conftest import TINY, job_env


@pytest.mark.parametrize(
    ("launcher", "expected"),
    [
        ({}, JobLayout(1, 1, False)),  # no GPUs: one CPU rank per node
        ({"gpus_per_node": 8}, JobLayout(8, 8, False)),  # derived: one task per GPU
        ({"gpus_per_node": 8, "tasks_per_node": 8}, JobLayout(8, 8, False)),
        ({"tasks_per_node": 3}, JobLayout(3, 3, False)),  # CPU nodes: any number of ranks
        ({"torchrun": True, "gpus_per_node": 8}, JobLayout(1, 8, True)),
        ({"torchrun": True, "nproc_per_node": 2}, JobLayout(1, 2, True)),  # CPU workers
        ({"torchrun": True, "gpus_per_node": 4, "tasks_per_node": 1}, JobLayout(1, 4, True)),
        ({"torchrun": True}, JobLayout(1, 1, True)),
    ],
)
def test_job_layout(launcher: dict, expected: JobLayout) -> None:
    assert job_layout(launcher) == expected


@pytest.mark.parametrize(
    ("launcher", "key", "rule"),
    [
        ({"gpus_per_node": 8, "tasks_per_node": 4}, "tasks_per_node", "one task per GPU"),
        ({"gpus_per_node": 8, "tasks_per_node": 1}, "tasks_per_node", "gpus_per_node is 8"),
        ({"nproc_per_node": 2}, "nproc_per_node", "is for torchrun jobs"),
        ({"torchrun": True, "tasks_per_node": 2}, "tasks_per_node", "one task per node"),
        ({"torchrun": True, "gpus_per_node": 8, "nproc_per_node": 4}, "nproc_per_node", "GPU"),
        ({"tasks_per_node": 0}, "tasks_per_node", ">= 1"),
        ({"gpus_per_node": -1}, "gpus_per_node", ">= 0"),
    ],
)
def test_job_layout_mismatch_is_an_error(launcher: dict, key: str, rule: str) -> None:
    with pytest.raises(ConfigError, match=rule) as err:
        job_layout(launcher)
    assert err.value.key == f"hydra.launcher.{key}"


def _launcher(*overrides: str):  # noqa: ANN202 - the plugin's SlurmLauncher
    sweep_jobs.register_repo_resolver()
    sweep_jobs.register_launcher_plugin()
    register_configs()
    with initialize_config_module(config_module="omnimoe_conf", version_base="1.3"):
        dcfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    return instantiate(dcfg.hydra.launcher)


def test_launcher_derives_tasks_per_node_and_keeps_its_keys_from_submitit() -> None:
    per_gpu = _launcher("hydra/launcher=slurm", "hydra.launcher.gpus_per_node=8")
    assert per_gpu.params["tasks_per_node"] == 8 and per_gpu.params["gpus_per_node"] == 8
    torchrun = _launcher("hydra/launcher=slurm_torchrun", "hydra.launcher.gpus_per_node=8")
    assert torchrun.params["tasks_per_node"] == 1
    # submitit rejects parameters it does not know.
    assert not {"torchrun", "nproc_per_node"} & set(torchrun.params)
    # What Hydra instantiates is the class registered; submitit pickles it into the jobs.
    registered = Plugins.instance().class_name_to_class[OmnimoeSlurmQueueConf._target_]
    assert type(torchrun) is registered
    assert pickle.loads(pickle.dumps(torchrun)).params == torchrun.params


def test_mismatched_layout_is_one_line_before_anything_is_submitted(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable, "-m", "omnimoe_train.cli", "-m", "hydra/launcher=slurm",
            "hydra.launcher.gpus_per_node=8", "hydra.launcher.tasks_per_node=1", *TINY,
            "trainer.seed=1,2", f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        cwd=tmp_path, env=job_env(tmp_path), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "omnimoe-train: error: hydra.launcher.tasks_per_node: is 1, but gpus_per_node is 8: "
        "one task per GPU; leave it unset (derived)"
    )
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("overrides", [TINY, ["model=a80m_peer"], ["trainer.engine=deepspeed"]])
def test_worker_reads_back_the_jobs_config(overrides: list[str], tmp_path: Path) -> None:
    register_configs()
    with initialize_config_module(config_module="omnimoe_conf", version_base="1.3"):
        cfg = to_root_config(compose(config_name="config", overrides=overrides))
    path = tmp_path / "job.yaml"
    path.write_text(config_yaml(cfg))
    assert load_config(path) == cfg


def test_training_does_not_need_the_submitit_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine without hydra-submitit-launcher (e.g. a GPU node given only the training
    wheels) still starts training: registering the SLURM launcher is skipped."""
    for name in list(sys.modules):
        if name.startswith(("hydra_plugins.omnimoe_slurm_launcher", "hydra_plugins.hydra_sub")):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "hydra_plugins.hydra_submitit_launcher", None)
    sweep_jobs.register_launcher_plugin()  # no ModuleNotFoundError
