"""Fixtures of the launcher tests: the tiny model's overrides, its prepared data, and a real
SLURM cluster on this machine (``slurm_cluster.py``).

The SLURM tests skip, with the reason, where root or the Debian packages are missing; with
``OMNIMOE_REQUIRE_SLURM=1`` (set by ``.ci/run``, which installs the packages) they fail instead,
so that CI cannot pass without running them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli_helpers import tiny
from tests.launch.slurm_cluster import SlurmCluster, start_cluster, unavailable_reason

REPO = Path(__file__).resolve().parents[2]

# Issue 9's TINY model, on CPU, with a global batch of 8 for two data-parallel ranks.
TINY = tiny(data__global_batch_size=8, trainer__device="cpu")


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ``OMNIMOE_CACHE`` holding the TINY dataset, prepared once for every job."""
    from hydra import compose, initialize_config_module

    from omnimoe_train.cli import to_root_config
    from omnimoe_train.config import register_configs
    from omnimoe_train.data import prepare_data

    cache = tmp_path_factory.mktemp("omnimoe-cache")
    register_configs()
    with initialize_config_module(config_module="omnimoe_conf", version_base="1.3"):
        cfg = to_root_config(compose(config_name="config", overrides=TINY))
    old = os.environ.get("OMNIMOE_CACHE")
    os.environ["OMNIMOE_CACHE"] = str(cache)
    try:
        prepare_data(cfg.data, rank=0)
    finally:
        if old is None:
            os.environ.pop("OMNIMOE_CACHE")
        else:
            os.environ["OMNIMOE_CACHE"] = old
    return cache


def job_env(cache: Path, **extra: str) -> dict[str, str]:
    """Environment of a launched job: the shared cache, one thread per process, quiet W&B."""
    env = {**os.environ, "OMNIMOE_CACHE": str(cache), "OMP_NUM_THREADS": "1", **extra}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


@pytest.fixture(scope="session")
def slurm() -> Iterator[SlurmCluster]:
    """Two emulated nodes (2 CPUs each) with munge and slurmctld, for the whole session."""
    reason = unavailable_reason()
    if reason is not None:
        if os.environ.get("OMNIMOE_REQUIRE_SLURM") == "1":
            pytest.fail(f"OMNIMOE_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)  # no root or no SLURM packages on this machine
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()
