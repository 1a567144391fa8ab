"""The router gate GEMMs on split bf16 operands (``omnimoe_kernels.gate_gemms``): the split is
exact, z, dW and dx against float64 over a shape table (a80m's H = 152, odd sizes, tiny and
large magnitudes), the checks fail for a broken split, the autograd node on the split GEMMs
against float64 and against its fp32 GEMMs, and on a GPU the cuBLAS GEMMs against the CPU
emulation of the same split."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from kernel_test_utils import cpu_triton, gpu, rel_err

from omnimoe_kernels import bf16_split, gate_gemms
from omnimoe_kernels.reference import gate_log_probs_reference
from omnimoe_kernels.router_gates_autograd import gate_log_probs_triton

CASES = [  # T, D, H, scale of x, of W, of dz
    (1, 1, 1, 1.0, 1.0, 1.0),
    (7, 3, 5, 2.0, 0.3, 1.0),
    (37, 24, 14, 2.0, 0.3, 1.0),
    (130, 768, 152, 2.0, 0.02, 1.0),  # a80m: d = 768, two gates of n = 76
    (33, 2048, 2048, 2.0, 0.02, 1e-3),  # two gates of n = 1024
    (129, 17, 9, 1e-12, 1e-10, 1e-14),  # tiny (every piece still normal in bf16)
    (64, 40, 31, 1e6, 1e4, 1e8),  # large
    (300, 5, 2, 1.0, "mixed", 1.0),  # W entries spread over 2^-40 .. 2^40
]

# z and dW: fp32 level, (relative error of the whole tensor, of each element against its
# magnitude sum). On CPU the fp32 SGEMM of the same inputs measures 1e-7 to 3e-7; dropping the
# last piece of W gives ~2.5e-6. The GPU's tensor cores add in fp32 with truncation, not
# rounding: a looser fp32 level there.
# cuBLAS may split the reduction over d differently (split-K, tile order): at d = 2048 its
# max-relative error against float64 measured 2.1e-6 on an H200, so the GPU gets 1e-5.
FP32_TOL = {"cpu": (5e-7, 2.0**-20), "cuda": (1e-5, 2.0**-18)}
# dx before rounding: (3 + 2^-7) 2^-16 of sum_h |dz| |W| (the dropped terms, module docstring)
# plus fp32 accumulation.
DX_BOUND = 2.0**-14


def _inputs(T, D, H, sx, sw, sdz, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, D, generator=gen) * sx + 0.25 * sx).bfloat16()
    if sw == "mixed":
        w = torch.randn(H, D, generator=gen) * 2.0 ** torch.randint(-40, 41, (H, D), generator=gen)
    else:
        w = torch.randn(H, D, generator=gen) * sw
    dz = torch.randn(T, H, generator=gen) * sdz
    return x.to(device), w.to(device), dz.to(device)


def _check_scores(x, w) -> None:
    z = gate_gemms.gate_scores(x, w)
    z64 = x.cpu().double() @ w.cpu().double().t()
    assert z.dtype == torch.float32 and z.is_contiguous() and z.shape == z64.shape
    rel, elem = FP32_TOL[z.device.type]
    assert rel_err(z, z64) <= rel
    mag = x.cpu().double().abs() @ w.cpu().double().abs().t()
    assert ((z.cpu().double() - z64).abs() <= elem * mag).all()


def _check_weight_grad(dz, x, w) -> None:
    _, dw = gate_gemms.gate_grads(dz, x, w, input_grad=False)
    dw64 = dz.cpu().double().t() @ x.cpu().double()
    assert dw.dtype == torch.float32 and dw.shape == dw64.shape
    rel, elem = FP32_TOL[dw.device.type]
    assert rel_err(dw, dw64) <= rel
    mag = dz.cpu().double().abs().t() @ x.cpu().double().abs()
    assert ((dw.cpu().double() - dw64).abs() <= elem * mag).all()


def _bf16_ulp(v: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 values at |v| (8 significant bits), float64."""
    _, exp = torch.frexp(v.double())
    return torch.ldexp(torch.ones_like(v, dtype=torch.float64), exp - 8)


