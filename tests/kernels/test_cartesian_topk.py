"""cartesian_topk (Triton) against the float64 reference: ids exactly, scores, gradients."""

from __future__ import annotations

import pytest
import torch
from kernel_test_utils import (
    assert_launched,
    cpu_triton,
    documented_topk_ids,
    gpu,
    nonfinite_router_inputs,
    rel_err,
    triton_launches,
)

import omnimoe_kernels
import omnimoe_kernels.router_topk as router_topk
from omnimoe_kernels.reference import cartesian_topk_reference


def _check(T: int, n: int, k: int, dtype: torch.dtype, device: str, ties: bool = False) -> None:
    gen = torch.Generator().manual_seed(1000 * T + 10 * n + k)
    if ties:  # few distinct values: many equal sums, so the lowest-id rule decides
        rows = torch.randint(0, 3, (T, n), generator=gen).to(dtype)
        cols = torch.randint(0, 3, (T, n), generator=gen).to(dtype)
    else:
        rows = torch.randn(T, n, generator=gen).log_softmax(-1).to(dtype)
        cols = torch.randn(T, n, generator=gen).log_softmax(-1).to(dtype)
    rows, cols = rows.to(device).requires_grad_(), cols.to(device).requires_grad_()
    with triton_launches() as launches:
        scores, ids = omnimoe_kernels.cartesian_topk(rows, cols, k, backend="triton")
    if T > 0:  # no tokens may launch nothing
        assert_launched(launches)
    r64 = rows.detach().cpu().double().requires_grad_()
    c64 = cols.detach().cpu().double().requires_grad_()
    ref_scores, ref_ids = cartesian_topk_reference(r64, c64, k)
    assert scores.shape == (T, k) and scores.dtype == dtype and ids.dtype == torch.int64
    assert torch.equal(ids.cpu(), ref_ids)
    assert rel_err(scores, ref_scores) <= (0 if dtype == torch.float32 else 4e-3)
    if T == 0:
        return
    g = torch.randn(T, k, generator=gen)
    drows, dcols = torch.autograd.grad(scores, (rows, cols), g.to(device, dtype))
    ref_drows, ref_dcols = torch.autograd.grad(ref_scores, (r64, c64), g.double())
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel_err(drows, ref_drows) <= tol and rel_err(dcols, ref_dcols) <= tol


def _special(T: int, n: int, dtype: torch.dtype, gen: torch.Generator) -> tuple:
    """-inf entries, signed zeros, and for float64 sums that round together (1e16 + c): equal
    sums of different column values, which the lowest-id rule must order by column index."""
    if dtype == torch.float64:
        rows = 1e16 * torch.randint(1, 3, (T, n), generator=gen).double()
        cols = torch.randint(0, 4, (T, n), generator=gen).double()
    else:
        pool = torch.tensor([float("-inf"), -0.0, 0.0, -1.0, -2.5])
        rows = pool[torch.randint(0, 5, (T, n), generator=gen)].to(dtype)
        cols = pool[torch.randint(0, 5, (T, n), generator=gen)].to(dtype)
    rows[:, ::7] = float("-inf")
    return rows, cols


def _check_special(T: int, n: int, k: int, dtype: torch.dtype, device: str) -> None:
    rows, cols = _special(T, n, dtype, torch.Generator().manual_seed(7 * n + k))
    with triton_launches() as launches:  # backend "auto": the fixture's TRITON_INTERPRET=1
        scores, ids = omnimoe_kernels.cartesian_topk(rows.to(device), cols.to(device), k)
    assert_launched(launches)
    ref_scores, ref_ids = cartesian_topk_reference(rows.double(), cols.double(), k)
    assert torch.equal(ids.cpu(), ref_ids)
    assert torch.equal(scores.cpu(), ref_scores.to(dtype))  # -inf == -inf; -0.0 == 0.0


