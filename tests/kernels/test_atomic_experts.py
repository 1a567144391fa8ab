"""atomic_experts (Triton) against the float64 reference: forward and every gradient."""

from __future__ import annotations

import pytest
import torch
from kernel_test_utils import assert_launched, cpu_triton, gpu, rel_err, triton_launches

import omnimoe_kernels
import omnimoe_kernels.experts_autograd as experts_autograd
import omnimoe_kernels.experts_grad as experts_grad
import omnimoe_kernels.experts_grad_blocks as experts_grad_blocks
from omnimoe_kernels.reference import atomic_experts_reference


def _inputs(T: int, D: int, N: int, K: int, dtype: torch.dtype, device: str, hot: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=gen)
    up = torch.randn(N, D, generator=gen) / D**0.5
    down = torch.randn(N, D, generator=gen)
    w = torch.rand(T, K, generator=gen) + 0.1
    idx = torch.randint(0, N, (T, K), generator=gen)
    if hot:  # expert 0 is picked by every token
        idx[:, 0] = 0
    leaves = [v.to(device, dtype).requires_grad_() for v in (x, up, down, w)]
    return leaves, idx.to(device), torch.randn(T, D, generator=gen)


def _check(
    T, D, N, K, dtype, device, *, hot=False, deterministic=False, seed=0, grad_path="auto"
) -> None:
    (x, up, down, w), idx, gy = _inputs(T, D, N, K, dtype, device, hot, seed)
    # Poison-free by construction: every output is allocated by the op; NaN fails rel_err.
    with triton_launches() as forward:
        y = omnimoe_kernels.atomic_experts(
            x, up, down, w, idx, backend="triton", deterministic=deterministic, grad_path=grad_path
        )
    with triton_launches() as backward:
        grads = torch.autograd.grad(y, (x, up, down, w), gy.to(device, dtype))
    if T * K * D > 0:  # empty problems may launch nothing; the rest run the kernels both ways
        assert_launched(forward)
        assert_launched(backward)
    leaves64 = [v.detach().cpu().double().requires_grad_() for v in (x, up, down, w)]
    y64 = atomic_experts_reference(*leaves64, idx.cpu())
    grads64 = torch.autograd.grad(y64, leaves64, gy.double())
    assert y.shape == (T, D) and y.dtype == dtype
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    if T == 0:
        assert all(g.abs().sum().item() == 0 for g in grads)
        return
    assert rel_err(y, y64) <= tol
    for name, g, g64 in zip(("dx", "dup", "ddown", "dw"), grads, grads64):
        assert g.dtype == dtype, name
        assert rel_err(g, g64) <= tol, name


CPU_CASES = [  # T, D, N, K, dtype, hot
    (6, 16, 9, 1, torch.float32, False),  # K = 1
    (5, 16, 8, 0, torch.float32, False),  # K = 0: no pairs, zero outputs and gradients
    (5, 0, 8, 3, torch.float32, False),  # D = 0: empty rows
    (7, 24, 64, 3, torch.float32, False),  # most experts hit by no token
    (13, 40, 5, 6, torch.float32, True),  # one expert hit by every token; T, D off-tile
    (9, 32, 16, 20, torch.bfloat16, False),  # bf16, K > N
    (0, 16, 8, 4, torch.float32, False),  # no tokens
]


@cpu_triton
@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "det"])
@pytest.mark.parametrize(("T", "D", "N", "K", "dtype", "hot"), CPU_CASES)
def test_atomic_experts_cpu(T, D, N, K, dtype, hot, deterministic) -> None:
    _check(T, D, N, K, dtype, "cpu", hot=hot, deterministic=deterministic)


@cpu_triton
@pytest.mark.parametrize(("T", "D", "N", "K", "dtype", "hot"), CPU_CASES)
def test_dense_grad_path_cpu(T, D, N, K, dtype, hot) -> None:
    """The weight gradients by dense GEMMs (``experts_dense_grad``): the same contract."""
    _check(T, D, N, K, dtype, "cpu", hot=hot, grad_path="dense")