def _check_input_grad(dz, x, w) -> None:
    dx, dw = gate_gemms.gate_grads(dz, x, w, input_grad=True)
    assert dx.dtype == torch.float32 and dx.shape == x.shape
    _, dw_alone = gate_gemms.gate_grads(dz, x, w, input_grad=False)
    assert torch.equal(dw, dw_alone)
    dx, dx64 = dx.cpu().double(), dz.cpu().double() @ w.cpu().double()
    mag = dz.cpu().double().abs() @ w.cpu().double().abs()
    # Before rounding: within the stated bound of every element.
    assert ((dx - dx64).abs() <= DX_BOUND * mag).all()
    # Rounded to bf16 (what the node returns): at most one bf16 ulp from the float64 value
    # rounded, wherever dz W does not cancel below 2^-6 of its magnitude sum (there the bound
    # is under half an ulp); that is most elements of random data.
    got, want = dx.bfloat16().double(), dx64.bfloat16().double()
    fair = dx64.abs() >= 2.0**-6 * mag
    assert fair.double().mean() >= 0.5
    assert ((got - want).abs() <= _bf16_ulp(want))[fair].all()


def _pieces(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a1, a2, a3) of fp32 ``a`` from ``split_into_slots`` (the Triton kernel here)."""
    out = torch.empty(1, 3, a.numel(), dtype=torch.bfloat16, device=a.device)
    bf16_split.split_into_slots(a.reshape(1, -1), out, hi=0, mid=1, lo=2)
    return tuple(p.view(a.shape) for p in out[0])


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


@pytest.mark.parametrize(("low", "high"), [(-110, -90), (-30, 30), (90, 127)])
def test_split_is_exact(low: int, high: int) -> None:
    """a1 + a2 + a3 == a for zeros and |a| in [2^low, 2^high) (the exact range is [2^-110,
    bf16's largest value + half an ulp ~ 3.396e38): every mantissa pattern, both signs, and
    the kernel's pieces are the PyTorch ops' bits (a1 is ``a.bfloat16()``: nearest even)."""
    gen = torch.Generator().manual_seed(1)
    mant = 1 + torch.rand(4099, generator=gen)
    exp = torch.randint(low, high, (4099,), generator=gen)
    sign = torch.randint(0, 2, (4099,), generator=gen) * 2 - 1
    a = (sign * torch.ldexp(mant, exp)).float().clamp(-3.39e38, 3.39e38)
    a[:2] = torch.tensor([0.0, -0.0])
    a[2:6] = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1 + 2**-8 + 2**-23])  # ties
    assert torch.isfinite(a).all() and (a[6:].abs() >= 2.0**low).all()
    a1, a2, a3 = _pieces(a)
    assert a1.dtype == a2.dtype == a3.dtype == torch.bfloat16
    assert torch.equal(a1.float() + a2.float() + a3.float(), a)
    assert torch.equal(a1.double() + a2.double() + a3.double(), a.double())
    ref = torch.empty(3, *a.shape, dtype=torch.bfloat16)
    bf16_split.split_reference(a, ref[0], ref[1], ref[2])
    assert torch.equal(_bits(torch.stack([a1, a2, a3])), _bits(ref))
    assert torch.equal(_bits(a1), _bits(a.bfloat16()))


def test_split_below_the_exact_range_loses_only_the_bottom_bits() -> None:
    """Under 2^-110 the last piece underflows bf16's subnormals: off by at most 2^-134, and
    the kernel rounds subnormals as PyTorch does."""
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(4099, generator=gen) * 2.0**-118
    a[:2] = torch.tensor([2.0**-149, -3 * 2.0**-149])  # fp32 subnormals
    a1, a2, a3 = _pieces(a)
    err = (a1.double() + a2.double() + a3.double() - a.double()).abs()
    assert err.max() <= 2.0**-134 and err.max() > 0
    ref = torch.empty(3, *a.shape, dtype=torch.bfloat16)
    bf16_split.split_reference(a, ref[0], ref[1], ref[2])
    assert torch.equal(_bits(torch.stack([a1, a2, a3])), _bits(ref))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf
def test_split_non_finite_and_slots() -> None:
    """NaN stays NaN, inf (and what rounds to it) gives non-finite pieces, as the bits of
    ``a.bfloat16()``; the slots of a (R, S, C) buffer: a1 twice, a3 left out, other slots
    untouched."""
    a = torch.tensor([[float("nan"), float("inf"), -float("inf"), 3.4e38, 1.5]])
    a1, a2, _ = _pieces(a)
    assert a1[0, 0].isnan() and torch.equal(_bits(a1[:, 1:]), _bits(a[:, 1:].bfloat16()))
    assert not torch.isfinite(a1.float() + a2.float())[0, :4].any()
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(5, 7, generator=gen)
    out = torch.full((5, 4, 7), 9.0, dtype=torch.bfloat16)
    bf16_split.split_into_slots(a, out, hi=2, mid=0, hi2=3)
    assert torch.equal(out[:, 2], a.bfloat16()) and torch.equal(out[:, 3], out[:, 2])
    assert torch.equal(out[:, 0], (a - out[:, 2].float()).bfloat16())
    assert (out[:, 1] == 9).all()
    with pytest.raises(ValueError, match="slots"):
        bf16_split.split_into_slots(a, out, hi=4, mid=0)
    with pytest.raises(ValueError, match="contiguous fp32"):
        bf16_split.split_into_slots(a.t(), out, hi=0, mid=1)


@pytest.mark.parametrize(("T", "D", "H", "sx", "sw", "sdz"), CASES)
def test_split_gemms_against_float64(T, D, H, sx, sw, sdz) -> None:
    x, w, dz = _inputs(T, D, H, sx, sw, sdz)
    _check_scores(x, w)
    _check_weight_grad(dz, x, w)
    _check_input_grad(dz, x, w)


def _broken_split(monkeypatch: pytest.MonkeyPatch, piece: str) -> None:
    """Make the GEMMs' split zero one piece (after writing all of them correctly)."""
    split = bf16_split.split_into_slots

    def broken(a, out, hi, mid, lo=-1, hi2=-1):
        split(a, out, hi, mid, lo, hi2)
        slot = {"mid": mid, "lo": lo}[piece]
        if slot >= 0:  # dx's split of W has no last piece
            out[:, slot].zero_()

    monkeypatch.setattr(gate_gemms, "split_into_slots", broken)


@pytest.mark.parametrize("piece", ["mid", "lo"])
def test_checks_fail_for_a_broken_split(monkeypatch: pytest.MonkeyPatch, piece: str) -> None:
    """The checks above can fail: without the last piece z and dW lose fp32 accuracy, without
    the middle one dx leaves its bound (dx never reads the last piece)."""
    x, w, dz = _inputs(130, 768, 152, 2.0, 0.02, 1.0)
    _broken_split(monkeypatch, piece)
    with pytest.raises(AssertionError):
        _check_scores(x, w)
    with pytest.raises(AssertionError):
        _check_weight_grad(dz, x, w)
    if piece == "mid":
        with pytest.raises(AssertionError):
            _check_input_grad(dz, x, w)


def test_use_split_routing(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 activations and wide gates only; "fp32" keeps the SGEMMs; an unknown switch value
    is an error."""
    x, wide = torch.randn(4, 8), gate_gemms.SPLIT_MIN_SCORES
    assert gate_gemms.use_split(x.bfloat16(), wide)
    assert not gate_gemms.use_split(x.bfloat16(), wide - 1)  # a80m's 152: fp32 is faster
    assert not gate_gemms.use_split(x, wide)
    assert not gate_gemms.use_split(x.half(), wide)
    monkeypatch.setattr(gate_gemms, "GATE_GEMM", "fp32")
    assert not gate_gemms.use_split(x.bfloat16(), wide)
    monkeypatch.setattr(gate_gemms, "GATE_GEMM", "tf32")
    with pytest.raises(ValueError, match="GATE_GEMM"):
        gate_gemms.use_split(x.bfloat16(), wide)


def test_use_split_narrow_gates_only_while_capturing(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA a narrow gate (a80m's 152 scores) takes the split only while a CUDA graph is
    being captured: replayed, GPU time is all that counts and the SIMT SGEMMs lose (measured,
    ``SPLIT_MIN_SCORES``). A stand-in CUDA activation, so the rule runs without a GPU."""
    x = SimpleNamespace(dtype=torch.bfloat16, device=torch.device("cuda"))
    narrow, capturing = gate_gemms.SPLIT_MIN_SCORES - 1, [False]
    monkeypatch.setattr(gate_gemms, "_tensor_core_mm", lambda device: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    assert not gate_gemms.use_split(x, narrow)
    assert gate_gemms.use_split(x, narrow + 1)
    capturing[0] = True
    assert gate_gemms.use_split(x, narrow)
    monkeypatch.setattr(gate_gemms, "_tensor_core_mm", lambda device: False)
    assert not gate_gemms.use_split(x, narrow)  # no bf16 tensor-core GEMM: never


def _node(x, gates, dys, stats):
    """(log-probs, entropy, batch stats, dx, dgates) of the node, one forward + backward."""
    x = x.detach().clone().requires_grad_()
    gates = [g.detach().clone().requires_grad_() for g in gates]
    logp, entropy, batch_stats = gate_log_probs_triton(x, gates, stats=stats)
    sum((lp * dy).sum() for lp, dy in zip(logp, dys, strict=True)).backward()
    return logp, entropy, batch_stats, x.grad, [g.grad for g in gates]


def _node_inputs(T, D, n, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, D, generator=gen) * 2 + 0.5).bfloat16()
    gates = [torch.randn(n, D, generator=gen) * 0.3 for _ in range(2)]
    dys = [torch.randn(T, n, generator=gen) for _ in range(2)]
    return x.to(device), [g.to(device) for g in gates], [d.to(device) for d in dys]


def _check_node_split_vs_fp32(T, D, n, stats, device, monkeypatch) -> None:
    """The node on the split GEMMs (it takes them: a spy counts the calls) against float64 and
    against the node on the fp32 GEMMs."""
    monkeypatch.setattr(gate_gemms, "SPLIT_MIN_SCORES", 0)  # the split path at every width
    x, gates, dys = _node_inputs(T, D, n, device)
    calls = []
    for name in ("gate_scores", "gate_grads"):
        fn = getattr(gate_gemms, name)
        monkeypatch.setattr(
            gate_gemms, name, lambda *a, fn=fn, name=name, **k: calls.append(name) or fn(*a, **k)
        )
    split = _node(x, gates, dys, stats)
    assert calls == ["gate_scores", "gate_grads"]
    monkeypatch.setattr(gate_gemms, "GATE_GEMM", "fp32")
    fp32 = _node(x, gates, dys, stats)
    assert calls == ["gate_scores", "gate_grads"]
    ref = [t.cpu().double() for t in (x, *gates)]
    ref = _node_ref(ref[0], ref[1:], [d.cpu().double() for d in dys], stats)
    for got in (split, fp32):
        for g in range(2):
            assert rel_err(got[0][g], ref[0][g]) <= 1e-6
            assert rel_err(got[4][g], ref[4][g]) <= 2e-5
        assert rel_err(got[1], ref[1]) <= 1e-6
        if stats == "batch":  # means and variances over T tokens of fp32 scores
            assert rel_err(got[2], ref[2]) <= (1e-6 if device == "cpu" else 1e-5)
        assert got[3].dtype == torch.bfloat16 and rel_err(got[3], ref[3]) <= 8e-3
    for a, b in zip(split[0] + split[4], fp32[0] + fp32[4], strict=True):
        assert rel_err(a, b) <= 2e-5
    # dx: both bf16 roundings of near-equal fp32 values, apart by at most one ulp mostly.
    assert rel_err(split[3], fp32[3]) <= 4e-3


def _node_ref(x, gates, dys, stats):
    x = x.requires_grad_()
    gates = [g.requires_grad_() for g in gates]
    logp, entropy, batch_stats = gate_log_probs_reference(x, gates, stats)
    sum((lp * dy).sum() for lp, dy in zip(logp, dys, strict=True)).backward()
    return logp, entropy, batch_stats, x.grad, [g.grad for g in gates]


@cpu_triton
@pytest.mark.parametrize(("T", "D", "n", "stats"), [(130, 96, 76, "batch"), (9, 33, 17, None)])
def test_node_split_gemms_interpreter(T, D, n, stats, monkeypatch) -> None:
    _check_node_split_vs_fp32(T, D, n, stats, "cpu", monkeypatch)


@gpu[0]
@gpu[1]
@pytest.mark.parametrize(
    ("T", "D", "n", "stats"), [(16384, 768, 76, "batch"), (4096, 2048, 1024, "batch")]
)
def test_node_split_gemms_gpu(T, D, n, stats, monkeypatch) -> None:
    _check_node_split_vs_fp32(T, D, n, stats, "cuda", monkeypatch)


@gpu[0]
@gpu[1]
def test_use_split_under_graph_capture_gpu() -> None:
    """The real capture flag: a80m's narrow gate takes the fp32 SGEMMs eagerly and the split
    inside ``torch.cuda.graph``."""
    x = torch.zeros(16, 8, dtype=torch.bfloat16, device="cuda")
    narrow = gate_gemms.SPLIT_MIN_SCORES - 1
    assert not gate_gemms.use_split(x, narrow)
    graph, seen = torch.cuda.CUDAGraph(), []
    with torch.cuda.graph(graph):
        x.add_(1)
        seen.append(gate_gemms.use_split(x, narrow))
    assert seen == [True]


@gpu[0]
@gpu[1]
@pytest.mark.parametrize(("T", "D", "H", "sx", "sw", "sdz"), CASES)
def test_split_gemms_gpu_match_cpu_emulation(T, D, H, sx, sw, sdz) -> None:
    """The split kernel on the GPU gives the CPU split's bits; cuBLAS (aten::mm.dtype, fp32
    accumulation) against the CPU's fp32 GEMMs of the same bf16 pieces: equal up to the order
    of fp32 additions; and the GPU's against float64."""
    wide = gate_gemms.SPLIT_MIN_SCORES
    assert gate_gemms.use_split(torch.empty(1, 1, dtype=torch.bfloat16, device="cuda"), wide)
    x, w, dz = _inputs(T, D, H, sx, sw, sdz, device="cuda")
    for a in (w, dz):  # the split kernel: integer rounding, exact subtractions: same bits
        for p, q in zip(_pieces(a), _pieces(a.cpu()), strict=True):
            assert torch.equal(_bits(p.cpu()), _bits(q))
    _check_scores(x, w)
    _check_weight_grad(dz, x, w)
    _check_input_grad(dz, x, w)
    on_gpu = (gate_gemms.gate_scores(x, w), *gate_gemms.gate_grads(dz, x, w, True))
    on_cpu = (gate_gemms.gate_scores(x.cpu(), w.cpu()), *gate_gemms.gate_grads(
        dz.cpu(), x.cpu(), w.cpu(), True
    ))  # fmt: skip
    mags = (
        x.cpu().double().abs() @ w.cpu().double().abs().t(),
        dz.cpu().double().abs() @ w.cpu().double().abs(),
        dz.cpu().double().abs().t() @ x.cpu().double().abs(),
    )
    for a, b, mag in zip(on_gpu, on_cpu, mags, strict=True):
        assert rel_err(a, b) <= FP32_TOL["cuda"][0]
        assert ((a.cpu().double() - b.double()).abs() <= FP32_TOL["cuda"][1] * mag).all()


@cpu_triton
def test_bench_gates_diffs_run_on_cpu() -> None:
    """``bench_gates.gate_gemm_diffs`` (what ``--only gates`` prints next to the timings)
    runs the node in both GEMM modes; the differences are fp32-level for the log-probabilities
    and gate gradients and a bf16 ulp or so for dx."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import bench_gates

    x, gates, dys = _node_inputs(130, 48, 76, "cpu", seed=4)
    row = bench_gates.gate_gemm_diffs(x, gates, dys)
    assert gate_gemms.GATE_GEMM == "split_bf16"  # restored
    rel = {
        k: row[f"split_vs_fp32_max_abs_{k}"] / row[f"fp32_max_abs_{k}"] for k in ("logp", "dgates")
    }
    assert 0 < rel["logp"] <= 1e-6 and 0 < rel["dgates"] <= 1e-5, row
    assert row["split_vs_fp32_max_abs_dx"] <= 2.0**-7 * row["fp32_max_abs_dx"], row


def _has_ptxas() -> bool:
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return all((bin_dir / t).exists() for t in ("ptxas", "cuobjdump"))


@pytest.mark.skipif(not _has_ptxas(), reason="needs Triton's NVIDIA backend (ptxas)")
def test_split_kernel_compiles_for_sm90_without_spills() -> None:
    """The split kernel as the GEMMs launch it, compiled by ptxas for sm_90 (no GPU needed; in
    a subprocess, since the interpreter's kernels cannot be compiled): no local memory."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).parent / "gate_kernels_ptxas.py"
    done = subprocess.run(
        [sys.executable, str(script), "split"], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    stacks = dict(line.split() for line in done.stdout.splitlines())
    assert stacks == {"_split": "0", "_split_two": "0"}, stacks
