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
    g = torch.randn(T, K, generator=gen)
    a = torch.randn(T, K, generator=gen)
    return [t.to(device) for t in (x, dy, up, down, idx, g, a)]


def _check(T, D, N, K, device) -> None:
    x, dy, up, down, idx, g, a = _inputs(T, D, N, K, device)
    h = experts_parts.pair_dots(x, up, idx, backend="triton")
    out = experts_parts.combine(down, idx, a, out_dtype=torch.float32, backend="triton")
    dup, ddown = experts_parts.table_grads(
        x, dy, idx, g, a, N, dtype=torch.float32, backend="triton"
    )
    cpu = [t.cpu() for t in (x, dy, up, down, idx, g, a)]
    x64, dy64, up64, down64, idx64, g64, a64 = [
        t.double() if t.is_floating_point() else t for t in cpu
    ]
    h64 = experts_parts.pair_dots(x64, up64, idx64, backend="torch")
    out64 = experts_parts.combine(down64, idx64, a64, out_dtype=torch.float64, backend="torch")
    dup64, ddown64 = experts_parts.table_grads(
        x64, dy64, idx64, g64, a64, N, dtype=torch.float64, backend="torch"
    )
    assert h.dtype == torch.float32 and h.shape == (T, K)
    assert out.shape == (T, D) and dup.shape == ddown.shape == (N, D)
    if T == 0:
        assert dup.abs().sum() == 0 and ddown.abs().sum() == 0
        return
    for name, got, want in (
        ("h", h, h64),
        ("out", out, out64),
        ("dup", dup, dup64),
        ("ddown", ddown, ddown64),
    ):
        assert rel_err(got, want) <= 2e-6, name


def test_torch_parts_match_definitions() -> None:
    """The PyTorch path against a dense einsum reading of the definitions (float64)."""
    x, dy, up, down, idx, g, a = _inputs(9, 12, 10, 4, "cpu", seed=3)
    x, dy, up, down, g, a = (t.double() for t in (x, dy, up, down, g, a))
    onehot_TKN = F.one_hot(idx, 10).double()
    torch.testing.assert_close(
        experts_parts.pair_dots(x, up, idx, backend="torch"),
        torch.einsum("td,tkn,nd->tk", x, onehot_TKN, up),
    )
    torch.testing.assert_close(
        experts_parts.combine(down, idx, a, out_dtype=torch.float64, backend="torch"),
        torch.einsum("tk,tkn,nd->td", a, onehot_TKN, down),
    )
    dup, ddown = experts_parts.table_grads(
        x, dy, idx, g, a, 10, dtype=torch.float64, backend="torch"
    )
    torch.testing.assert_close(dup, torch.einsum("tk,tkn,td->nd", g, onehot_TKN, x))
    torch.testing.assert_close(ddown, torch.einsum("tk,tkn,td->nd", a, onehot_TKN, dy))


def test_parts_compose_to_atomic_experts() -> None:
    """combine(down, idx, w * silu(pair_dots(x, up, idx))) is the layer's forward."""
    x, _, up, down, idx, _, a = _inputs(11, 16, 20, 5, "cpu", seed=4)
    w = a.abs()
    h = experts_parts.pair_dots(x, up, idx, backend="torch")
    y = experts_parts.combine(down, idx, w * F.silu(h), out_dtype=torch.float32, backend="torch")
    ref = omnimoe_kernels.atomic_experts(x, up, down, w, idx, backend="torch")
    assert rel_err(y, ref) <= 1e-6


@cpu_triton
@pytest.mark.parametrize("sorted_walk", [False, True], ids=["token_order", "expert_order"])
@pytest.mark.parametrize(("T", "D", "N", "K"), SHAPES)
def test_parts_cpu(monkeypatch, sorted_walk, T, D, N, K) -> None:
    if sorted_walk:
        monkeypatch.setattr(experts_autograd, "L2_TABLE_BYTES", 0)
    _check(T, D, N, K, "cpu")


@gpu[0]
@gpu[1]
@pytest.mark.parametrize(("T", "D", "N", "K"), [(8192, 384, 5776, 64), (4096, 512, 262144, 16)])
def test_parts_gpu(T, D, N, K) -> None:
    _check(T, D, N, K, "cuda")