@cpu_triton
@pytest.mark.parametrize(  # 16-bit and 32-bit sort keys
    ("T", "K", "hot", "N"), [(13, 6, True, 40), (9, 20, False, 40), (5, 7, True, 70000)]
)
def test_expert_sorted_forward_cpu(monkeypatch, T, K, hot, N) -> None:
    """The forward's expert-sorted walk, taken when the tables do not fit in L2 (forced here)."""
    monkeypatch.setattr(experts_autograd, "L2_TABLE_BYTES", 0)
    _check(T, 24, N, K, torch.float32, "cpu", hot=hot)


@cpu_triton
def test_n_96_squared_cpu() -> None:
    """N = 96^2 experts, almost all untouched: each still gets its zero gradient row."""
    _check(4, 8, 96 * 96, 5, torch.float32, "cpu")


@cpu_triton
@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "det"])
@pytest.mark.parametrize(
    ("T", "N", "K", "dtype"), [(23, 6, 3, torch.float32), (40, 5, 4, torch.bfloat16)]
)
def test_runs_across_chunks_and_blocks_cpu(monkeypatch, T, N, K, dtype, deterministic) -> None:
    """Runs longer than a chunk and crossing block ends: carried, and finished by their owner."""
    monkeypatch.setattr(experts_grad, "BLOCK_PAIRS", 16)
    monkeypatch.setattr(experts_grad, "CHUNK_PAIRS", 16)
    _check(T, 16, N, K, dtype, "cpu", hot=True, deterministic=deterministic)


# The "experts" schedule of the weight gradients (blocks of experts; ``GRAD_SCHEDULE``): the
# CPU cases, a hot expert whose run spans many chunks, N off the 16-expert block, and pairs of
# the "no expert" id N.
EXPERT_BLOCK_CASES = [
    *CPU_CASES,
    (23, 16, 6, 3, torch.float32, True),
    (40, 16, 37, 4, torch.bfloat16, True),
]


@cpu_triton
@pytest.mark.parametrize("segment", [0, 16, 40], ids=["whole", "split16", "split40"])
@pytest.mark.parametrize(("T", "D", "N", "K", "dtype", "hot"), EXPERT_BLOCK_CASES)
def test_expert_block_schedule_cpu(monkeypatch, T, D, N, K, dtype, hot, segment) -> None:
    """Blocks whole, and blocks of more than ``segment`` pairs split into partial sums (the
    hot expert's block always is; segments that do not align with the 16-pair chunks too)."""
    monkeypatch.setattr(experts_grad, "GRAD_SCHEDULE", "experts")
    monkeypatch.setattr(experts_grad, "CHUNK_PAIRS", 16)
    monkeypatch.setattr(experts_grad_blocks, "SEGMENT_PAIRS", segment)
    _check(T, D, N, K, dtype, "cpu", hot=hot, grad_path="pairs")


