"""The paper's Table 3 ablation switches of the OmniMoE layer against the full layer.

- dense router (``model.router=dense``): with the gate ``W[i*n + j] = W_row[i] + W_col[j]`` and no
  norm, its scores are the Cartesian scores; when K covers all N experts both layers compute the
  same output and the same gradients (the dense gate's gradient summed over a row or a column is
  the Cartesian gate's). Its own top-K is checked against brute force.
- token-centric execution (``model.execution=token``): the per-token gather gives the output and
  every gradient of the expert-centric path.
"""

from __future__ import annotations

import pytest
import torch

import omnimoe_kernels
from omnimoe_train.model.gpt import mlp_builder, transformer_config
from omnimoe_train.model.router import DenseRouter
from tests.train.conftest import compose_config

D, N = 16, 16  # n = 4


def _layer(*overrides: str):  # noqa: ANN202
    cfg = compose_config(
        "model.hidden_size=16",
        "model.num_attention_heads=2",
        "model.ffn_hidden_size=24",
        f"model.num_experts={N}",
        "model.expert_backend=torch",
        *overrides,
    )
    config = transformer_config(cfg, bf16=False)
    return mlp_builder(cfg.model)(config=config).double()


def _run(layer, x_SBD: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # noqa: ANN001
    x = x_SBD.clone().requires_grad_()
    y, _ = layer(x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    return y.detach(), {"x": x.grad, **grads}


def test_cartesian_router_equals_dense_router_when_k_covers_all(single_rank: None) -> None:
    torch.manual_seed(0)
    common = ("model.router_norm=none", f"model.top_k={N}")
    cart = _layer(*common)
    dense = _layer(*common, "model.router=dense")
    with torch.no_grad():
        for name in ("shared.linear_fc1.weight", "shared.linear_fc2.weight", "up_ND", "down_ND"):
            dense.get_parameter(name).copy_(cart.get_parameter(name))
        row, col = cart.router.row_gate_nD, cart.router.col_gate_nD
        dense.router.gate_ND.copy_((row[:, None, :] + col[None, :, :]).reshape(N, D))
    x = torch.randn(5, 3, D, dtype=torch.float64)
    y_c, g_c = _run(cart, x)
    y_d, g_d = _run(dense, x)
    torch.testing.assert_close(y_d, y_c)
    for name in ("x", "shared.linear_fc1.weight", "up_ND", "down_ND"):
        torch.testing.assert_close(g_d[name], g_c[name], msg=name)
    g_dense = g_d["router.gate_ND"].view(4, 4, D)
    torch.testing.assert_close(g_dense.sum(1), g_c["router.row_gate_nD"])
    torch.testing.assert_close(g_dense.sum(0), g_c["router.col_gate_nD"])
    # The same experts and entropy also when K is smaller (the scores are the same).
    cart.router.top_k = dense.router.top_k = 5
    flat = x.reshape(-1, D)
    r_c, r_d = cart.router(flat), dense.router(flat)
    assert torch.equal(r_c.indices_TK, r_d.indices_TK)
    torch.testing.assert_close(r_d.weights_TK, r_c.weights_TK)
    torch.testing.assert_close(r_d.entropy_T, r_c.entropy_T)


@pytest.mark.parametrize("norm", ["batchnorm", "none"])
def test_dense_router_topk_equals_brute_force(norm: str) -> None:
    torch.manual_seed(3)
    router = DenseRouter(12, 49, 6, norm=norm).double()
    x = torch.randn(30, 12, dtype=torch.float64)
    r = router(x)
    z = x @ router.gate_ND.t()
    if norm == "batchnorm":
        z = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)
    logp = torch.log_softmax(z, -1)
    scores, idx = logp.sort(-1, descending=True)
    expected_ids, perm = idx[:, :6].sort(-1)
    assert torch.equal(r.indices_TK, expected_ids)
    torch.testing.assert_close(r.weights_TK, torch.softmax(scores[:, :6].gather(-1, perm), -1))
    torch.testing.assert_close(r.entropy_T, -(logp.exp() * logp).sum(-1))


def test_token_centric_equals_expert_centric(single_rank: None) -> None:
    torch.manual_seed(1)
    expert = _layer("model.top_k=5")
    token = _layer("model.top_k=5", "model.execution=token")
    token.load_state_dict(expert.state_dict())
    x = torch.randn(6, 2, D, dtype=torch.float64)
    y_e, g_e = _run(expert, x)
    y_t, g_t = _run(token, x)
    torch.testing.assert_close(y_t, y_e)
    assert g_t.keys() == g_e.keys()
    for name in g_e:
        torch.testing.assert_close(g_t[name], g_e[name], msg=name)


def test_gather_op_equals_reference_with_repeated_experts() -> None:
    g = torch.Generator().manual_seed(2)
    T, Dm, Nm, K = 9, 7, 10, 6
    leaves = [
        torch.randn(T, Dm, generator=g, dtype=torch.float64),
        torch.randn(Nm, Dm, generator=g, dtype=torch.float64),
        torch.randn(Nm, Dm, generator=g, dtype=torch.float64),
        torch.rand(T, K, generator=g, dtype=torch.float64),
    ]
    idx = torch.randint(0, Nm, (T, K), generator=g)  # repeats within a token (PEER heads)
    idx[0, :2] = 3
    a = [t.clone().requires_grad_() for t in leaves]
    b = [t.clone().requires_grad_() for t in leaves]
    dy = torch.randn(T, Dm, generator=g, dtype=torch.float64)
    y_ref = omnimoe_kernels.atomic_experts_reference(*a, idx)
    y_tok = omnimoe_kernels.atomic_experts_gather(*b, idx)
    torch.testing.assert_close(y_tok, y_ref)
    (y_ref * dy).sum().backward()
    (y_tok * dy).sum().backward()
    for pa, pb in zip(a, b, strict=True):
        torch.testing.assert_close(pb.grad, pa.grad)