CPU_CASES = [  # T, n, K, dtype
    (3, 8, 1, torch.float32),  # K = 1
    (5, 4, 16, torch.float32),  # K = n^2: every pair
    (4, 6, 20, torch.bfloat16),  # K > n
    (5, 12, 7, torch.bfloat16),  # bf16, K < n: the top-k selection path
    (7, 9, 5, torch.float32),  # T not a power of two
    (2, 96, 130, torch.float32),  # N = 96^2, K > n
    (0, 8, 3, torch.float32),  # no tokens
    (3, 37, 9, torch.float64),  # float64 keys: up to 64 selection rounds
    (2, 1024, 64, torch.float32),  # the benchmark's n: 32 values per lane in the selection
    (3, 1000, 130, torch.bfloat16),  # n not a power of two, a > 64 candidates
    (2, 1024, 64, torch.float64),  # chunked compaction of int64-keyed selections
]


@cpu_triton
@pytest.mark.parametrize(("T", "n", "k", "dtype"), CPU_CASES)
def test_cartesian_topk_cpu(T: int, n: int, k: int, dtype: torch.dtype) -> None:
    _check(T, n, k, dtype, "cpu")


@cpu_triton
@pytest.mark.parametrize("k", [1, 3, 7, 30, 64])
def test_cartesian_topk_ties_cpu(k: int) -> None:
    _check(4, 8, k, torch.float32, "cpu", ties=True)


@cpu_triton
@pytest.mark.parametrize(("n", "k"), [(21, 10), (50, 200), (13, 1)])
def test_cartesian_topk_selection_ties_cpu(n: int, k: int) -> None:
    """Equal values straddle the top-min(k, n) boundary of a half: the lower indices are kept."""
    _check(3, n, k, torch.float32, "cpu", ties=True)


@cpu_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(("n", "k"), [(24, 1), (24, 10), (24, 50), (24, 576), (9, 30)])
def test_cartesian_topk_special_values_cpu(n: int, k: int, dtype: torch.dtype) -> None:
    _check_special(4, n, k, dtype, "cpu")


def _check_nonfinite(n: int, k: int, dtype: torch.dtype, device: str) -> None:
    """NaN / +-inf inputs: ids distinct and in [0, N), equal to the reference and to the
    documented order pair by pair; scores the true sums (NaN where an input is NaN)."""
    rows, cols = nonfinite_router_inputs(n, dtype, seed=n * 100 + k)
    with triton_launches() as launches:
        scores, ids = omnimoe_kernels.cartesian_topk(
            rows.to(device), cols.to(device), k, backend="triton"
        )
    assert_launched(launches)
    ids = ids.cpu()
    assert ids.shape == (8, k) and ((ids >= 0) & (ids < n * n)).all(), ids
    assert all(len(set(row.tolist())) == k for row in ids), "repeated ids"
    ref_scores, ref_ids = cartesian_topk_reference(rows, cols, k)
    assert torch.equal(ids, ref_ids)
    assert torch.equal(ref_ids, documented_topk_ids(rows, cols, k))
    torch.testing.assert_close(scores.cpu(), ref_scores, rtol=0, atol=0, equal_nan=True)


NONFINITE_CASES = [  # n, K, dtype
    (8, 4, torch.float32),  # the case: K < n, selection path
    (8, 64, torch.float32),  # K = n^2: every pair
    (8, 12, torch.float32),  # K > n: every index a candidate
    (76, 64, torch.float32),  # the H200 case (repeated ids there)
    (76, 1, torch.float32),
    (37, 100, torch.float64),  # float64 keys, K > n
    (12, 7, torch.bfloat16),
]


# +inf + -inf = NaN in the interpreter's score sums is the point of these inputs.
NAN_SCORES = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@cpu_triton
@NAN_SCORES
@pytest.mark.parametrize(("n", "k", "dtype"), NONFINITE_CASES)
def test_cartesian_topk_nonfinite_cpu(n: int, k: int, dtype: torch.dtype) -> None:
    _check_nonfinite(n, k, dtype, "cpu")


