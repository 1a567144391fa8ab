"""``init_runtime`` / ``shutdown_runtime`` in one process leave the environment as they found it.

The rendezvous variables init_runtime makes up for a one-process world (MASTER_ADDR,
MASTER_PORT) are removed with the process group: a process that then starts jobs (the tests'
SLURM and torchrun sweeps) must not hand them a port of a group that no longer exists. Those
sweeps failed in the full suite once an in-process test ran before them.
"""

from __future__ import annotations

import os

import pytest
import torch

from omnimoe_train.distributed import init_runtime, shutdown_runtime
from tests.train.conftest import compose_config


def test_shutdown_removes_the_rendezvous_variables_it_made_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    init_runtime(compose_config("trainer.device=cpu"))
    assert os.environ["MASTER_ADDR"] == "127.0.0.1" and os.environ["MASTER_PORT"].isdigit()
    shutdown_runtime()
    assert "MASTER_ADDR" not in os.environ and "MASTER_PORT" not in os.environ


def test_shutdown_keeps_what_the_launcher_set(monkeypatch: pytest.MonkeyPatch) -> None:
    from omnimoe_train.distributed import _free_port

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    port = os.environ["MASTER_PORT"]
    init_runtime(compose_config("trainer.device=cpu"))
    shutdown_runtime()
    assert os.environ["MASTER_PORT"] == port


def test_expert_parallel_group_gets_a_high_priority_stream_on_gpus_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """megatron is asked for a high-priority NCCL stream for the "ep" group under EP on GPUs,
    and for none on CPU (gloo has no such option) or without EP."""
    from megatron.core import parallel_state

    from omnimoe_train.distributed import high_priority_groups

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert high_priority_groups(cuda, 2) == ["ep"]
    assert high_priority_groups(cuda, 1) == [] and high_priority_groups(cpu, 2) == []
    asked = {}
    real = parallel_state.initialize_model_parallel

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        asked.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(parallel_state, "initialize_model_parallel", spy)
    init_runtime(compose_config("trainer.device=cpu"))
    shutdown_runtime()
    assert asked["high_priority_stream_groups"] == []
