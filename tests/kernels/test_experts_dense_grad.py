"""Dense-GEMM weight gradients (``experts_dense_grad``) against the float64 reference, and the
choice between them and the pair kernel (``choose_grad_path``)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from kernel_test_utils import gpu, rel_err

import omnimoe_kernels
from omnimoe_kernels import experts_dense_grad as dense
from omnimoe_kernels.reference import atomic_experts_reference

CUDA = torch.device("cuda")  # only named: choose_grad_path reads the device type
CPU = torch.device("cpu")


def _inputs(T, D, N, K, dtype, device="cpu", *, skip=0.0, seed=0):
    """x, dy in ``dtype``; ids with repeats (uniform draws) and a ``skip`` share of id N;
    g, h float32 (float64 for float64), w float32."""
    gen = torch.Generator().manual_seed(seed)
    x, dy = torch.randn(T, D, generator=gen), torch.randn(T, D, generator=gen)
    idx = torch.randint(0, N, (T, K), generator=gen)
    idx = idx.masked_fill(torch.rand(T, K, generator=gen) < skip, N)
    g, h = torch.randn(T, K, generator=gen), torch.randn(T, K, generator=gen)
    w = torch.rand(T, K, generator=gen) + 0.1
    coef = torch.float64 if dtype == torch.float64 else torch.float32
    rows = [t.to(device, dtype) for t in (x, dy)]
    return (*rows, idx.to(device), *(t.to(device, coef) for t in (g, h)), w.to(device))


def _reference(x, dy, idx, g, h, w, N):
    """float64 ``sum_{(t,k): idx=e}`` by index_add; pairs with id N dropped."""
    return _reference_coefs(x, dy, idx, g.double(), w.double() * F.silu(h.double()), N)


def _reference_coefs(x, dy, idx, g, a, N):
    """float64 dup = sum g x, ddown = sum a dy over each expert's pairs (id N dropped)."""
    real = idx < N
    ids = idx.clamp(max=N - 1).flatten().cpu()
    g64, a64 = (g.double() * real).cpu(), (a.double() * real).cpu()
    x64, dy64 = x.double().cpu(), dy.double().cpu()
    dup = torch.zeros(N, x.shape[1], dtype=torch.float64).index_add_(
        0, ids, (g64[:, :, None] * x64[:, None]).flatten(0, 1)
    )
    ddown = torch.zeros_like(dup).index_add_(
        0, ids, (a64[:, :, None] * dy64[:, None]).flatten(0, 1)
    )
    return dup, ddown


SHAPES = [  # T, D, N, K, dtype, skip share
    (7, 16, 12, 3, torch.float32, 0.0),
    (13, 40, 5, 6, torch.float32, 0.3),  # K > N: repeats in every token; off-tile T, D
    (9, 32, 16, 20, torch.bfloat16, 0.0),  # bf16, K > N
    (33, 24, 64, 1, torch.bfloat16, 0.5),  # K = 1, most experts unused
    (50, 8, 3, 7, torch.float64, 0.2),
    (0, 16, 8, 4, torch.float32, 0.0),  # no tokens
    (6, 8, 4, 3, torch.bfloat16, 1.0),  # every pair "no expert"
]
# Accuracy classes, with the result kept in float32 (float64): the bf16 path's coefficient
# keeps ~16 bits (hi + lo halves; the hi half alone gives ~2^-9 = 2e-3), float32 is IEEE.
TOL = {torch.float32: 2e-6, torch.bfloat16: 2e-5, torch.float64: 1e-12}


