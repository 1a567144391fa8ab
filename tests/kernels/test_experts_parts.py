"""The column-slice parts of the atomic-expert layer (``experts_parts``): Triton against the
PyTorch path in float64, and the parts composed equal ``atomic_experts``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_test_utils import cpu_triton, gpu, rel_err

import omnimoe_kernels
import omnimoe_kernels.experts_autograd as experts_autograd
from omnimoe_kernels import experts_parts

SHAPES = [  # T, D, N, K
    (7, 16, 12, 3),
    (13, 40, 5, 6),  # every expert hit many times; T, D off-tile
    (1, 8, 64, 1),
    (0, 16, 8, 4),  # no tokens
]


def _inputs(T, D, N, K, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=gen)
    dy = torch.randn(T, D, generator=gen)
    up = torch.randn(N, D, generator=gen)
    down = torch.randn(N, D, generator=gen)
    idx = torch.randint(0, N, (T, K), generator=gen)
    g = torch.randn(T, K, generator=gen)  # also used as the score h and as da
    w = torch.rand(T, K, generator=gen) + 0.1
    return [t.to(device) for t in (x, dy, up, down, idx, g, w)]


def _run(tensors, backend, grad_path="auto"):
    x, dy, up, down, idx, g, w = tensors
    dtype = x.dtype
    h = g.flip(0)
    return {
        "h": experts_parts.pair_dots(x, up, idx, backend=backend),
        "out": experts_parts.combine(down, idx, g, out_dtype=dtype, backend=backend),
        "gated": experts_parts.combine(down, idx, h, gate_TK=w, out_dtype=dtype, backend=backend),
        "grads": experts_parts.table_grads(
            x, dy, idx, g, h, w, down.shape[0], dtype=dtype, backend=backend, grad_path=grad_path
        ),
        "silu": experts_parts.silu_grads(g, h, w, backend=backend),
    }


def _check(T, D, N, K, device, grad_path="auto") -> None:
    tensors = _inputs(T, D, N, K, device)
    got = _run(tensors, "triton", grad_path)
    ref = _run([t.cpu().double() if t.is_floating_point() else t.cpu() for t in tensors], "torch")
    assert got["h"].dtype == torch.float32 and got["h"].shape == (T, K)
    assert got["out"].shape == (T, D) and got["grads"][0].shape == (N, D)
    if T == 0:
        assert all(t.abs().sum() == 0 for t in got["grads"])
        return
    for name in ("h", "out", "gated"):
        assert rel_err(got[name], ref[name]) <= 2e-6, name
    for name, a, b in zip(
        ("dup", "ddown", "g", "dw"), got["grads"] + got["silu"], ref["grads"] + ref["silu"]
    ):
        assert rel_err(a, b) <= 2e-6, name


def test_torch_parts_match_definitions() -> None:
    """The PyTorch path against a dense einsum reading of the definitions (float64)."""
    x, dy, up, down, idx, g, w = _inputs(9, 12, 10, 4, "cpu", seed=3)
    x, dy, up, down, g, w = (t.double() for t in (x, dy, up, down, g, w))
    h = g.flip(0)
    a = w * F.silu(h)
    onehot_TKN = F.one_hot(idx, 10).double()
    torch.testing.assert_close(
        experts_parts.pair_dots(x, up, idx, backend="torch"),
        torch.einsum("td,tkn,nd->tk", x, onehot_TKN, up),
    )
    torch.testing.assert_close(
        experts_parts.combine(down, idx, a, out_dtype=torch.float64, backend="torch"),
        torch.einsum("tk,tkn,nd->td", a, onehot_TKN, down),
    )
    torch.testing.assert_close(
        experts_parts.combine(down, idx, h, gate_TK=w, out_dtype=torch.float64, backend="torch"),
        torch.einsum("tk,tkn,nd->td", a, onehot_TKN, down),
    )
    dup, ddown = experts_parts.table_grads(
        x, dy, idx, g, h, w, 10, dtype=torch.float64, backend="torch"
    )
    torch.testing.assert_close(dup, torch.einsum("tk,tkn,td->nd", g, onehot_TKN, x))
    torch.testing.assert_close(ddown, torch.einsum("tk,tkn,td->nd", a, onehot_TKN, dy))
    # silu_grads: autograd through a = w * silu(h) with upstream da = g.
    h_, w_ = h.clone().requires_grad_(), w.clone().requires_grad_()
    dh, dw = torch.autograd.grad(w_ * F.silu(h_), (h_, w_), g)
    g_out, dw_out = experts_parts.silu_grads(g, h, w, backend="torch")
    torch.testing.assert_close(g_out, dh)
    torch.testing.assert_close(dw_out, dw)


def test_parts_compose_to_atomic_experts() -> None:
    """combine(down, idx, pair_dots(x, up, idx), gate=w) is the layer's forward."""
    x, _, up, down, idx, _, w = _inputs(11, 16, 20, 5, "cpu", seed=4)
    h = experts_parts.pair_dots(x, up, idx, backend="torch")
    y = experts_parts.combine(down, idx, h, gate_TK=w, out_dtype=torch.float32, backend="torch")
    ref = omnimoe_kernels.atomic_experts(x, up, down, w, idx, backend="torch")
    assert rel_err(y, ref) <= 1e-6


