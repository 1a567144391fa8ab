"""The router gate GEMMs on bf16 tensor cores, fp32 operands split exactly into bf16 pieces.

Shape suffixes: T tokens, D hidden, H gate scores (all gates concatenated).

Why: the gate logits and their gradients are fp32 (the top-K selection and the log-softmax
need them), and torch runs an fp32 matmul as an SGEMM without tensor cores (TF32 is off), at
~1/15 of the H200's bf16 tensor-core rate, plus fp32 copies of x each way. With a bf16
activation x the same fp32 results come from bf16 tensor-core GEMMs with fp32 accumulation:

    exact split (``omnimoe_kernels.bf16_split``, one Triton pass): bf16 has 8 significant
    bits, fp32 24, so an fp32 tensor a is exactly a1 + a2 + a3 with a1 = bf16(a), a2 =
    bf16(a - a1), a3 = a - a1 - a2 (each difference exact in fp32, a3 fits bf16), for a = 0
    and 2^-110 <= |a| < 3.39e38; below 2^-110 only bits under 2^-133 go (bf16 has fp32's
    exponent range), above it a1 is inf (an fp32 GEMM on such values overflows as well).
    exact products: bf16 x bf16 has <= 16 significant bits, exact in fp32, and cuBLAS
    accumulates in fp32 (``torch.mm(..., out_dtype=torch.float32)``, aten::mm.dtype) and
    writes fp32. So sum_i x @ w_i^T is the fp32 GEMM up to the order of the fp32 additions.

    z  = x W^T:  x is bf16 (exact): 3 terms x w_i^T, i.e. fp32 accuracy.
    dW = dz^T x: x exact, dz (fp32) split: 3 terms dz_i^T x, fp32 accuracy.
    dx = dz W:   both split; dx is rounded to bf16 at the end, so 3 of the 9 terms suffice:
                 dz1 w1 + dz1 w2 + dz2 w1. The 6 dropped ones, dz1 w3 + dz2 (w2 + w3) + dz3 W,
                 sum to <= (3 + 2^-7) 2^-16 sum_h |dz_th| |W_hd| (|a2| <= 2^-8 (1 + 2^-8) |a|,
                 |a3| <= 2^-16 |a|): relative to the magnitude sum 4.6e-5, 1/42 of bf16's half
                 ulp 2^-9, so dx before rounding is as good as an fp32 GEMM's for bf16 purposes
                 (both move a value by one bf16 ulp only where it lies that close to a rounding
                 boundary, or where dz W cancels to far below its magnitude sum).

On CPU (CI and tests; aten::mm.dtype has no CPU kernel) the very same split runs (the Triton
kernel under ``TRITON_INTERPRET=1``, same bits), each GEMM as ``a.float() @ b.float()`` of the
bf16 pieces: exact products, fp32 accumulation, so the tests exercise the decomposition that
runs on the GPU. Deterministic: the split is elementwise and cuBLAS GEMMs of fixed shapes are
bitwise repeatable run to run (as the fp32 SGEMMs they replace), so the node's bitwise-repeat
guarantee holds. Launches: forward split + GEMM + block sum (3; the fp32 GEMMs: cast + GEMM),
backward 2 splits + 2 GEMMs + block sum + dx cast (6; fp32: 4).

``GATE_GEMM`` selects "split_bf16" (the default) or "fp32" (the fp32 SGEMMs, bitwise what the
node computed before; benchmarks time both). The split runs only for bf16 activations (fp32
runs, ``trainer.precision=fp32``, keep the fp32 GEMMs bitwise), on CUDA only where the
installed torch has aten::mm.dtype (torch >= 2.8) and the GPU bf16 tensor cores (sm_80+), and
for gates of at least ``SPLIT_MIN_SCORES`` scores per token, except while a CUDA graph is
being captured, where it runs at every width (see ``SPLIT_MIN_SCORES``).
"""

from __future__ import annotations

import torch

from omnimoe_kernels.bf16_split import split_into_slots

GATE_GEMMS = ("split_bf16", "fp32")
GATE_GEMM = "split_bf16"
#: Launched eagerly, the split pays only for wide gates: its launches (3 forward and 6 backward
#: against the SGEMMs' 2 and 4) cost more host time than the thin SGEMMs of a narrow gate cost
#: GPU time. Measured on an H200 (``bench_kernels.py --only gates``, eager, T = 16384, forward +
#: backward): H = 152, d = 768 (a80m) 1.066 ms split vs 0.948 ms fp32; H = 2048, d = 2048
#: 2.44 ms vs 8.84 ms; a80m training eager 201.1k tokens/s split vs 204.5k fp32. Replayed from
#: a CUDA graph only GPU time counts, and there the SIMT SGEMMs lose at every width: a80m
#: training (``bench_training.py``, one H200 each, 2026-11-30) 246.4k vs 232.6k tokens/s with
#: ``trainer.cuda_graphs=mlp``, 270.3k vs 256.5k with compile + graphs. So below this many
#: scores per token the fp32 GEMMs run, unless the call is being captured into a graph.
SPLIT_MIN_SCORES = 512