def _check_no_expert(
    T, D, N, K, skip_fraction, device, *, seed=0, grad_path="auto", sort_forward=False
) -> None:
    """Pairs with id N ("no expert") equal pairs of weight 0 in y, dx, dup and ddown, and get
    dw = 0 (a weight-0 pair would get silu(h) there)."""
    (x, up, down, w), idx, gy = _inputs(T, D, N, K, torch.float32, device, False, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    skip = (torch.rand(T, K, generator=gen) < skip_fraction).to(device)
    with triton_launches() as forward:
        y = omnimoe_kernels.atomic_experts(
            x, up, down, w, idx.masked_fill(skip, N), backend="triton", grad_path=grad_path,
            sort_forward=sort_forward,
        )  # fmt: skip
    with triton_launches() as backward:
        grads = torch.autograd.grad(y, (x, up, down, w), gy.to(device))
    assert_launched(forward)
    assert_launched(backward)
    leaves64 = [v.detach().cpu().double().requires_grad_() for v in (x, up, down, w)]
    w0 = leaves64[3] * (~skip.cpu())
    y64 = atomic_experts_reference(*leaves64[:3], w0, idx.cpu())
    grads64 = list(torch.autograd.grad(y64, leaves64, gy.double()))
    grads64[3] = grads64[3] * (~skip.cpu())
    assert rel_err(y, y64) <= 2e-5
    for name, g, g64 in zip(("dx", "dup", "ddown", "dw"), grads, grads64):
        assert rel_err(g, g64) <= 2e-5, name
    assert torch.all(grads[3][skip] == 0)
    # The reference marks the same pairs the same way.
    ref = atomic_experts_reference(*leaves64[:4], idx.cpu().masked_fill(skip.cpu(), N))
    assert rel_err(ref, y64) <= 1e-12


@cpu_triton
@pytest.mark.parametrize("sorted_forward", [False, True], ids=["token_order", "expert_order"])
@pytest.mark.parametrize(
    ("T", "N", "K", "skip_fraction"),
    [(11, 12, 5, 0.5), (9, 6, 4, 1.0), (23, 5, 3, 0.3)],
)
def test_no_expert_pairs_cpu(monkeypatch, sorted_forward, T, N, K, skip_fraction) -> None:
    if sorted_forward:
        monkeypatch.setattr(experts_autograd, "L2_TABLE_BYTES", 0)
    monkeypatch.setattr(experts_grad, "BLOCK_PAIRS", 16)  # blocks past the last real pair
    _check_no_expert(T, 16, N, K, skip_fraction, "cpu")


@cpu_triton
@pytest.mark.parametrize(("T", "N", "K", "skip_fraction"), [(11, 12, 5, 0.5), (9, 40, 4, 1.0)])
@pytest.mark.parametrize("segment", [0, 16])
def test_no_expert_pairs_expert_block_schedule_cpu(
    monkeypatch, T, N, K, skip_fraction, segment
) -> None:
    monkeypatch.setattr(experts_grad, "GRAD_SCHEDULE", "experts")
    monkeypatch.setattr(experts_grad_blocks, "SEGMENT_PAIRS", segment)
    _check_no_expert(T, 16, N, K, skip_fraction, "cpu", grad_path="pairs")


@cpu_triton
@pytest.mark.parametrize(("T", "N", "K", "skip_fraction"), [(11, 12, 5, 0.5), (9, 6, 4, 1.0)])
def test_no_expert_pairs_sort_forward_cpu(monkeypatch, T, N, K, skip_fraction) -> None:
    """``sort_forward`` (what the rows layout asks for): the expert-sorted forward for small
    tables too; the sort it made is the one the backward uses (none made there)."""
    _check_no_expert(T, 16, N, K, skip_fraction, "cpu", sort_forward=True)
    made = []
    order = experts_autograd.expert_order
    monkeypatch.setattr(experts_autograd, "expert_order", lambda *a: made.append(1) or order(*a))
    (x, up, down, w), idx, gy = _inputs(T, 16, N, K, torch.float32, "cpu", False, 0)
    for sort_forward, sorts_in_forward in ((False, 0), (True, 1)):
        made.clear()
        args = (x, up, down, w, idx)
        y = omnimoe_kernels.atomic_experts(*args, backend="triton", sort_forward=sort_forward)
        assert len(made) == sorts_in_forward
        y.backward(gy)
        assert len(made) == 1  # one sort per call: the backward reuses the forward's


@cpu_triton
@pytest.mark.parametrize(("T", "N", "K", "skip_fraction"), [(11, 12, 5, 0.5), (9, 6, 4, 1.0)])
def test_no_expert_pairs_dense_cpu(T, N, K, skip_fraction) -> None:
    _check_no_expert(T, 16, N, K, skip_fraction, "cpu", grad_path="dense")


@gpu[0]
@gpu[1]
@pytest.mark.parametrize("grad_path", ["pairs", "dense"])
@pytest.mark.parametrize(("T", "N", "K"), [(4096, 2888, 64), (1000, 70000, 16)])
def test_no_expert_pairs_gpu(T, N, K, grad_path) -> None:
    _check_no_expert(T, 256, N, K, 0.5, "cuda", grad_path=grad_path)


GPU_CASES = [  # T, D, N, K, dtype, hot
    (4096, 1024, 65536, 16, torch.bfloat16, False),
    (1000, 512, 300, 32, torch.float32, True),
    (777, 256, 96 * 96, 64, torch.bfloat16, True),
    (2048, 128, 1024, 1, torch.float32, False),
    (0, 64, 16, 4, torch.bfloat16, False),
]


@pytest.mark.parametrize(("T", "D", "N", "K", "dtype", "hot"), GPU_CASES)
@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "det"])
@gpu[0]
@gpu[1]
def test_atomic_experts_gpu(T, D, N, K, dtype, hot, deterministic) -> None:
    _check(T, D, N, K, dtype, "cuda", hot=hot, deterministic=deterministic)


