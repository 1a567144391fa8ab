"""The megatron GPT with the OmniMoE MLP: forward/backward, the spec plumbing, no host syncs."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

import omnimoe_kernels
from omnimoe_train.model.gpt import build_model, layer_spec, transformer_config
from omnimoe_train.model.omnimoe_layer import OmniMoEMLP
from tests.train.conftest import TINY_MODEL as TINY
from tests.train.conftest import compose_config


def _model(*overrides: str):
    cfg = compose_config(*TINY, *overrides)
    return cfg, build_model(cfg, transformer_config(cfg, bf16=False), vocab_size=128)


@pytest.mark.parametrize("mlp", ["omnimoe", "dense"])
def test_forward_backward(single_rank: None, mlp: str) -> None:
    torch.manual_seed(0)
    _, model = _model(f"model.mlp={mlp}")
    tokens = torch.randint(0, 128, (3, 16))
    pos = torch.arange(16).expand(3, 16)
    losses = model(tokens, pos, None, labels=tokens)
    assert losses.shape == (3, 16) and torch.isfinite(losses).all()
    losses.mean().backward()
    missing = [
        n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0
    ]
    assert missing == []
    has_omni = any(isinstance(m, OmniMoEMLP) for m in model.modules())
    assert has_omni == (mlp == "omnimoe")


def test_spec_uses_omnimoe_and_tied_embeddings(single_rank: None) -> None:
    cfg, model = _model()
    layer = model.decoder.layers[0]
    assert isinstance(layer.mlp, OmniMoEMLP)
    assert layer.mlp.up_ND.shape == (64, 64) and layer.mlp.router.n == 8
    assert model.share_embeddings_and_output_weights
    assert layer_spec(cfg).submodules.mlp is not None
    cfg2, model2 = _model("model.shared_expert=false")
    assert model2.decoder.layers[0].mlp.shared is None


class _NoHostSync(TorchFunctionMode):
    """Fails on operations that copy device data to the host or give data-dependent shapes."""

    BANNED = {
        torch.Tensor.item,
        torch.Tensor.tolist,
        torch.Tensor.__bool__,
        torch.Tensor.nonzero,
        torch.nonzero,
        torch.unique,
        torch.Tensor.unique,
        torch.masked_select,
        torch.Tensor.masked_select,
        torch.Tensor.numpy,
        torch.bincount,
    }

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func in self.BANNED:
            raise AssertionError(f"host synchronisation: {func}")
        return func(*args, **(kwargs or {}))


def test_omnimoe_layer_forward_has_no_host_sync(single_rank: None) -> None:
    _, model = _model()
    layer = model.decoder.layers[0].mlp
    x = torch.randn(16, 2, 64)
    with _NoHostSync():
        y, bias = layer(x)
    assert y.shape == x.shape and bias is None
    # The detector itself works: a deliberate sync is caught.
    with pytest.raises(AssertionError, match="host synchronisation"), _NoHostSync():
        y.sum().item()


def test_expert_stats_accumulate_in_training_only(single_rank: None) -> None:
    _, model = _model()
    layer = model.decoder.layers[0].mlp
    layer.train()
    layer(torch.randn(8, 2, 64))
    assert layer.stats.counts_N.sum().item() == 8 * 2 * 8
    assert layer.stats.tokens.item() == 16
    layer.eval()
    layer(torch.randn(8, 2, 64))
    assert layer.stats.counts_N.sum().item() == 8 * 2 * 8


def test_expert_grad_path_reaches_the_kernels(single_rank: None) -> None:
    """``model.expert_grad_path`` forces the weight-gradient path of every call the kernels make
    (local and expert-parallel); ``auto`` (the default) leaves the choice to the cost model, also
    after a model built with a forced path (a sweep's next job)."""
    from omnimoe_kernels import experts_dense_grad

    for path, forced in (("dense", "dense"), ("pairs", "pairs"), ("auto", None)):
        _model(f"model.expert_grad_path={path}")
        assert forced == experts_dense_grad.FORCE_GRAD_PATH
        assert experts_dense_grad.choose_grad_path(
            "auto", 4, 8, 4, 2, torch.float32, torch.device("cpu")
        ) == (forced or "pairs")


def test_expert_grad_coef_reaches_the_kernels(single_rank: None) -> None:
    """``model.expert_grad_coef`` sets how the dense weight-gradient path holds coefficients
    for every model built, and the next model built with the default sets the split back."""
    from omnimoe_kernels import experts_dense_grad

    for coef in ("bf16", "split"):
        _model(f"model.expert_grad_coef={coef}")
        assert coef == experts_dense_grad.DENSE_COEF


def test_expert_grad_segment_pairs_reaches_the_kernels(single_rank: None) -> None:
    """``model.expert_grad_segment_pairs`` sets the pair kernel's split for every model built;
    the next model built with the default turns it off again."""
    from omnimoe_kernels import experts_grad_blocks

    for segment in (512, 0):
        _model(f"model.expert_grad_segment_pairs={segment}")
        assert segment == experts_grad_blocks.SEGMENT_PAIRS


class _RecordingDispatch:
    """Stands in for the layer's ``ExpertParallel``: the local op, and the keywords it got."""

    def __init__(self) -> None:
        self.kwargs: list[dict] = []

    def start(self, x_TD: torch.Tensor) -> None:
        return None

    def __call__(self, x_TD, up, down, weights_TK, indices_TK, **kwargs):  # noqa: ANN001, ANN204
        self.kwargs.append(kwargs)
        return omnimoe_kernels.atomic_experts(x_TD, up, down, weights_TK, indices_TK)


def test_layer_passes_the_routing_promises_to_the_dispatch(single_rank: None) -> None:
    """The Cartesian router's promises (distinct, ascending ids) reach the expert-parallel
    dispatch, where ascending ids let the rows layout's combines walk pair ranges."""
    _, model = _model()
    layer = model.decoder.layers[0].mlp
    layer.expert_parallel = dispatch = _RecordingDispatch()
    layer(torch.randn(8, 2, 64))
    assert len(dispatch.kwargs) == 1
    assert dispatch.kwargs[0]["distinct_ids"] and dispatch.kwargs[0]["ascending_ids"]


def test_triton_layer_counts_usage_in_the_kernels_backward() -> None:
    """The Triton path's usage counts (added by the kernel's backward off its expert sort) equal
    the router's selections: once per training selection, none for evaluation, none disabled.
    In a fresh interpreter: the Triton interpreter is chosen when the kernels are imported."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    dist_vars = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in dist_vars} | {"TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.train.usage_counts_case"],
        env=env, cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