# aten::mm.dtype: bf16 x bf16 -> fp32 output from cuBLAS (torch >= 2.8, CUDA only).
_HAS_MM_DTYPE = "dtype" in torch.ops.aten.mm.overloads()


def use_split(x_TD: torch.Tensor, num_scores: int) -> bool:
    """Whether the gate GEMMs of this activation and ``num_scores`` (H) gate scores per token
    run as split bf16 GEMMs (see the module docstring and ``SPLIT_MIN_SCORES``: at every width
    while a CUDA graph is being captured). Raises ValueError for an unknown ``GATE_GEMM``."""
    if GATE_GEMM not in GATE_GEMMS:
        raise ValueError(f"GATE_GEMM={GATE_GEMM!r} must be one of {GATE_GEMMS}")
    if GATE_GEMM != "split_bf16" or x_TD.dtype != torch.bfloat16:
        return False
    if x_TD.device.type != "cuda":
        return num_scores >= SPLIT_MIN_SCORES
    if not _tensor_core_mm(x_TD.device):
        return False
    return num_scores >= SPLIT_MIN_SCORES or torch.cuda.is_current_stream_capturing()


def _tensor_core_mm(device: torch.device) -> bool:
    """Whether ``device`` (CUDA) runs aten::mm.dtype on bf16 tensor cores (torch >= 2.8, sm_80+)."""
    return _HAS_MM_DTYPE and torch.cuda.get_device_capability(device)[0] >= 8


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b of bf16 matrices with fp32 accumulation and fp32 output."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    # CPU: bf16 -> fp32 is exact and bf16 x bf16 products are exact in fp32.
    return a.float() @ b.float()


def gate_scores(x_TD: torch.Tensor, w_HD: torch.Tensor) -> torch.Tensor:
    """z_TH = x_TD w_HD^T in fp32 (a fresh contiguous tensor) from bf16 ``x_TD`` and fp32
    ``w_HD``: one GEMM against W's three pieces stacked along H, (T, D) x (D, 3H), then the
    three (T, H) blocks summed. Why stacked and not three GEMMs: x, the large operand, is read
    once in one launch (and 3H columns fill tensor-core tiles better than H = 152 at a80m);
    three GEMMs would read x three times and write the same three partial products. The
    (T, 3H) fp32 products are transient (30 MB at a80m, 400 MB at T = 16384, H = 2048)."""
    H, D = w_HD.shape
    T = x_TD.shape[0]
    with torch.autocast(x_TD.device.type, enabled=False):
        w_3HD = torch.empty(1, 3, H * D, dtype=torch.bfloat16, device=w_HD.device)
        split_into_slots(w_HD.reshape(1, H * D), w_3HD, hi=0, mid=1, lo=2)  # [w1; w2; w3]
        return _mm(x_TD, w_3HD.view(3 * H, D).t()).view(T, 3, H).sum(1)


def gate_grads(
    dz_TH: torch.Tensor, x_TD: torch.Tensor, w_HD: torch.Tensor, input_grad: bool
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(dx_TD, dw_HD) in fp32 of z = x w^T: dw = dz^T x (fp32 accuracy), dx = dz w (the three
    leading terms; None unless ``input_grad``), from fp32 ``dz_TH``, bf16 ``x_TD``, fp32
    ``w_HD``. dz is split once into slots [dz3, dz1, dz2, dz1] of a (T, 4, H) bf16 buffer:
    slots 0-2 hold every piece (dW: one GEMM, (3H, T) x (T, D), its three (H, D) blocks
    summed), slots 1-3 are the A operand of dx against [w2; w1; w1] (one GEMM with K = 3H,
    fp32 accumulation throughout, no partial sums written): dz1 w2 + dz2 w1 + dz1 w1."""
    T, H = dz_TH.shape
    D = x_TD.shape[1]
    with torch.autocast(dz_TH.device.type, enabled=False):
        # Four slots even without dx: dW's GEMM then has the same operand layout (leading
        # dimension 4H) either way, so cuBLAS picks the same kernel and dW the same bits.
        dz_TSH = torch.empty(T, 4, H, dtype=torch.bfloat16, device=dz_TH.device)
        hi2 = 3 if input_grad else -1
        split_into_slots(dz_TH.contiguous(), dz_TSH, hi=1, mid=2, lo=0, hi2=hi2)
        dw_HD = _mm(dz_TSH[:, :3].reshape(T, 3 * H).t(), x_TD).view(3, H, D).sum(0)
        if not input_grad:
            return None, dw_HD
        w_3HD = torch.empty(1, 3, H * D, dtype=torch.bfloat16, device=w_HD.device)
        split_into_slots(w_HD.reshape(1, H * D), w_3HD, hi=1, mid=0, hi2=2)  # [w2; w1; w1]
        return _mm(dz_TSH[:, 1:].reshape(T, 3 * H), w_3HD.view(3 * H, D)), dw_HD
