"""An fp32 tensor split exactly into three bf16 pieces, a = a1 + a2 + a3, in one launch.

    a1 = bf16(a),  a2 = bf16(a - a1),  a3 = a - a1 - a2  (bf16 = round to nearest even)

Why it is exact: bf16 keeps 8 significant bits of fp32's 24 and has fp32's exponent range.
a - a1 is exact in fp32 and, as |a - a1| <= 2^-8 |a| (half an ulp of a1) and it is a multiple
of a's fp32 ulp, has at most 16 significant bits; a2 takes the top 8 of them (rounded), the
rest a3 has at most 8 and bf16 holds it. Exact for a = 0 and 2^-110 <= |a| < 3.39e38: below
2^-110 a3 falls under bf16's smallest subnormal 2^-133 and is rounded (absolute error <=
2^-134: only bits at the very bottom go); from bf16's largest value plus half an ulp
(~3.3961e38) a1 is inf. Non-finite inputs give non-finite pieces (inf: a1 = inf, NaN after).

``split_into_slots`` writes the pieces into chosen slots of a (R, S, C) buffer, so a GEMM can
read pieces side by side (``gate_gemms``). On CUDA (and on CPU under ``TRITON_INTERPRET=1``)
it is one Triton kernel: a single pass that reads a once and writes 2 to 4 pieces, where the
same split as PyTorch ops takes 4 to 5 passes and launches (``split_reference``, the path
elsewhere and the tests' reference). The kernel rounds on the bit pattern with integer
operations only, exactly as ``torch.Tensor.bfloat16`` rounds finite values and inf (NaN ->
the NaN 0x7FC0). So it needs no float-to-bf16 conversion, which Triton's interpreter does not
round as the GPU does, and the interpreter and the GPU produce the same bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

import omnimoe_kernels

# Elements per program: 1024 over 4 warps (8 per thread, a 32-byte fp32 load each). Under
# Triton's CPU interpreter each program costs Python overhead, so there programs are larger
# (elementwise: the block size changes no result).
BLOCK = 1024
INTERPRET_BLOCK = 1 << 16


@triton.jit
def _round_bf16(a):
    """(bits, value): a rounded to nearest even at 8 significant bits, as the bf16 bit pattern
    (sign-extended in an int32) and as fp32. NaN -> the quiet NaN 0x7FC0."""
    bits = a.to(tl.int32, bitcast=True)
    top = bits >> 16  # arithmetic: the sign extends, and top + 1 steps the magnitude
    low = bits & 0xFFFF
    up = (low > 0x8000) | ((low == 0x8000) & ((top & 1) == 1))
    top = tl.where(a != a, 0x7FC0, top + up.to(tl.int32))
    return top, (top << 16).to(tl.float32, bitcast=True)


@triton.jit
def _split(
    a_ptr,  # (R, C) fp32, contiguous
    out_ptr,  # (R, S, C) bf16 viewed as int16, contiguous
    n,  # R * C
    C,
    S: tl.constexpr,
    HI: tl.constexpr,  # slot of a1
    MID: tl.constexpr,  # slot of a2
    LO: tl.constexpr,  # slot of a3, -1: not written
    HI2: tl.constexpr,  # a second slot of a1, -1: none
    BLOCK: tl.constexpr,
):
    """Grid (ceil(n / BLOCK),): element i = r * C + c goes to out[r, slot, c]."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    a = tl.load(a_ptr + i, mask=ok, other=0.0)
    hi_bits, hi = _round_bf16(a)
    rest = a - hi  # exact
    mid_bits, mid = _round_bf16(rest)
    out = out_ptr + i + (i // C) * ((S - 1) * C)  # r * S * C + c
    tl.store(out + HI * C, hi_bits.to(tl.int16), mask=ok)
    tl.store(out + MID * C, mid_bits.to(tl.int16), mask=ok)
    if LO >= 0:
        lo_bits, _ = _round_bf16(rest - mid)  # exact, and exact in bf16: no rounding
        tl.store(out + LO * C, lo_bits.to(tl.int16), mask=ok)
    if HI2 >= 0:
        tl.store(out + HI2 * C, hi_bits.to(tl.int16), mask=ok)


def split_reference(
    a: torch.Tensor, hi: torch.Tensor, mid: torch.Tensor, lo: torch.Tensor | None = None
) -> None:
    """The split as PyTorch ops: the pieces of fp32 ``a`` into bf16 ``hi``, ``mid`` and
    (unless None) ``lo``, tensors of a's shape (may be views). The subtractions are exact in
    fp32 and the last cast is exact, so the casts' rounding (nearest even) is all there is."""
    hi.copy_(a)
    rest = a - hi  # fp32 (promoted), exact
    mid.copy_(rest)
    if lo is not None:
        torch.sub(rest, mid, out=lo)  # computed in fp32, exact, exact in bf16


def split_into_slots(
    a_RC: torch.Tensor, out_RSC: torch.Tensor, hi: int, mid: int, lo: int = -1, hi2: int = -1
) -> None:
    """Write a1, a2, a3 of fp32 ``a_RC`` (R, C) into slots ``hi``, ``mid``, ``lo`` of the bf16
    buffer ``out_RSC`` (R, S, C), a1 once more into slot ``hi2``; -1: that piece not written.
    Both contiguous. Triton where ``omnimoe_kernels.resolve_backend`` says so, else
    ``split_reference`` (the same bits). Raises ValueError for other dtypes or layouts."""
    R, C = a_RC.shape
    if (
        a_RC.dtype != torch.float32
        or out_RSC.dtype != torch.bfloat16
        or out_RSC.shape[0] != R
        or out_RSC.shape[2] != C
        or not (a_RC.is_contiguous() and out_RSC.is_contiguous())
    ):
        raise ValueError(
            f"split_into_slots: need contiguous fp32 (R, C) and bf16 (R, S, C), got "
            f"{a_RC.dtype} {tuple(a_RC.shape)} and {out_RSC.dtype} {tuple(out_RSC.shape)}"
        )
    S = out_RSC.shape[1]
    if not all(-1 <= s < S for s in (hi, mid, lo, hi2)) or hi < 0 or mid < 0:
        raise ValueError(f"split_into_slots: slots {(hi, mid, lo, hi2)} outside [0, {S})")
    n = R * C
    if n == 0:
        return
    if omnimoe_kernels.resolve_backend("auto", a_RC.device) == "triton":
        block = BLOCK if a_RC.is_cuda else INTERPRET_BLOCK
        _split[(triton.cdiv(n, block),)](
            a_RC, out_RSC.view(torch.int16), n, C,
            S=S, HI=hi, MID=mid, LO=lo, HI2=hi2, BLOCK=block, num_warps=4,
        )  # fmt: skip
        return
    split_reference(a_RC, out_RSC[:, hi], out_RSC[:, mid], None if lo < 0 else out_RSC[:, lo])
    if hi2 >= 0:
        out_RSC[:, hi2].copy_(out_RSC[:, hi])
