"""What the OmniMoE layer keeps for its backward, bounded by the tensors it is meant to keep.

The bounds are byte counts of named tensors computed from the shapes (the GPU path's autograd
functions, run here through Triton's interpreter, save exactly what they save on the GPU), so a
new saved tensor, a wider dtype or a copy where a view was saved makes these fail.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from kernel_test_utils import cpu_triton
from torch import nn

import omnimoe_kernels
import omnimoe_kernels.experts_autograd as experts_autograd
from omnimoe_train.model.saved_tensors import counted_bytes, saved_for_backward
from tests.train.conftest import TINY_MODEL, compose_config

F32, I64, I16 = 4, 8, 2


@cpu_triton
@pytest.mark.parametrize("sorted_forward", [False, True])
def test_atomic_experts_saves_weights_ids_and_scores_only(
    sorted_forward: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Besides x and the tables: the routing weights, the ids and h (fp32), plus the expert
    order (int16 keys, int64 positions) when the forward sorted (tables above L2)."""
    if sorted_forward:
        monkeypatch.setattr(experts_autograd, "L2_TABLE_BYTES", 0)
    T, D, N, K = 24, 32, 64, 4
    tables = nn.ParameterList([nn.Parameter(torch.randn(N, D) / D**0.5) for _ in range(2)])
    x = torch.randn(T, D, requires_grad=True)
    scores = torch.randn(T, K, requires_grad=True)
    idx = torch.randint(0, N, (T, K))

    def forward() -> torch.Tensor:
        w = torch.softmax(scores, dim=-1)
        return omnimoe_kernels.atomic_experts(x, *tables, w, idx, backend="triton")

    out, rows = saved_for_backward(forward, tables, [x, scores])
    bound = T * K * F32 + idx.nbytes + T * K * F32  # weights, ids, h
    if sorted_forward:
        bound += T * K * (I16 + I64)
    assert counted_bytes(rows) == bound, rows
    # The softmax here is the test's own ("other"); everything else is the experts'.
    assert {r.stage for r in rows if r.counted} <= {"experts", "other"}, rows
    out.sum().backward()  # the saved tensors are the ones the backward reads
    assert x.grad is not None and scores.grad is not None


@pytest.fixture(scope="module")
def one_rank() -> Iterator[None]:
    from omnimoe_train.distributed import init_runtime, shutdown_runtime

    init_runtime(compose_config("trainer.device=cpu"))
    yield
    shutdown_runtime()


@cpu_triton
def test_omnimoe_layer_saves_no_more_than_its_named_tensors(one_rank: None) -> None:
    """Per stage, with T tokens, n = sqrt(N), G = 2 gates, F the shared width:

    router gates   the gates concatenated (Gn, D) fp32, z and log-probs (T, Gn) fp32, rstd
    top-K          ids (T, K) int64
    weights        softmax output (T, K) fp32 (the experts save the same storage)
    experts        h (T, K) fp32 (x, the ids and the weights are the tensors above)
    shared SwiGLU  megatron-core's unfused GLU: fc1 output (T, 2F), silu(a) and b + offset
                   (T, F) each, and fc2's input (T, F), in the model dtype
    """
    from omnimoe_train.model.gpt import omnimoe_settings, transformer_config
    from omnimoe_train.model.omnimoe_layer import OmniMoEMLP

    cfg = compose_config(*TINY_MODEL, "model.expert_backend=triton", "trainer.device=cpu")
    layer = OmniMoEMLP(transformer_config(cfg, bf16=False), omnimoe_settings(cfg.model)).train()
    m = cfg.model
    S, B, D, K, F = 16, 2, m.hidden_size, m.top_k, m.ffn_hidden_size
    T, Gn = S * B, 2 * layer.router.n
    hidden = torch.randn(S, B, D, requires_grad=True)
    out, rows = saved_for_backward(lambda: layer(hidden)[0], layer, [hidden])
    elem = hidden.element_size()
    bounds = {
        "router gates": Gn * D * F32 + 2 * T * Gn * F32 + Gn * F32,
        "top-K": T * K * I64,
        "routing weights": T * K * F32,
        "experts": T * K * F32,
        "shared SwiGLU": 5 * T * F * elem,
    }
    rows = [r for r in rows if r.counted]
    for r in rows:
        r.stage = "shared SwiGLU" if r.stage == "SwiGLU" else r.stage
    assert {r.stage for r in rows} <= set(bounds), rows
    for stage, bound in bounds.items():
        assert counted_bytes(rows, (stage,)) <= bound, (stage, rows)
    out.sum().backward()
    assert hidden.grad is not None and layer.up_ND.grad is not None