@pytest.mark.parametrize(
    ("T", "D", "N", "K", "dtype", "hot"),
    [*GPU_CASES[:3], (2048, 768, 5776, 64, torch.bfloat16, False)],  # + a80m's width and N
)
@pytest.mark.parametrize(("schedule", "segment"), [("runs", 0), ("experts", 0), ("experts", 256)])
@gpu[0]
@gpu[1]
def test_pair_kernel_schedules_gpu(monkeypatch, schedule, segment, T, D, N, K, dtype, hot) -> None:
    """Each weight-gradient schedule on the bf16 tensor-core path (the "experts" one also with
    hot blocks split), and bitwise repeatable."""
    monkeypatch.setattr(experts_grad, "GRAD_SCHEDULE", schedule)
    monkeypatch.setattr(experts_grad_blocks, "SEGMENT_PAIRS", segment)
    _check(T, D, N, K, dtype, "cuda", hot=hot, grad_path="pairs")
    (x, up, down, w), idx, gy = _inputs(T, D, N, K, dtype, "cuda", hot, 3)
    runs = []
    for _ in range(2):  # fixed summation order: bitwise repeatable
        y = omnimoe_kernels.atomic_experts(x, up, down, w, idx, grad_path="pairs")
        runs.append(torch.autograd.grad(y, (up, down), gy.to("cuda", dtype)))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@gpu[0]
@gpu[1]
def test_deterministic_bitwise_gpu() -> None:
    (x, up, down, w), idx, gy = _inputs(2048, 256, 64, 32, torch.float32, "cuda", True, 5)
    gy = gy.cuda()
    runs = []
    for _ in range(2):
        y = omnimoe_kernels.atomic_experts(x, up, down, w, idx, deterministic=True)
        runs.append([y, *torch.autograd.grad(y, (x, up, down, w), gy)])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@gpu[0]
@gpu[1]
def test_huge_n_and_pairs_gpu() -> None:
    """N = 16M experts and T*K = 2M pairs: grids stay within launch limits."""
    T, D, N, K = 32768, 16, 1 << 24, 64
    (x, up, down, w), idx, gy = _inputs(T, D, N, K, torch.bfloat16, "cuda", False, 7)
    y = omnimoe_kernels.atomic_experts(x, up, down, w, idx)
    dx, dup, ddown, dw = torch.autograd.grad(y, (x, up, down, w), gy.cuda().bfloat16())
    sub = slice(0, 64)  # check a slice of tokens against the reference (the rest is shared code)
    y_ref = atomic_experts_reference(
        x[sub].double(), up.double(), down.double(), w[sub].double(), idx[sub]
    )
    assert rel_err(y[sub], y_ref) <= 3e-2
    torch.cuda.synchronize()
    assert torch.isfinite(dup.float()).all() and torch.isfinite(ddown.float()).all()


@gpu[0]
@gpu[1]
def test_cuda_graph_capture_gpu() -> None:
    """Forward + backward captured in a CUDA graph replay to the eager result (no host sync)."""
    (x, up, down, w), idx, gy = _inputs(1024, 256, 4096, 16, torch.bfloat16, "cuda", False, 3)
    gy = gy.cuda().bfloat16()

    def step():
        y = omnimoe_kernels.atomic_experts(x, up, down, w, idx)
        return [y, *torch.autograd.grad(y, (x, up, down, w), gy)]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager = step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    idx.copy_(torch.randint(0, 4096, idx.shape, device="cuda"))  # new routing, same buffers
    graph.replay()
    fresh = step()
    for a, b in zip(captured, fresh):
        assert rel_err(a, b) <= 1e-6
    assert any(rel_err(a, b) > 1e-3 for a, b in zip(captured, eager))


