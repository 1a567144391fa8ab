"""PKM and PEER layers against brute force: every one of the n*n slots scored, top-k by a full sort.

The brute force recomputes the query BatchNorm from its definition, scores all slots of every
head as ``q_0 . key_0[i] + q_1 . key_1[j]``, keeps the k best by a full sort, and applies the
layer's formula token by token: PKM sums ``w * values[slot]``, PEER sums
``w * silu(u_e . x) * v_e``, over all heads.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from omnimoe_train.model.gpt import mlp_builder, transformer_config
from tests.train.conftest import compose_config

D, HEADS, KEY_DIM, N, K = 12, 3, 6, 25, 6  # n = 5, k = 2 per head


def _layer(mlp: str, *overrides: str):  # noqa: ANN202
    cfg = compose_config(
        f"model.mlp={mlp}",
        f"model.hidden_size={D}",
        "model.num_attention_heads=2",
        "model.ffn_hidden_size=8",
        f"model.num_experts={N}",
        f"model.top_k={K}",
        f"model.{mlp}_heads={HEADS}",
        f"model.{mlp}_key_dim={KEY_DIM}",
        "model.expert_backend=torch",
        *overrides,
    )
    return mlp_builder(cfg.model)(config=transformer_config(cfg, bf16=False)).double()


def _brute_force_routes(router, x_TD: torch.Tensor) -> list[list[tuple[list[int], torch.Tensor]]]:  # noqa: ANN001
    """Per token, per head: (slot ids in ascending order, their softmax weights)."""
    z = x_TD @ router.query_qD.t()
    q = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)
    q = q.view(x_TD.shape[0], HEADS, 2, KEY_DIM // 2)
    n = router.n
    routes = []
    for t in range(x_TD.shape[0]):
        heads = []
        for h in range(HEADS):
            keys = router.keys_Hcnq[0 if router.shared_keys else h]
            scores = torch.tensor(
                [
                    (q[t, h, 0] @ keys[0, i] + q[t, h, 1] @ keys[1, j]).item()
                    for i in range(n)
                    for j in range(n)
                ],
                dtype=torch.float64,
            )
            top, ids = scores.sort(descending=True)
            weights = torch.softmax(top[: router.k], 0)
            ids_sorted, perm = ids[: router.k].sort()
            heads.append((ids_sorted.tolist(), weights[perm]))
        routes.append(heads)
    return routes


@pytest.mark.parametrize("mlp", ["pkm", "peer"])
def test_layer_equals_brute_force(single_rank: None, mlp: str) -> None:
    torch.manual_seed(7 if mlp == "pkm" else 8)
    layer = _layer(mlp, "model.shared_expert=false")
    assert layer.router.shared_keys == (mlp == "peer")
    x_SBD = torch.randn(4, 2, D, dtype=torch.float64)
    y_SBD, _ = layer(x_SBD)
    x_TD = x_SBD.reshape(-1, D)
    routes = _brute_force_routes(layer.router, x_TD)
    routing = layer.router(x_TD)
    expected = []
    for t, heads in enumerate(routes):
        y = torch.zeros(D, dtype=torch.float64)
        for h, (ids, weights) in enumerate(heads):
            got = routing.indices_TK[t, h * layer.router.k : (h + 1) * layer.router.k]
            assert got.tolist() == ids, (t, h)
            for slot, w in zip(ids, weights, strict=True):
                if mlp == "pkm":
                    y = y + w * layer.values_ND[slot]
                else:
                    y = y + w * F.silu(layer.up_ND[slot] @ x_TD[t]) * layer.down_ND[slot]
        expected.append(y)
    torch.testing.assert_close(y_SBD.reshape(-1, D), torch.stack(expected))


@pytest.mark.parametrize("mlp", ["pkm", "peer"])
def test_every_parameter_gets_a_gradient_and_stats_count_all_heads(
    single_rank: None, mlp: str
) -> None:
    torch.manual_seed(9)
    layer = _layer(mlp)
    x = torch.randn(5, 2, D, dtype=torch.float64, requires_grad=True)
    y, _ = layer(x)
    y.square().sum().backward()
    for name, param in layer.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert layer.stats.counts_N.sum().item() == 10 * K  # every head's selections
    assert layer.stats.tokens.item() == 10
    # Entropy of a head's full n*n distribution is at most log(n*n).
    assert 0 < layer.stats.entropy_sum.item() / 10 <= torch.log(torch.tensor(float(N))).item()
