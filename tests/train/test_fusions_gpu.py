"""Throughput levers on a GPU (bf16, inductor): each, and all together, give the baseline's
losses over three SGD steps of a tiny model (model/fusions.py). Run by the lead on the device."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest
import torch

from tests.train.conftest import compose_config
from tests.train.fusion_helpers import sgd_losses

pytestmark = pytest.mark.gpu
# bf16 activations: a reordered reduction moves a loss by a few bf16 ulps.
RTOL = 2e-2
LIGER = importlib.util.find_spec("liger_kernel") is not None
LEVERS = {
    "fused_swiglu": ("model.fused_swiglu=true",),
    "ce_megatron": ("model.fused_cross_entropy=megatron",),
    "ce_liger": ("model.fused_cross_entropy=liger",),
    "compile": ("trainer.compile=layers",),
    "all": (
        "model.fused_swiglu=true",
        f"model.fused_cross_entropy={'liger' if LIGER else 'megatron'}",
        "trainer.compile=layers",
    ),
}


@pytest.fixture(scope="module")
def cuda_rank() -> Iterator[None]:
    from omnimoe_train.distributed import init_runtime, shutdown_runtime

    init_runtime(compose_config("trainer.device=cuda"))
    yield
    shutdown_runtime()


@pytest.mark.parametrize("mlp", ["dense", "omnimoe"])
@pytest.mark.parametrize("lever", list(LEVERS))
def test_lever_matches_baseline_on_gpu(cuda_rank: None, mlp: str, lever: str) -> None:
    if lever == "ce_liger" and not LIGER:
        pytest.skip("liger-kernel is not installed (the liger extra)")
    torch._dynamo.reset()
    run = {"device": "cuda", "bf16": True}
    baseline = sgd_losses(f"model.mlp={mlp}", **run)
    losses = sgd_losses(f"model.mlp={mlp}", *LEVERS[lever], **run)
    assert losses == pytest.approx(baseline, rel=RTOL)
    assert losses[-1] < losses[0]