@pytest.mark.parametrize("max_bytes", [None, 64], ids=["one_chunk", "chunks"])
@pytest.mark.parametrize(("T", "D", "N", "K", "dtype", "skip"), SHAPES)
def test_dense_matches_reference(T, D, N, K, dtype, skip, max_bytes) -> None:
    x, dy, idx, g, h, w = _inputs(T, D, N, K, dtype, skip=skip)
    out = torch.float64 if dtype == torch.float64 else torch.float32
    got = dense.dense_table_grads(x, dy, idx, g, h, w, N, dtype=out, max_bytes=max_bytes)
    ref = _reference(x, dy, idx, g, h, w, N)
    for name, a, b in zip(("dup", "ddown"), got, ref):
        assert a.shape == (N, D) and a.dtype == out, name
        if b.abs().sum() == 0:
            assert a.abs().sum() == 0, name  # nothing routed: exact zeros
        else:
            assert rel_err(a, b) <= TOL[dtype], name
    # In the table dtype: one rounding of that result.
    low = dense.dense_table_grads(x, dy, idx, g, h, w, N, dtype=dtype, max_bytes=max_bytes)
    for a, b in zip(low, got):
        assert torch.equal(a, b.to(dtype))


DISTINCT_SHAPES = [  # T, D, N, K, dtype, skip share: at most one of each id per token
    (7, 16, 12, 3, torch.float32, 0.0),
    (13, 40, 50, 6, torch.bfloat16, 0.3),
    (33, 24, 64, 64, torch.bfloat16, 0.0),  # K = N: every expert once per token
    (50, 8, 30, 7, torch.float64, 0.2),
]


