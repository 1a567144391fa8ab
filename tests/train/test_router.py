"""Cartesian router: exact top-K against brute force over all N experts, and its weights."""

from __future__ import annotations

import pytest
import torch

from omnimoe_train.model.router import CartesianRouter, GateNorm, apply_running_stats


@pytest.mark.parametrize(("n", "k"), [(4, 1), (8, 5), (8, 8), (8, 20), (16, 64), (6, 36)])
def test_router_topk_equals_brute_force(n: int, k: int) -> None:
    torch.manual_seed(n * 100 + k)
    router = CartesianRouter(32, n * n, k, backend="torch").double()
    x_TD = torch.randn(50, 32, dtype=torch.float64)
    routing = router(x_TD)
    rows = torch.log_softmax(router.row_norm(x_TD @ router.row_gate_nD.t()), -1)
    cols = torch.log_softmax(router.col_norm(x_TD @ router.col_gate_nD.t()), -1)
    all_TN = (rows[:, :, None] + cols[:, None, :]).flatten(1)
    expected_scores, expected_idx = all_TN.topk(k, dim=-1)
    expected_w = torch.softmax(expected_scores, -1)
    # Compare in ascending expert-id order, whatever order each side returns.
    ids, perm = routing.indices_TK.sort(-1)
    expected_ids, expected_perm = expected_idx.sort(-1)
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(
        routing.weights_TK.gather(-1, perm), expected_w.gather(-1, expected_perm)
    )


def test_router_weight_modes_and_gradients() -> None:
    torch.manual_seed(0)
    x_TD = torch.randn(40, 16, requires_grad=True)
    soft = CartesianRouter(16, 64, 8, weights="softmax", backend="torch")
    r = soft(x_TD)
    torch.testing.assert_close(r.weights_TK.sum(-1), torch.ones(40))
    exp = CartesianRouter(16, 64, 8, weights="exp", backend="torch")
    exp.load_state_dict(soft.state_dict())
    e = exp(x_TD)
    assert torch.equal(e.indices_TK, r.indices_TK)
    assert (e.weights_TK.sum(-1) < 1).all()  # product probabilities of 8 of 64 experts
    (r.weights_TK * torch.randn_like(r.weights_TK)).sum().backward()
    assert soft.row_gate_nD.grad.abs().sum() > 0 and soft.col_gate_nD.grad.abs().sum() > 0
    assert x_TD.grad.abs().sum() > 0


def test_router_entropy_is_product_entropy() -> None:
    router = CartesianRouter(8, 16, 2, norm="none", backend="torch")
    with torch.no_grad():
        router.row_gate_nD.zero_()
        router.col_gate_nD.zero_()
    r = router(torch.randn(3, 8))
    torch.testing.assert_close(r.entropy_T, torch.full((3,), 2 * torch.log(torch.tensor(4.0))))


def test_gate_norm_matches_batchnorm_without_affine() -> None:
    torch.manual_seed(1)
    ours, ref = GateNorm(5), torch.nn.BatchNorm1d(5, affine=False)
    z = torch.randn(64, 5) * 3 + 1
    torch.testing.assert_close(ours(z), ref(z))
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(z), ref(z))
    ours.train()
    assert ours(torch.randn(0, 5)).shape == (0, 5)  # an empty batch is a no-op


def test_deferred_running_stats_equal_immediate_ones() -> None:
    """Recording micro-batch statistics and applying them at the end of the step (one process,
    no group) gives the running statistics of the immediate per-micro-batch update, bitwise."""
    torch.manual_seed(3)
    immediate, deferred = GateNorm(6), GateNorm(6)
    deferred.pending = []
    for _ in range(3):  # steps
        for _ in range(4):  # micro-batches
            z = torch.randn(10, 6) * 3 + 1
            immediate(z)
            deferred(z)
        assert not torch.equal(deferred.running_mean, immediate.running_mean)
        apply_running_stats([deferred], None)
        assert deferred.pending == []
        assert torch.equal(deferred.running_mean, immediate.running_mean)
        assert torch.equal(deferred.running_var, immediate.running_var)


@pytest.mark.parametrize("kind", ["cartesian", "dense"])
def test_routers_promise_distinct_ids_and_keep_it(kind: str) -> None:
    """Both routers set ``Routing.distinct_ids`` (the expert kernels' dense weight-gradient
    path then skips merging repeats) and ``ascending_ids`` (the rows layout's pair ranges),
    and their ids keep both promises, even with ties."""
    from omnimoe_train.model.router import DenseRouter

    torch.manual_seed(3)
    n, k = 6, 20
    cls = CartesianRouter if kind == "cartesian" else DenseRouter
    router = cls(16, n * n, k, **({"backend": "torch"} if kind == "cartesian" else {}))
    x_TD = torch.randn(40, 16)
    x_TD[:5] = 0.0  # equal scores: ties everywhere in these tokens
    routing = router(x_TD)
    assert routing.distinct_ids and routing.ascending_ids
    ids = routing.indices_TK  # as returned: strictly ascending = ascending and distinct
    assert bool((ids[:, 1:] > ids[:, :-1]).all())


def test_product_key_routing_does_not_promise_distinct_ids() -> None:
    """PEER/PKM heads search the same slots independently (shared keys: identical heads pick
    identical slots), so a token's row repeats ids: the routing must not set ``distinct_ids``
    (the dense weight-gradient path would keep one pair of each repeat)."""
    from omnimoe_train.model.product_keys import ProductKeyRouter

    torch.manual_seed(0)
    router = ProductKeyRouter(16, 16, 3, 2, 8, shared_keys=True, backend="torch")
    with torch.no_grad():  # both heads' queries equal: every token lists its 3 slots twice
        router.query_qD[8:] = router.query_qD[:8]
    routing = router(torch.randn(10, 16))
    assert not routing.distinct_ids and not routing.ascending_ids
    ids = routing.indices_TK.sort(-1).values
    assert bool((ids[:, 1:] == ids[:, :-1]).any(-1).all())
