"""The PyTorch reference (the semantics every backend is held to) against naive definitions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_test_utils import documented_topk_ids, nonfinite_router_inputs

from omnimoe_kernels.reference import (
    atomic_experts_reference,
    cartesian_topk_reference,
    rank_values,
)


def _naive_atomic_experts(x_TD, up_ND, down_ND, w_TK, idx_TK):  # noqa: ANN001, ANN202
    """Token by token, expert by expert: the formula as written."""
    rows = []
    for t in range(x_TD.shape[0]):
        y_D = torch.zeros_like(x_TD[t])
        for k in range(idx_TK.shape[1]):
            e = idx_TK[t, k]
            y_D = y_D + w_TK[t, k] * F.silu(up_ND[e] @ x_TD[t]) * down_ND[e]
        rows.append(y_D)
    return torch.stack(rows) if rows else x_TD.new_zeros(x_TD.shape)


@pytest.mark.parametrize(
    ("T", "D", "N", "K"), [(7, 5, 9, 1), (13, 8, 16, 4), (5, 3, 4, 4), (0, 4, 9, 2)]
)
def test_reference_matches_naive_forward_and_gradients(T: int, D: int, N: int, K: int) -> None:
    g = torch.Generator().manual_seed(T * 31 + K)
    leaves = [
        torch.randn(T, D, generator=g, dtype=torch.float64),
        torch.randn(N, D, generator=g, dtype=torch.float64),
        torch.randn(N, D, generator=g, dtype=torch.float64),
        torch.rand(T, K, generator=g, dtype=torch.float64),
    ]
    idx = (
        torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(T)])
        if T
        else torch.zeros(0, K, dtype=torch.long)
    )
    a = [t.clone().requires_grad_() for t in leaves]
    b = [t.clone().requires_grad_() for t in leaves]
    y_ref = atomic_experts_reference(*a, idx)
    y_naive = _naive_atomic_experts(*b, idx)
    torch.testing.assert_close(y_ref, y_naive)
    dy = torch.randn(T, D, generator=g, dtype=torch.float64)
    (y_ref * dy).sum().backward()
    if T == 0:  # no pairs: every gradient is zero (and the naive loop has no graph at all)
        assert y_ref.shape == (0, D)
        assert all(p.grad is None or not p.grad.any() for p in a)
        return
    (y_naive * dy).sum().backward()
    for name, p, q in zip(("dx", "dup", "ddown", "dweights"), a, b, strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_reference_one_expert_for_every_token() -> None:
    x, up, down = torch.randn(6, 4), torch.randn(3, 4), torch.randn(3, 4)
    idx, w = torch.ones(6, 1, dtype=torch.long), torch.ones(6, 1)
    expected = F.silu(x @ up[1])[:, None] * down[1]
    torch.testing.assert_close(atomic_experts_reference(x, up, down, w, idx), expected)


@pytest.mark.parametrize(("n", "k"), [(3, 1), (5, 7), (5, 25), (8, 3)])
def test_cartesian_topk_reference_is_brute_force_with_lowest_index_ties(n: int, k: int) -> None:
    g = torch.Generator().manual_seed(n + 10 * k)
    # Few distinct values: many exact ties, which must go to the lowest expert id.
    rows = torch.randint(0, 3, (20, n), generator=g).double()
    cols = torch.randint(0, 3, (20, n), generator=g).double()
    scores, idx = cartesian_topk_reference(rows, cols, k)
    full = (rows[:, :, None] + cols[:, None, :]).flatten(1)
    ids = torch.arange(n * n, dtype=torch.float64)
    # Rank by (score desc, id asc) via a key that cannot tie.
    key = full * (n * n + 1) - ids
    expected = key.topk(k, dim=-1).indices.sort(-1).values
    assert torch.equal(idx.sort(-1).values, expected)
    torch.testing.assert_close(scores, full.gather(-1, idx))


@pytest.mark.parametrize(("n", "k"), [(8, 4), (8, 64), (76, 64), (9, 30)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cartesian_topk_reference_nonfinite_follows_the_documented_order(
    n: int, k: int, dtype: torch.dtype
) -> None:
    """NaN / +-inf: distinct ids in [0, N) in the documented order; scores the input sums."""
    rows, cols = nonfinite_router_inputs(n, dtype, seed=n + k)
    scores, ids = cartesian_topk_reference(rows, cols, k)
    assert ((ids >= 0) & (ids < n * n)).all()
    assert all(len(set(row.tolist())) == k for row in ids)
    assert torch.equal(ids, documented_topk_ids(rows, cols, k))
    sums = rows.double().gather(1, ids // n) + cols.double().gather(1, ids % n)
    torch.testing.assert_close(scores, sums.float().to(dtype), rtol=0, atol=0, equal_nan=True)
    assert scores[0].isnan().all()  # token 0's whole rows half is NaN


def test_rank_values() -> None:
    x = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 1.5])
    big = torch.finfo(torch.float32).max
    expected = torch.tensor([float("-inf"), big, float("-inf"), -0.0, 1.5])
    assert torch.equal(rank_values(x, torch.float32), expected)