def _blocks_into_out(backend: str) -> None:
    """pair_dots and combine written block by block into row slices of one buffer (``out``,
    what the ``dim`` layout's pipelined all-reduces do) equal the whole-batch calls."""
    x, _, up, down, idx, g, w = _inputs(13, 16, 20, 5, "cpu", seed=5)
    h_whole = experts_parts.pair_dots(x, up, idx, backend=backend)
    y_whole = experts_parts.combine(down, idx, g, gate_TK=w, out_dtype=x.dtype, backend=backend)
    h, y = torch.full_like(h_whole, float("nan")), torch.full_like(y_whole, float("nan"))
    for b in (slice(0, 7), slice(7, 13)):
        got = experts_parts.pair_dots(x[b], up, idx[b], backend=backend, out=h[b])
        assert got.data_ptr() == h[b].data_ptr()
        experts_parts.combine(
            down, idx[b], g[b], gate_TK=w[b], out_dtype=x.dtype, backend=backend, out=y[b]
        )
    assert torch.equal(h, h_whole) and torch.equal(y, y_whole)
    with pytest.raises(ValueError, match="contiguous"):
        experts_parts.pair_dots(x, up, idx, backend=backend, out=h.t().contiguous().t())
    with pytest.raises(ValueError, match="contiguous"):
        experts_parts.combine(down, idx, g, out_dtype=x.dtype, backend=backend, out=y[:, :4])


def test_parts_write_into_out_torch() -> None:
    _blocks_into_out("torch")


@cpu_triton
def test_parts_write_into_out_triton_cpu() -> None:
    _blocks_into_out("triton")


@cpu_triton
@pytest.mark.parametrize("sorted_walk", [False, True], ids=["token_order", "expert_order"])
@pytest.mark.parametrize(("T", "D", "N", "K"), SHAPES)
def test_parts_cpu(monkeypatch, sorted_walk, T, D, N, K) -> None:
    if sorted_walk:
        monkeypatch.setattr(experts_autograd, "L2_TABLE_BYTES", 0)
    _check(T, D, N, K, "cpu")


@cpu_triton
@pytest.mark.parametrize(("T", "D", "N", "K"), SHAPES)
def test_parts_dense_table_grads_cpu(T, D, N, K) -> None:
    """``table_grads`` by the dense GEMMs (the ``dim`` layout's path at small N)."""
    _check(T, D, N, K, "cpu", grad_path="dense")


@gpu[0]
@gpu[1]
@pytest.mark.parametrize("grad_path", ["pairs", "dense"])
@pytest.mark.parametrize(("T", "D", "N", "K"), [(8192, 384, 5776, 64), (4096, 512, 262144, 16)])
def test_parts_gpu(T, D, N, K, grad_path) -> None:
    _check(T, D, N, K, "cuda", grad_path)