def _distinct_ids(T, N, K, skip, seed=1):
    """(T, K) ids, no id < N twice in a row (a random K-subset per token, unsorted), a ``skip``
    share replaced by N ("no expert", which may repeat)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(N, generator=gen)[:K] for _ in range(T)])
    return idx.masked_fill(torch.rand(T, K, generator=gen) < skip, N)


@pytest.mark.parametrize("max_bytes", [None, 64], ids=["one_chunk", "chunks"])
@pytest.mark.parametrize(("T", "D", "N", "K", "dtype", "skip"), DISTINCT_SHAPES)
def test_distinct_ids_skip_the_merge_bitwise(T, D, N, K, dtype, skip, max_bytes) -> None:
    """The ``distinct_ids`` promise skips the sort and the segmented scan: with ids that keep
    it, the same buffer is built (distinct positions), so the result is bitwise the merged
    path's, and within the reference's tolerance."""
    x, dy, _, g, h, w = _inputs(T, D, N, K, dtype)
    idx = _distinct_ids(T, N, K, skip)
    out = torch.float64 if dtype == torch.float64 else torch.float32
    args = (x, dy, idx, g, h, w, N)
    merged = dense.dense_table_grads(*args, dtype=out, max_bytes=max_bytes)
    fast = dense.dense_table_grads(*args, dtype=out, max_bytes=max_bytes, distinct_ids=True)
    ref = _reference(*args)
    for a, b, r in zip(fast, merged, ref):
        assert torch.equal(a, b)
        assert rel_err(a, r) <= TOL[dtype]


def test_distinct_ids_promise_broken_loses_repeats() -> None:
    """The promise is what makes the fast path exact: with a repeated id it keeps one pair of
    the run (a plain scatter), which the test of the merged path would catch."""
    x, dy, _, g, h, w = _inputs(1, 8, 4, 2, torch.float32)
    idx = torch.tensor([[2, 2]])
    merged = dense.dense_table_grads(x, dy, idx, g, h, w, 4, dtype=torch.float32)
    fast = dense.dense_table_grads(x, dy, idx, g, h, w, 4, dtype=torch.float32, distinct_ids=True)
    assert not torch.equal(merged[0][2], fast[0][2])


def test_merged_columns_invariant() -> None:
    """Per token: each real id owns exactly one column (value = the sum of its pairs), every
    other pair goes to the dummy column N, so a plain scatter never writes a cell twice."""
    T, N, K = 40, 6, 9
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, N + 1, (T, K), generator=gen)  # repeats and "no expert" pairs
    c = torch.randn(T, K, generator=gen, dtype=torch.float64)
    col, (val,) = dense.merged_columns(idx, [c], N)
    for t in range(T):
        real = col[t][col[t] < N]
        assert real.unique().numel() == real.numel()
        assert set(real.tolist()) == set(idx[t][idx[t] < N].tolist())
        for e in real.tolist():
            got = val[t][col[t] == e].item()
            assert got == pytest.approx(c[t][idx[t] == e].sum().item(), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_bitwise_repeatable(dtype) -> None:
    x, dy, idx, g, h, w = _inputs(64, 24, 10, 12, dtype, skip=0.2, seed=4)
    runs = [
        dense.dense_table_grads(x, dy, idx, g, h, w, 10, dtype=dtype, max_bytes=mb)
        for mb in (None, None, 300, 300)
    ]
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert all(torch.equal(a, b) for a, b in zip(runs[2], runs[3]))


@pytest.mark.parametrize("max_bytes", [None, 300], ids=["one_chunk", "chunks"])
def test_kept_buffer_is_reused_and_left_zero(max_bytes) -> None:
    """One G buffer per shape serves every call and is all zero between calls."""
    x, dy, idx, g, h, w = _inputs(40, 16, 9, 5, torch.bfloat16, skip=0.2, seed=6)
    first = dense.dense_table_grads(
        x, dy, idx, g, h, w, 9, dtype=torch.float32, max_bytes=max_bytes
    )
    kept = {k: b.data_ptr() for k, b in dense.ZERO_BUFFERS._buffers.items()}
    assert kept and not dense.ZERO_BUFFERS._dirty
    assert all(b.count_nonzero() == 0 for b in dense.ZERO_BUFFERS._buffers.values())
    x2, dy2, idx2, g2, h2, w2 = _inputs(40, 16, 9, 5, torch.bfloat16, skip=0.2, seed=7)
    second = dense.dense_table_grads(
        x2, dy2, idx2, g2, h2, w2, 9, dtype=torch.float32, max_bytes=max_bytes
    )
    assert {k: b.data_ptr() for k, b in dense.ZERO_BUFFERS._buffers.items()} == kept
    ref = _reference(x2, dy2, idx2, g2, h2, w2, 9)
    assert all(rel_err(a, b) <= TOL[torch.bfloat16] for a, b in zip(second, ref))
    assert not all(torch.equal(a, b) for a, b in zip(first, second))


def test_buffer_left_dirty_by_a_failed_call_is_zeroed(monkeypatch) -> None:
    """A call that stops between writing and clearing G (here: its GEMM raises) must not leak
    its coefficients into the next call."""
    x, dy, idx, g, h, w = _inputs(24, 8, 6, 4, torch.bfloat16, seed=8)
    good = dense.dense_table_grads(x, dy, idx, g, h, w, 6, dtype=torch.float32)

    def boom(*_args):
        raise RuntimeError("out of memory")

    other = _inputs(24, 8, 6, 4, torch.bfloat16, seed=9)  # other ids: other positions
    with monkeypatch.context() as patch:
        patch.setattr(dense, "_gemm_t", boom)
        with pytest.raises(RuntimeError, match="out of memory"):
            dense.dense_table_grads(*other, 6, dtype=torch.float32)
    assert dense.ZERO_BUFFERS._dirty
    again = dense.dense_table_grads(x, dy, idx, g, h, w, 6, dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(good, again))
    assert not dense.ZERO_BUFFERS._dirty


def test_dense_rejects_mismatched_shapes() -> None:
    x, dy, idx, g, h, w = _inputs(5, 8, 4, 3, torch.float32)
    with pytest.raises(ValueError, match="dy"):
        dense.dense_table_grads(x, dy[:4], idx, g, h, w, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="indices"):
        dense.dense_table_grads(x, dy, idx, g[:, :2], h, w, 4, dtype=torch.float32)


@pytest.mark.parametrize(
    ("T", "D", "N", "K", "want"),
    [
        (16384, 768, 5776, 64, "dense"),  # a80m
        (16384, 1024, 65536, 16, "pairs"),
        (4096, 1024, 102400, 512, "pairs"),  # the paper's setting
        (4096, 1024, 1024, 64, "dense"),
        (16384, 2048, 1048576, 64, "pairs"),
    ],
)
def test_auto_follows_the_cost_model(T, D, N, K, want) -> None:
    """auto = the cheaper modelled path for bf16 on CUDA; "pairs" on CPU and for float32.
    (A refit of the cost constants must keep a80m dense and the two large-N shapes pairs.)"""
    cheaper = dense.dense_cost_s(T, N, D) < dense.pairs_cost_s(T * K, D)
    assert want == ("dense" if cheaper else "pairs")
    assert dense.choose_grad_path("auto", T, N, D, K, torch.bfloat16, CUDA) == want
    assert dense.choose_grad_path("auto", T, N, D, K, torch.bfloat16, CPU) == "pairs"
    assert dense.choose_grad_path("auto", T, N, D, K, torch.float32, CUDA) == "pairs"
    for forced in ("dense", "pairs"):
        assert dense.choose_grad_path(forced, T, N, D, K, torch.float32, CPU) == forced


def test_auto_counts_the_real_pairs() -> None:
    """``pairs`` (the rows layout's owned share) enters the pair kernel's cost only: at a80m's
    shape all pairs real favour dense, one in eight real favours the pair kernel."""
    T, D, N, K = 16384, 768, 5776, 64
    few = T * K // 8
    assert dense.choose_grad_path("auto", T, N, D, K, torch.bfloat16, CUDA) == "dense"
    assert dense.choose_grad_path("auto", T, N, D, K, torch.bfloat16, CUDA, pairs=few) == "pairs"
    assert dense.pairs_cost_s(few, D) <= dense.dense_cost_s(T, N, D)


def test_force_and_unknown_paths(monkeypatch) -> None:
    args = (16384, 5776, 768, 64, torch.bfloat16, CUDA)
    monkeypatch.setattr(dense, "FORCE_GRAD_PATH", "pairs")
    assert dense.choose_grad_path("auto", *args) == "pairs"
    assert dense.choose_grad_path("dense", *args) == "dense"  # an explicit argument wins
    monkeypatch.setattr(dense, "FORCE_GRAD_PATH", "fast")
    with pytest.raises(ValueError, match="FORCE_GRAD_PATH"):
        dense.choose_grad_path("auto", *args)
    with pytest.raises(ValueError, match="grad_path='gemm'"):
        dense.choose_grad_path("gemm", *args)
    x = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="grad_path"):
        omnimoe_kernels.atomic_experts(
            x, x, x, torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.long), grad_path="gemm"
        )


@pytest.mark.parametrize("max_bytes", [None, 200], ids=["one_chunk", "chunks"])
def test_bf16_coefficients_keep_eight_bits_in_half_the_buffer(max_bytes) -> None:
    """``coef="bf16"``: each pair's coefficient rounded once to bf16, so the result is the exact
    sum of those rounded coefficients times the rows; bf16-grade against the exact sums (where
    the split is ~16-bit), in a G buffer of half the width."""
    T, D, N, K = 47, 24, 10, 6  # a T no other test uses: its buffers are told apart by it
    x, dy, _, g, h, w = _inputs(T, D, N, K, torch.bfloat16, seed=11)
    # Distinct ids per token (no repeats to merge before the rounding), a fifth "no expert".
    gen = torch.Generator().manual_seed(12)
    idx = torch.stack([torch.randperm(N, generator=gen)[:K] for _ in range(T)])
    idx = idx.masked_fill(torch.rand(T, K, generator=gen) < 0.2, N)
    run = functools.partial(
        dense.dense_table_grads, x, dy, idx, g, h, w, N, dtype=torch.float32, max_bytes=max_bytes
    )
    got, split = run(coef="bf16"), run(coef="split")
    widths = sorted(key[2][1] for key in dense.ZERO_BUFFERS._buffers if key[2][0] == T)
    if max_bytes is None:
        assert widths == [16, 32]  # N + 1 padded to 16 columns: one per pair, or hi and lo
    a = w.float() * F.silu(h.float())
    rounded = _reference_coefs(x, dy, idx, g.to(torch.bfloat16), a.to(torch.bfloat16), N)
    exact = _reference(x, dy, idx, g, h, w, N)
    for name, b16, s, r16, r in zip(("dup", "ddown"), got, split, rounded, exact):
        assert rel_err(b16, r16) <= 2e-6, name  # only the one rounding per coefficient
        assert 1e-4 < rel_err(b16, r) <= 8e-3, name  # bf16-grade against the exact sums
        assert rel_err(s, r) <= TOL[torch.bfloat16], name


def test_bf16_coefficients_halve_the_modelled_cost_and_bad_modes_are_refused(monkeypatch) -> None:
    T, N, D = 16384, 5776, 768
    split, half = dense.dense_cost_s(T, N, D, "split"), dense.dense_cost_s(T, N, D, "bf16")
    assert half - dense.DENSE_OVERHEAD_S == pytest.approx((split - dense.DENSE_OVERHEAD_S) / 2)
    monkeypatch.setattr(dense, "DENSE_COEF", "bf16")
    assert dense.dense_cost_s(T, N, D) == half
    x, dy, idx, g, h, w = _inputs(4, 8, 3, 2, torch.bfloat16)
    with pytest.raises(ValueError, match="coef='fp8'"):
        dense.dense_table_grads(x, dy, idx, g, h, w, 3, dtype=torch.float32, coef="fp8")


def _layer_grads(T, D, N, K, dtype, grad_path, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=gen)
    up = torch.randn(N, D, generator=gen) / D**0.5
    down = torch.randn(N, D, generator=gen)
    w = torch.rand(T, K, generator=gen) + 0.1
    idx = torch.randint(0, N, (T, K), generator=gen).cuda()
    gy = torch.randn(T, D, generator=gen).cuda().to(dtype)
    leaves = [t.cuda().to(dtype).requires_grad_() for t in (x, up, down, w)]
    y = omnimoe_kernels.atomic_experts(*leaves, idx, grad_path=grad_path)
    grads = torch.autograd.grad(y, leaves, gy)
    leaves64 = [t.detach().cpu().double().requires_grad_() for t in leaves]
    y64 = atomic_experts_reference(*leaves64, idx.cpu())
    return grads, torch.autograd.grad(y64, leaves64, gy.cpu().double())


@gpu[0]
@gpu[1]
@pytest.mark.parametrize(
    ("T", "D", "N", "K", "dtype"),
    [(4096, 768, 5776, 64, torch.bfloat16), (2048, 256, 1000, 16, torch.float32)],
)
def test_dense_and_pairs_agree_gpu(T, D, N, K, dtype) -> None:
    """Both weight-gradient paths on CUDA against the float64 reference, and dense bitwise
    repeatable."""
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    runs = {p: _layer_grads(T, D, N, K, dtype, p) for p in ("dense", "pairs")}
    for path, (grads, grads64) in runs.items():
        for name, g, g64 in zip(("dx", "dup", "ddown", "dw"), grads, grads64):
            assert rel_err(g, g64) <= tol, (path, name)
    again, _ = _layer_grads(T, D, N, K, dtype, "dense")
    assert all(torch.equal(a, b) for a, b in zip(runs["dense"][0], again))


@gpu[0]
@gpu[1]
def test_dense_accuracy_class_gpu(monkeypatch) -> None:
    """cuBLAS keeps the contract: bf16 rows, float32 result within ~2^-16 (the hi/lo split
    accumulated in fp32), and float32 rows stay exact with TF32 switched on for the process."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32")
    for dtype, tol in ((torch.bfloat16, 2e-5), (torch.float32, 2e-6)):
        x, dy, idx, g, h, w = _inputs(8192, 256, 3000, 32, dtype, "cuda", skip=0.2, seed=2)
        got = dense.dense_table_grads(x, dy, idx, g, h, w, 3000, dtype=torch.float32)
        for a, b in zip(got, _reference(x, dy, idx, g, h, w, 3000)):
            assert rel_err(a, b) <= tol, dtype
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"  # left as the process set it
