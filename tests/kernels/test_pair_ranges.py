"""Pair ranges (``combine_rows(ranges=...)``, ``atomic_experts(pair_ranges=...)``): each token's
pairs of the table in one run of its slots, tokens tiled in a given order. Against the masked
full-K combine and a float64 reference; the slots outside the ranges really are not read."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from kernel_test_utils import cpu_triton, gpu, rel_err

import omnimoe_kernels
from omnimoe_kernels import experts_pairs
from omnimoe_kernels.experts_pairs import combine_rows


def _ranged_routing(T: int, K: int, N: int, seed: int) -> tuple[torch.Tensor, ...]:
    """(idx_TK, start_T, count_T, in_TK): a random run [start, start + count) per token with
    ids in [0, N] inside (N = "no expert" may appear there too) and N outside. Token 0 has
    count 0 (in the middle of its row), token 1 count K, token 2 a run that ends at slot K."""
    gen = torch.Generator().manual_seed(seed)
    start_T = torch.randint(0, K + 1, (T,), generator=gen)
    count_T = (torch.rand(T, generator=gen) * (K - start_T + 1)).long().clamp(max=K - start_T)
    fixed = [(K // 2, 0), (0, K), (K // 3, K - K // 3)][:T]
    for t, (start, count) in enumerate(fixed):
        start_T[t], count_T[t] = start, count
    k_K = torch.arange(K)
    in_TK = (k_K >= start_T[:, None]) & (k_K < (start_T + count_T)[:, None])
    ids_TK = torch.randint(0, N + 1, (T, K), generator=gen)  # N inside a run: still skipped
    return torch.where(in_TK, ids_TK, N), start_T, count_T, in_TK


def _combine_reference(table_ND, idx_TK, coef_TK, w_TK):  # noqa: ANN001, ANN202
    """float64 sum over the pairs with id < N."""
    N, D = table_ND.shape
    c_TK = (
        coef_TK.double()
        if w_TK is None
        else w_TK.double() * torch.nn.functional.silu(coef_TK.double())
    )
    rows_TKD = torch.cat([table_ND.double(), torch.zeros(1, D, dtype=torch.float64)])[idx_TK]
    return torch.einsum("tk,tkd->td", c_TK * (idx_TK < N), rows_TKD)


SHAPES = [  # T, K, D, N
    (3, 5, 8, 4),  # the three fixed tokens only
    (37, 10, 24, 20),  # T off the 32-token tile, K off the 8-slot step
    (70, 64, 48, 30),  # K = 64 (a80m), D off the 64-column block, 3 tiles
    (33, 1, 16, 7),  # K = 1
    (40, 256, 32, 50),  # K >= 256: the wide tile
]


def _check_combine(T, K, D, N, device, seed=0) -> None:
    idx, start, count, _ = _ranged_routing(T, K, N, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    table = torch.randn(N, D, generator=gen)
    coef, w = torch.randn(T, K, generator=gen), torch.rand(T, K, generator=gen) + 0.1
    ref = {gated: _combine_reference(table, idx, coef, w if gated else None) for gated in (0, 1)}
    dev = [t.to(device) for t in (table, idx, coef, w)]
    table, idx_d, coef, w = dev
    for order in (torch.randperm(T, generator=gen), count.argsort(), torch.arange(T)):
        ranges = tuple(t.to(device, torch.int32) for t in (start, count, order))
        for gated in (False, True):
            full = torch.full((T, D), float("nan"), device=device)
            ranged = full.clone()
            combine_rows(table, idx_d, coef, full, w_TK=w if gated else None)
            combine_rows(table, idx_d, coef, ranged, w_TK=w if gated else None, ranges=ranges)
            assert rel_err(full, ref[gated]) <= 2e-6
            assert rel_err(ranged, ref[gated]) <= 2e-6, (gated, order)
            torch.testing.assert_close(ranged, full, rtol=1e-5, atol=1e-5)
            assert torch.all(ranged[(count == 0).to(device)] == 0)


@cpu_triton
@pytest.mark.parametrize(("T", "K", "D", "N"), SHAPES)
def test_combine_ranges_cpu(T, K, D, N) -> None:
    _check_combine(T, K, D, N, "cpu")


@gpu[0]
@gpu[1]
@pytest.mark.parametrize(("T", "K", "D", "N"), [*SHAPES, (4099, 64, 768, 2889)])
def test_combine_ranges_gpu(T, K, D, N) -> None:
    _check_combine(T, K, D, N, "cuda")


@cpu_triton
def test_combine_ranges_read_only_the_ranges(monkeypatch: pytest.MonkeyPatch) -> None:
    """Real ids outside the ranges (a broken contract) are left out: the kernel does not walk
    the other slots. Also with a one-token tile and a two-slot step (many tiles and steps)."""
    T, K, D, N = 19, 12, 16, 9
    idx, start, count, in_TK = _ranged_routing(T, K, N, seed=4)
    gen = torch.Generator().manual_seed(5)
    outside = torch.randint(0, N, (T, K), generator=gen)
    idx_broken = torch.where(in_TK, idx, outside)
    table, coef = torch.randn(N, D, generator=gen), torch.randn(T, K, generator=gen)
    ranges = tuple(t.to(torch.int32) for t in (start, count, torch.randperm(T, generator=gen)))
    for tile in (None, (1, 2, 16, 1)):
        monkeypatch.setattr(experts_pairs, "COMBINE_TILE", tile)
        out = torch.empty(T, D)
        combine_rows(table, idx_broken, coef, out, ranges=ranges)
        assert rel_err(out, _combine_reference(table, idx, coef, None)) <= 2e-6
        full = torch.empty(T, D)
        combine_rows(table, idx_broken, coef, full)
        assert rel_err(full, _combine_reference(table, idx_broken, coef, None)) <= 2e-6


@cpu_triton
def test_combine_ranges_clamped_into_the_row() -> None:
    """A range past the row's end (or starting before it) reads only the row's own slots."""
    T, K, D, N = 4, 6, 8, 5
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, N, (T, K), generator=gen)
    table, coef = torch.randn(N, D, generator=gen), torch.randn(T, K, generator=gen)
    start = torch.tensor([4, -3, 0, 7], dtype=torch.int32)
    count = torch.tensor([50, 5, K, 3], dtype=torch.int32)
    out = torch.empty(T, D)
    combine_rows(table, idx, coef, out, ranges=(start, count, torch.arange(T, dtype=torch.int32)))
    keep = torch.zeros(T, K, dtype=torch.bool)
    keep[0, 4:], keep[1, :5], keep[2, :] = True, True, True
    ref = _combine_reference(table, torch.where(keep, idx, N), coef, None)
    assert rel_err(out, ref) <= 2e-6


def _check_experts(T, D, N, K, device, grad_path, sort_forward=False, seed=0) -> None:
    """atomic_experts with the ranges equals the call without: y and dx to rounding (the
    combines sum the same pairs in other groups), the table and weight gradients bitwise
    (the ranges do not reach their kernels). ``sort_forward``: the forward's expert order is
    saved for the backward next to the ranges (the rows layout's case)."""
    idx, start, count, _ = _ranged_routing(T, K, N, seed)
    gen = torch.Generator().manual_seed(seed + 2)
    leaves = [
        torch.randn(T, D, generator=gen),
        torch.randn(N, D, generator=gen) / D**0.5,
        torch.randn(N, D, generator=gen),
        torch.rand(T, K, generator=gen) + 0.1,
    ]
    gy = torch.randn(T, D, generator=gen).to(device)
    ranges = tuple(t.to(device, torch.int32) for t in (start, count, count.argsort()))
    got = {}
    for name, pair_ranges in (("full", None), ("ranges", ranges)):
        inputs = [v.to(device).requires_grad_() for v in leaves]
        y = omnimoe_kernels.atomic_experts(
            *inputs, idx.to(device), backend="triton", grad_path=grad_path,
            pair_ranges=pair_ranges, sort_forward=sort_forward,
        )  # fmt: skip
        got[name] = [y, *torch.autograd.grad(y, inputs, gy)]
    names = ("y", "dx", "dup", "ddown", "dw")
    for name, a, b in zip(names, got["ranges"], got["full"], strict=True):
        if name in ("y", "dx"):
            assert rel_err(a, b) <= 1e-6, name
        else:
            assert torch.equal(a, b), name
    leaves64 = [v.double().requires_grad_() for v in leaves]
    y64 = omnimoe_kernels.atomic_experts(*leaves64, idx, backend="torch", pair_ranges=None)
    grads64 = torch.autograd.grad(y64, leaves64, gy.cpu().double())
    for name, a, b in zip(names, got["ranges"], [y64, *grads64], strict=True):
        if name != "dw":  # dw of a "no expert" pair: 0 here, silu(h) in the reference
            assert rel_err(a, b) <= 2e-5, name


@cpu_triton
@pytest.mark.parametrize("sort_forward", [False, True], ids=["token_order", "expert_order"])
@pytest.mark.parametrize("grad_path", ["pairs", "dense"])
@pytest.mark.parametrize(("T", "D", "N", "K"), [(37, 24, 20, 10), (9, 16, 6, 4)])
def test_atomic_experts_pair_ranges_cpu(T, D, N, K, grad_path, sort_forward) -> None:
    _check_experts(T, D, N, K, "cpu", grad_path, sort_forward)


@gpu[0]
@gpu[1]
@pytest.mark.parametrize("grad_path", ["pairs", "dense"])
def test_atomic_experts_pair_ranges_gpu(grad_path) -> None:
    _check_experts(4096, 256, 2888, 64, "cuda", grad_path, sort_forward=True)


def test_reference_backend_ignores_the_ranges() -> None:
    """The reference skips "no expert" pairs anyway: the ranges change nothing there."""
    T, D, N, K = 11, 8, 7, 5
    idx, start, count, _ = _ranged_routing(T, K, N, seed=6)
    x, up, down = torch.randn(T, D), torch.randn(N, D), torch.randn(N, D)
    w = torch.rand(T, K)
    ranges = tuple(t.to(torch.int32) for t in (start, count, count.argsort()))
    a = omnimoe_kernels.atomic_experts(x, up, down, w, idx, backend="torch")
    b = omnimoe_kernels.atomic_experts(x, up, down, w, idx, backend="torch", pair_ranges=ranges)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("ranges", "match"),
    [
        ((torch.zeros(4, dtype=torch.int32),) * 2, "the 3 tensors"),
        ((torch.zeros(4, dtype=torch.int64),) * 3, r"start_T must be int32 \(4,\)"),
        (
            (torch.zeros(4, dtype=torch.int32),) * 2 + (torch.zeros(5, dtype=torch.int32),),
            "order_T",
        ),
        ((torch.zeros(4, dtype=torch.int32), None, torch.zeros(4, dtype=torch.int32)), "count_T"),
    ],
)
def test_pair_ranges_of_the_wrong_form_are_refused(ranges, match) -> None:
    x, table, w = torch.randn(4, 8), torch.randn(5, 8), torch.rand(4, 3)
    idx = torch.zeros(4, 3, dtype=torch.int64)
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match=match):
            omnimoe_kernels.atomic_experts(
                x, table, table, w, idx, backend=backend, pair_ranges=ranges
            )


@cpu_triton
def test_bench_combine_ranges_runs_on_cpu() -> None:
    """``bench_combine_ranges`` (``bench_kernels.py --only combine_ranges``) at a tiny shape,
    each timed call run once: every key filled, the ranged combines equal the masked ones to
    bf16 rounding, and sorting the tokens by count shortens the tiles' walks."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import bench_combine_ranges

    def once(fn) -> float:  # noqa: ANN001
        fn(0)
        return 0.0

    row = bench_combine_ranges.bench_combine_ranges(64, 2, 16, 6, 8, once, device="cpu")
    bench_combine_ranges.print_table([row])
    assert (row["G"], row["E"], row["K"]) == (128, 18, 8)
    assert row["rank0_count_mean"] + row["rank1_count_mean"] == pytest.approx(8)
    for rank in (0, 1):
        p = f"rank{rank}_"
        assert row[p + "tile_max_sorted"] <= row[p + "tile_max_consecutive"]
        for form in ("fwd", "dx"):
            assert row[f"{p}{form}_max_abs_diff"] <= 0.05, (rank, form, row)
