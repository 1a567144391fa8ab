"""The fused router gates (one autograd node) against the same arithmetic as PyTorch ops."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from omnimoe_train.model.router import CartesianRouter, DenseRouter, GateNorm
from tests.parallel.distributed import run_distributed


def _pair(kind: str, norm: str, dtype: torch.dtype, seed: int = 0):
    """Two routers with equal weights: the fused one and the PyTorch-ops reference."""
    torch.manual_seed(seed)
    make = {
        "cartesian": lambda: CartesianRouter(24, 49, 6, norm=norm, backend="torch"),
        "dense": lambda: DenseRouter(24, 49, 6, norm=norm),
    }[kind]
    fused, ref = make().to(dtype), make().to(dtype)
    ref.load_state_dict(fused.state_dict())
    ref.fused = False
    return fused, ref


def _grads(router, x_TD, seed: int):
    x = x_TD.clone().requires_grad_()
    routing = router(x)
    g = torch.randn(routing.weights_TK.shape, generator=torch.Generator().manual_seed(seed))
    (routing.weights_TK * g.to(routing.weights_TK)).sum().backward()
    params = {name: p.grad.clone() for name, p in router.named_parameters()}
    router.zero_grad()
    return routing, x.grad, params


@pytest.mark.parametrize("kind", ["cartesian", "dense"])
@pytest.mark.parametrize("norm", ["batchnorm", "none"])
@pytest.mark.parametrize("training", [True, False])
def test_fused_gates_equal_pytorch_ops(kind: str, norm: str, training: bool) -> None:
    fused, ref = _pair(kind, norm, torch.float64)
    fused.train(training)
    ref.train(training)
    if not training and norm == "batchnorm":  # non-trivial running statistics
        for r in (fused, ref):
            for i, m in enumerate(x for x in r.modules() if isinstance(x, GateNorm)):
                m.running_mean.fill_(0.1 * (i + 1))
                m.running_var.fill_(2.0 + i)
    x_TD = torch.randn(37, 24, dtype=torch.float64) * 2 + 0.5
    for step in range(2):  # the second step sees the updated running statistics
        a, dx_a, dp_a = _grads(fused, x_TD, seed=step)
        b, dx_b, dp_b = _grads(ref, x_TD, seed=step)
        assert torch.equal(a.indices_TK, b.indices_TK)
        torch.testing.assert_close(a.weights_TK, b.weights_TK, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(a.entropy_T, b.entropy_T, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(dx_a, dx_b, rtol=1e-10, atol=1e-14)
        for name in dp_a:
            torch.testing.assert_close(dp_a[name], dp_b[name], rtol=1e-10, atol=1e-14)
        for (name, buf_a), buf_b in zip(fused.named_buffers(), ref.buffers(), strict=True):
            torch.testing.assert_close(buf_a, buf_b, rtol=1e-12, atol=1e-14, msg=name)


def test_fused_gates_bf16_input_fp32_gradients() -> None:
    """A bf16 model: the gates run in fp32, the input gradient comes back in bf16."""
    fused, ref = _pair("cartesian", "batchnorm", torch.float32)
    x_TD = torch.randn(64, 24).bfloat16()
    a, dx_a, dp_a = _grads(fused, x_TD, seed=3)
    b, dx_b, dp_b = _grads(ref, x_TD, seed=3)
    assert dx_a.dtype == torch.bfloat16 and a.weights_TK.dtype == torch.float32
    assert torch.equal(a.indices_TK, b.indices_TK)
    torch.testing.assert_close(dx_a, dx_b)
    for name in dp_a:
        torch.testing.assert_close(dp_a[name], dp_b[name], rtol=1e-4, atol=1e-6)


def test_fused_gates_record_pending_stats() -> None:
    """With deferred statistics (the engines' mode) both paths record the same records."""
    fused, ref = _pair("cartesian", "batchnorm", torch.float64)
    for r in (fused, ref):
        for m in r.modules():
            if isinstance(m, GateNorm):
                m.pending = []
    x_TD = torch.randn(20, 24, dtype=torch.float64)
    fused(x_TD), ref(x_TD)
    got = [m.pending for m in fused.modules() if isinstance(m, GateNorm)]
    want = [m.pending for m in ref.modules() if isinstance(m, GateNorm)]
    for g, w in zip(got, want, strict=True):
        assert len(g) == len(w) == 1
        torch.testing.assert_close(g[0], w[0], rtol=1e-12, atol=1e-14)


def _stats_group_case() -> None:
    """Sequence parallelism: each rank holds a slice of the tokens; the statistics (and their
    gradients) are those of the whole micro-batch, as on one process."""
    rank = dist.get_rank()
    torch.manual_seed(0)
    x_TD = torch.randn(2 * 15, 24, dtype=torch.float64)
    single, _ = _pair("cartesian", "batchnorm", torch.float64)
    sliced, ref = _pair("cartesian", "batchnorm", torch.float64)
    for r in (sliced, ref):
        for m in r.modules():
            if isinstance(m, GateNorm):
                m.stats_group = dist.group.WORLD
    single_x = x_TD.clone().requires_grad_()
    whole = single(single_x)
    g = torch.randn(30, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    (whole.weights_TK * g).sum().backward()
    part = slice(rank * 15, (rank + 1) * 15)
    for router in (sliced, ref):
        x = x_TD[part].clone().requires_grad_()
        routing = router(x)
        torch.testing.assert_close(
            routing.weights_TK, whole.weights_TK[part].detach(), rtol=1e-12, atol=1e-15
        )
        (routing.weights_TK * g[part]).sum().backward()
        for p in router.parameters():
            dist.all_reduce(p.grad)
        router.grad_x = x.grad
    for router in (sliced, ref):
        torch.testing.assert_close(router.grad_x, single_x.grad[part], rtol=1e-10, atol=1e-14)
        for p, q in zip(router.parameters(), single.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-14)


def test_fused_gates_statistics_group_equals_one_process() -> None:
    run_distributed(_stats_group_case, 2)


@pytest.mark.gpu
def test_fused_gates_cuda_bf16_equal_pytorch_ops() -> None:
    fused, ref = _pair("cartesian", "batchnorm", torch.float32)
    fused, ref = fused.cuda(), ref.cuda()
    fused.backend = ref.backend = "triton"
    x_TD = torch.randn(4096, 24, device="cuda").bfloat16()
    a, dx_a, dp_a = _grads(fused, x_TD, seed=1)
    b, dx_b, dp_b = _grads(ref, x_TD, seed=1)
    assert torch.equal(a.indices_TK, b.indices_TK)
    torch.testing.assert_close(a.weights_TK, b.weights_TK, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx_a, dx_b)
    for name in dp_a:
        torch.testing.assert_close(dp_a[name], dp_b[name], rtol=1e-3, atol=1e-5)