@pytest.mark.parametrize(
    ("n", "k", "dtype"),
    [
        *NONFINITE_CASES,
        (1024, 4096, torch.float32),
        (320, 512, torch.bfloat16),
        (96, 1000, torch.float64),
    ],
)
@NAN_SCORES
@gpu[0]
@gpu[1]
def test_cartesian_topk_nonfinite_gpu(n: int, k: int, dtype: torch.dtype) -> None:
    _check_nonfinite(n, k, dtype, "cuda")


def test_cartesian_topk_rejects_bad_k() -> None:
    rows = torch.zeros(2, 4)
    with pytest.raises(ValueError):
        omnimoe_kernels.cartesian_topk(rows, rows, 17, backend="torch")


@pytest.mark.parametrize(
    ("T", "n", "k", "dtype", "ties"),
    [
        (300, 1024, 64, torch.float32, False),
        (64, 320, 4096, torch.float32, False),
        (64, 320, 512, torch.bfloat16, False),
        (33, 96, 1000, torch.float32, True),
        (50, 16, 1, torch.float32, False),  # a = K = 1
        (16, 1024, 4096, torch.float32, True),  # a = n = 1024 candidates, ties
        (40, 2000, 100, torch.bfloat16, False),  # n not a power of two, 2048-lane selection
        (7, 1, 1, torch.float32, False),  # n = 1
        (257, 1024, 512, torch.float32, False),  # a = 512 < n: selection and wide search
        (64, 320, 2048, torch.bfloat16, True),
    ],
)
@gpu[0]
@gpu[1]
def test_cartesian_topk_gpu(T: int, n: int, k: int, dtype: torch.dtype, ties: bool) -> None:
    _check(T, n, k, dtype, "cuda", ties=ties)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("n", "k"), [(96, 64), (96, 1000), (320, 4096)])
@gpu[0]
@gpu[1]
def test_cartesian_topk_special_values_gpu(n: int, k: int, dtype: torch.dtype) -> None:
    _check_special(33, n, k, dtype, "cuda")


# Launches of the selection path (a < n): (mode, rows per compaction chunk, warps per token,
# register cap); mode "bracket" (the default) / "lanes" lane-chunked, "rows" row-major with
# chunk 0 = the whole vector at once (the earlier kernel); the cap is ignored on the CPU.
SELECT_VARIANTS = [("bracket", 4, None, None), ("lanes", 4, None, None), ("rows", 4, None, None)]
SELECT_VARIANTS += [("rows", 0, None, None), ("bracket", 8, 1, 64), ("bracket", 4, 2, 48)]


def _check_variant(monkeypatch, variant: tuple, n: int, k: int, kind: str, device: str) -> None:
    mode, chunk, warps, cap = variant
    monkeypatch.setattr(router_topk, "SELECT_MODE", mode)
    monkeypatch.setattr(router_topk, "SELECT_CHUNK_ROWS", chunk)
    monkeypatch.setattr(router_topk, "SELECT_WARPS", warps)
    monkeypatch.setattr(router_topk, "SELECT_MAXNREG", cap if device == "cuda" else None)
    if kind == "special":
        _check_special(3, n, k, torch.float32, device)
    elif kind == "nonfinite":
        _check_nonfinite(n, k, torch.float32, device)
    else:
        _check(3, n, k, torch.float32, device, ties=kind == "ties")


