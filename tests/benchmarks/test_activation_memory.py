"""``benchmarks/activation_memory.py``: which saved tensors are scaled from the tokens run to
the micro-batch (the activations), on a tiny OmniMoE layer on the CPU."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.train.conftest import TINY_MODEL, compose_config

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import activation_memory  # noqa: E402 - the script's folder, as it imports its neighbours itself


@pytest.fixture(scope="module")
def one_rank() -> Iterator[None]:
    from omnimoe_train.distributed import init_runtime, shutdown_runtime

    init_runtime(compose_config("trainer.device=cpu"))
    yield
    shutdown_runtime()


def test_only_activations_are_scaled_even_when_tokens_divide_a_weight_dim(one_rank: None) -> None:
    """T = 8 tokens divides the router's 2n = 16 concatenated gate rows: they are the same at
    any micro-batch, so they keep their bytes; the (T, K) tensors are scaled by micro / T."""
    from omnimoe_train.model.gpt import omnimoe_settings, transformer_config
    from omnimoe_train.model.omnimoe_layer import OmniMoEMLP

    cfg = compose_config(*TINY_MODEL, "model.expert_backend=torch", "trainer.device=cpu")
    layer = OmniMoEMLP(transformer_config(cfg, bf16=False), omnimoe_settings(cfg.model)).train()
    m, T, micro = cfg.model, 8, 64
    two_n = 2 * layer.router.n
    assert two_n % T == 0  # the case the old rule (leading dim a multiple of T) mis-scaled
    torch.manual_seed(0)
    hidden = torch.randn(T, 1, m.hidden_size, requires_grad=True)
    out, rows = activation_memory.layer_rows(layer, hidden, "shared SwiGLU", micro)
    gates = [r for r in rows if r.shape == (two_n, m.hidden_size) and r.note != "parameter"]
    assert gates, rows  # the router saves its gates concatenated: not a parameter's storage
    for r in gates:
        assert r.nbytes == two_n * m.hidden_size * 4, r
    pairs = [r for r in rows if r.shape == (T, m.top_k) and r.counted]
    assert pairs, rows
    for r in pairs:
        assert r.nbytes in (micro * m.top_k * 4, micro * m.top_k * 8), r  # fp32 or int64
    out.sum().backward()  # the first forward's graph is the one kept
    assert hidden.grad is not None