@pytest.mark.parametrize("N", [65535, 65536, 65537, 300])
def testexpert_order_is_a_stable_sort(N: int) -> None:
    """16-bit sort keys (N < 2^16, shifted into int16's range) and 32-bit ones agree with a
    stable int64 sort, at both ends of the id range."""
    gen = torch.Generator().manual_seed(N)
    idx = torch.randint(0, N, (50, 7), generator=gen)
    idx[0, :3] = torch.tensor([0, N - 1, N - 1])
    key_P, order_P, base = experts_autograd.expert_order(idx, N)
    ref_e, ref_order = torch.sort(idx.reshape(-1), stable=True)
    assert key_P.dtype == (torch.int16 if N < 1 << 16 else torch.int32)
    assert torch.equal(key_P.long() + base, ref_e) and torch.equal(order_P, ref_order)


@cpu_triton
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nonfinite_token_stays_in_its_outputs_cpu() -> None:
    """A NaN token row (as a diverging step gives) and an inf routing weight of another token:
    y and dx are non-finite only for those tokens, and the experts they use get non-finite
    weight gradients (the contract in ``omnimoe_kernels.atomic_experts``)."""
    (x, up, down, w), idx, gy = _inputs(40, 16, 64, 4, torch.float32, "cpu", False, 11)
    with torch.no_grad():
        x[3] = float("nan")
        w[7, 1] = float("inf")
    y = omnimoe_kernels.atomic_experts(x, up, down, w, idx, backend="triton")
    dx, dup, _, _ = torch.autograd.grad(y, (x, up, down, w), gy)
    bad_rows = lambda t: set((~torch.isfinite(t)).any(1).nonzero().flatten().tolist())  # noqa: E731
    assert bad_rows(y) == {3, 7}
    assert bad_rows(dx) <= {3, 7} and 3 in bad_rows(dx)
    assert set(idx[3].tolist()) <= bad_rows(dup)
    # The documented reach of the pair kernel's default ("experts") schedule: the 16-expert
    # blocks of the NaN token's experts and of the inf weight's expert (its 0 * inf products).
    blocks = {e // experts_grad_blocks.BLOCK_EXPERTS for e in [*idx[3].tolist(), idx[7, 1].item()]}
    assert {e // experts_grad_blocks.BLOCK_EXPERTS for e in bad_rows(dup)} <= blocks
    healthy = [t for t in range(40) if t not in (3, 7)]
    y_ref = atomic_experts_reference(x[healthy], up, down, w[healthy], idx[healthy])
    assert rel_err(y[healthy], y_ref) <= 2e-5


def test_atomic_experts_rejects_what_breaks_the_contract(monkeypatch) -> None:
    """Float ids and the size limits (``omnimoe_kernels.limits``) are refused from the shapes."""
    (x, up, down, w), idx, _ = _inputs(6, 8, 9, 2, torch.float32, "cpu", False, 0)
    with pytest.raises(ValueError, match="int32 or int64"):
        experts_autograd.atomic_experts_triton(x, up, down, w, idx.float())
    monkeypatch.setattr(experts_autograd, "EXPERTS_MAX_NUM", 8)
    with pytest.raises(ValueError, match="N=9 experts"):
        experts_autograd.atomic_experts_triton(x, up, down, w, idx)
    monkeypatch.setattr(experts_autograd, "EXPERTS_MAX_NUM", 9)
    monkeypatch.setattr(experts_autograd, "EXPERTS_MAX_HIDDEN", 7)
    with pytest.raises(ValueError, match="D=8 columns"):
        experts_autograd.atomic_experts_triton(x, up, down, w, idx)
    monkeypatch.setattr(experts_autograd, "EXPERTS_MAX_HIDDEN", 8)
    monkeypatch.setattr(experts_autograd, "EXPERTS_MAX_PAIRS", 11)
    with pytest.raises(ValueError, match="12 pairs"):
        experts_autograd.atomic_experts_triton(x, up, down, w, idx)


def _grad_inputs(T: int, D: int, N: int, K: int):
    """x, dy (T, D); idx, g, h, w (T, K) and the expert order of idx, float32 on the CPU."""
    gen = torch.Generator().manual_seed(2)
    x, dy = torch.randn(T, D, generator=gen), torch.randn(T, D, generator=gen)
    idx = torch.randint(0, N, (T, K), generator=gen)
    g, h, w = (torch.randn(T, K, generator=gen) for _ in range(3))
    key_P, order_P, base = experts_autograd.expert_order(idx, N)
    return x, dy, idx, g, h, w, order_P, key_P.to(torch.int32) + base


@cpu_triton
@pytest.mark.parametrize("schedule", experts_grad.GRAD_SCHEDULES)
def test_expert_grads_reads_strided_inputs_cpu(monkeypatch, schedule) -> None:
    """A transposed x, a column slice of a wider dy and transposed g, h, w (the kernels read
    rows with unit column stride and flat pair arrays): same values as contiguous inputs."""
    from omnimoe_kernels.experts_parts import table_grads

    monkeypatch.setattr(experts_grad, "GRAD_SCHEDULE", schedule)
    T, D, N, K = 12, 20, 9, 3
    x, dy, idx, g, h, w, order_P, e_P = _grad_inputs(T, D, N, K)
    ref = table_grads(x, dy, idx, g, h, w, N, dtype=torch.float32, backend="torch")
    wide = torch.zeros(T, D + 5)
    wide[:, 2 : D + 2] = dy
    strided = (
        x.t().contiguous().t(), wide[:, 2 : D + 2],
        *(t.t().contiguous().t() for t in (h, w, g)),
    )  # fmt: skip
    dup, ddown = torch.empty(N, D), torch.empty(N, D)
    x_s, dy_s, h_s, w_s, g_s = strided
    experts_grad.expert_grads(
        x_s, dy_s, order_P, e_P, h_s, w_s, g_s, dup, ddown, K, deterministic=True
    )
    assert rel_err(dup, ref[0]) <= 2e-6 and rel_err(ddown, ref[1]) <= 2e-6


@pytest.mark.parametrize("bad", ["transposed", "wider_than_x", "ddown_differs"])
def test_expert_grads_refuses_outputs_it_cannot_fill(bad) -> None:
    """The (N, D) outputs are written row-major in place, D columns of x: another layout or
    shape is a ValueError before any launch (not rows written at the wrong places, or columns
    read past x's rows)."""
    T, D, N, K = 6, 8, 5, 2
    x, dy, _, g, h, w, order_P, e_P = _grad_inputs(T, D, N, K)
    dup, ddown = {
        "transposed": (torch.empty(D, N).t(), torch.empty(N, D)),
        "wider_than_x": (torch.empty(N, D + 1), torch.empty(N, D + 1)),
        "ddown_differs": (torch.empty(N, D), torch.empty(N - 1, D)),
    }[bad]
    with pytest.raises(ValueError, match="dup_ND"):
        experts_grad.expert_grads(x, dy, order_P, e_P, h, w, g, dup, ddown, K, deterministic=True)


def test_expert_grads_refuses_an_unknown_schedule(monkeypatch) -> None:
    monkeypatch.setattr(experts_grad, "GRAD_SCHEDULE", "pairs")
    x, dy, _, g, h, w, order_P, e_P = _grad_inputs(4, 8, 3, 2)
    dup, ddown = torch.empty(3, 8), torch.empty(3, 8)
    with pytest.raises(ValueError, match="GRAD_SCHEDULE='pairs' must be one of"):
        experts_grad.expert_grads(x, dy, order_P, e_P, h, w, g, dup, ddown, 2, deterministic=True)


def _rounded_coef_grads(x, dy, idx, g, h, w, N, coef_dtype):
    """dup, ddown in float64 with each pair's coefficient (g, w * silu(h)) rounded to
    ``coef_dtype`` first: the sums the bf16-coefficient mode computes (up to fp32 order)."""
    x64, dy64 = x.double().cpu(), dy.double().cpu()
    g64 = g.float().to(coef_dtype).double().cpu()
    a32 = w.float() * h.float() * torch.sigmoid(h.float())
    a64 = a32.to(coef_dtype).double().cpu()
    onehot = torch.nn.functional.one_hot(idx.cpu(), N).double()  # (T, K, N)
    dup = torch.einsum("tkn,tk,td->nd", onehot, g64, x64)
    ddown = torch.einsum("tkn,tk,td->nd", onehot, a64, dy64)
    return dup, ddown


def _check_bf16_coefficients(monkeypatch, device: str, segment: int) -> None:
    from omnimoe_kernels import experts_dense_grad

    monkeypatch.setattr(experts_grad, "GRAD_SCHEDULE", "experts")
    monkeypatch.setattr(experts_grad_blocks, "SEGMENT_PAIRS", segment)
    T, D, N, K = 37, 48, 20, 5
    x, dy, idx, g, h, w, order_P, e_P = _grad_inputs(T, D, N, K)
    x, dy = x.to(device, torch.bfloat16), dy.to(device, torch.bfloat16)
    g, h, w, order_P, e_P = (t.to(device) for t in (g, h, w, order_P, e_P))
    exact = _rounded_coef_grads(x, dy, idx, g, h, w, N, torch.float32)
    rounded = _rounded_coef_grads(x, dy, idx, g, h, w, N, torch.bfloat16)
    got = {}
    for mode in ("split", "bf16", "bf16 again"):
        monkeypatch.setattr(experts_dense_grad, "DENSE_COEF", mode.split()[0])
        dup, ddown = (torch.empty(N, D, device=device) for _ in range(2))  # float32 rows
        experts_grad.expert_grads(x, dy, order_P, e_P, h, w, g, dup, ddown, K, deterministic=True)
        got[mode] = (dup, ddown)
    # fixed summation order: bitwise repeatable
    assert all(torch.equal(a, b) for a, b in zip(got["bf16"], got["bf16 again"]))
    for name, i in (("dup", 0), ("ddown", 1)):
        # "split" keeps ~16 bits of each coefficient, "bf16" exactly the rounded one (fp32 sums)
        assert rel_err(got["split"][i], exact[i]) <= 2e-5, name
        assert rel_err(got["bf16"][i], rounded[i]) <= 2e-6, name
        assert rel_err(got["bf16"][i], exact[i]) >= 1e-4, name  # the rounding is really there


@cpu_triton
@pytest.mark.parametrize("segment", [0, 16], ids=["whole", "split16"])
def test_expert_block_schedule_bf16_coefficients_cpu(monkeypatch, segment) -> None:
    """``DENSE_COEF = "bf16"`` (``model.expert_grad_coef=bf16``) on the "experts" schedule: each
    pair's coefficient rounded once to bf16, the sums of the rounded values exact in fp32."""
    _check_bf16_coefficients(monkeypatch, "cpu", segment)


@pytest.mark.parametrize("segment", [0, 16], ids=["whole", "split16"])
@gpu[0]
@gpu[1]
def test_expert_block_schedule_bf16_coefficients_gpu(monkeypatch, segment) -> None:
    """The same on the tensor-core path (one bf16 product per chunk instead of hi + lo)."""
    _check_bf16_coefficients(monkeypatch, "cuda", segment)


def test_valid_ids_keep_16_bit_sort_keys_at_n_65536() -> None:
    """``valid_ids`` (no "no expert" id): N = 2^16 ids still fit 16-bit keys, in the same order
    as the 32-bit keys the "no expert" id would need; with N = 2^16 + 1 they do not."""
    gen = torch.Generator().manual_seed(4)
    N = 1 << 16
    idx = torch.randint(0, N, (300, 7), generator=gen)
    idx[0, :3] = torch.tensor([0, N - 1, N // 2])  # both ends of the range
    key16, order16, base16 = experts_autograd.expert_order(idx, N, valid_ids=True)
    key32, order32, base32 = experts_autograd.expert_order(idx, N)
    assert key16.dtype == torch.int16 and key32.dtype == torch.int32
    assert torch.equal(order16, order32)
    assert torch.equal(key16.long() + base16, key32.long() + base32)
    assert experts_autograd.expert_order(idx, N + 1, valid_ids=True)[0].dtype == torch.int32


@cpu_triton
def test_valid_ids_give_the_same_results_cpu() -> None:
    """atomic_experts with ``valid_ids`` equals the call without it, bitwise, at N = 2^16."""
    T, D, N, K = 9, 16, 1 << 16, 3
    (x, up, down, w), idx, gy = _inputs(T, D, N, K, torch.float32, "cpu", False, 8)
    idx[0, 0], idx[1, 0] = 0, N - 1
    outs = []
    for valid in (False, True):
        y = omnimoe_kernels.atomic_experts(
            x, up, down, w, idx, backend="triton", grad_path="dense", valid_ids=valid
        )
        outs.append([y, *torch.autograd.grad(y, (x, up, down, w), gy)])
    assert all(torch.equal(a, b) for a, b in zip(*outs))