def _mode_inputs(T: int, n: int, kind: str, seed: int) -> tuple:
    """float32 (rows, cols): log-probabilities, few distinct values, or NaN / +-inf / signed
    zeros mixed into log-probabilities."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "ties":
        return tuple(torch.randint(0, 3, (T, n), generator=gen).float() for _ in range(2))
    halves = [torch.randn(T, n, generator=gen).log_softmax(-1) for _ in range(2)]
    if kind == "mixed":
        pool = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 0.0])
        for i, x in enumerate(halves):
            pick = torch.randint(0, 40, (T, n), generator=gen)
            halves[i] = torch.where(pick < 5, pool[pick.clamp_max(4)], x)
    return tuple(halves)


def _bitwise_modes(T: int, n: int, k: int, kind: str, device: str, monkeypatch) -> None:
    """The lane-chunked selections ("lanes", "bracket") give bitwise the ids and scores of the
    row-major one ("rows", the default before them)."""
    rows, cols = (x.to(device) for x in _mode_inputs(T, n, kind, seed=n * 7 + k))
    out = {}
    for mode in ("rows", "lanes", "bracket"):
        monkeypatch.setattr(router_topk, "SELECT_MODE", mode)
        out[mode] = router_topk.cartesian_topk_ids(rows, cols, k)
    scores, ids = out["rows"]
    for mode in ("lanes", "bracket"):
        assert torch.equal(out[mode][1], ids), mode
        assert torch.equal(out[mode][0].view(torch.int32), scores.view(torch.int32)), mode


MODE_CASES = [  # T, n, K, kind
    (3, 1024, 64, "randn"),  # the benchmark's shape
    (3, 1024, 64, "ties"),  # equal values straddle the 64th place
    (3, 1024, 64, "mixed"),  # NaN / +-inf / signed zeros
    (3, 1000, 40, "randn"),  # n not a power of two, a partial last lane
    (4, 200, 37, "mixed"),
    (3, 96, 33, "ties"),  # a > L = 32: two groups per lane in the bracket
    (2, 300, 299, "randn"),  # a = n - 1, the widest selection
    (2, 24, 576, "ties"),  # K = n * n: no selection (a = n), both modes the same kernel
    (2, 5, 1, "mixed"),  # K = 1, n < one lane's width
]


@cpu_triton
@NAN_SCORES
@pytest.mark.parametrize(("T", "n", "k", "kind"), MODE_CASES)
def test_select_modes_bitwise_cpu(monkeypatch, T: int, n: int, k: int, kind: str) -> None:
    _bitwise_modes(T, n, k, kind, "cpu", monkeypatch)


@NAN_SCORES
@pytest.mark.parametrize(
    ("T", "n", "k", "kind"),
    [*MODE_CASES, (4096, 1024, 64, "randn"), (2048, 1024, 64, "ties"), (2048, 1024, 64, "mixed")],
)
@gpu[0]
@gpu[1]
def test_select_modes_bitwise_gpu(monkeypatch, T: int, n: int, k: int, kind: str) -> None:
    _bitwise_modes(T, n, k, kind, "cuda", monkeypatch)


@cpu_triton
@NAN_SCORES
@pytest.mark.parametrize("variant", SELECT_VARIANTS)
@pytest.mark.parametrize(
    ("n", "k", "kind"),
    [
        (1024, 64, "ties"),  # equal values straddle the 64th place: the tie count crosses chunks
        (1024, 64, "special"),  # -inf, signed zeros
        (1024, 64, "nonfinite"),  # NaN / +-inf rows and columns
        (200, 37, "randn"),  # n not a power of two: a partial last chunk
    ],
)
def test_cartesian_topk_select_variants_cpu(monkeypatch, variant, n, k, kind) -> None:
    """Every launch of the selection path gives the reference's ids (and the same scores)."""
    _check_variant(monkeypatch, variant, n, k, kind, "cpu")


@NAN_SCORES
@pytest.mark.parametrize("variant", SELECT_VARIANTS)
@pytest.mark.parametrize("kind", ["randn", "ties", "special", "nonfinite"])
@gpu[0]
@gpu[1]
def test_cartesian_topk_select_variants_gpu(monkeypatch, variant, kind) -> None:
    _check_variant(monkeypatch, variant, 1024, 64, kind, "cuda")
