"""Expert-centric weight gradients of the atomic-expert layer (segmented reductions).

Legend: T tokens, D hidden, N experts, K experts per token, P = T * K pairs, S segment rows of
one chunk (S = BP), BP pairs per chunk, BD columns per program. ``order_P`` lists flat
positions ``t * K + k`` sorted by expert id and ``e_P`` the matching expert ids; a *run* is the
contiguous range of one expert's pairs in that order.

    dup_e   = sum_{pairs p of e} g_p * x_{t_p}       (g = dL/dh)
    ddown_e = sum_{pairs p of e} a_p * dy_{t_p}      (a = w * silu(h))

Two schedules (``GRAD_SCHEDULE``; the same sums, in another fixed order):

"experts" (the default, ``experts_grad_blocks``): program (b, c) owns experts
[16 b, 16 b + 16) and the BD columns of slice c. Their pairs are one contiguous range of the
expert order; it walks them in chunks of BP and adds each chunk into a (16, BD) float32
accumulator with the one-hot product below (row e of the one-hot = pairs of expert 16 b + e),
then writes its 16 rows once, zeros for empty experts. The pairs' tokens and coefficients
(g, a) are gathered into expert order once (one small kernel), so every column slice reads
them contiguously. ``model.expert_grad_coef=bf16`` (``experts_dense_grad.DENSE_COEF``) rounds
each coefficient once to bf16 here too: one tensor-core product per chunk and table instead of
the hi/lo pair ("runs" keeps the split). Against "runs" (below) a chunk needs no segment ranks, carries or masked
stores, and the separate zero-row kernel goes: on an H200 (``bench_grad_paths.py``, uniform
random routing, both tables) 0.74 vs 2.50 ms at a80m's shape (16384, 768, 5776, 64), 0.34 vs
0.89 ms at (16384, 1024, 65536, 16), 1.84 vs 6.43 ms at the paper's (4096, 1024, 102400, 512).
What it does not fix by default: a hot block's pairs are walked by one program (per column
slice), so under a trained router's skew the kernel slows with the imbalance (a80m training
on it measured 229k -> 199k tokens/s over 20 steps as the load imbalance reached 25, against
a routing-blind 236k on the dense GEMMs: ``experts_dense_grad.PAIR_COLUMN_S`` stays at the
"runs" schedule's cost, so "auto" keeps a80m on the dense path). ``experts_grad_blocks.
SEGMENT_PAIRS`` splits hot blocks over programs (partial sums, then a fixed-order merge); it
is off until measured under skewed routing (``bench_grad_paths.py --zipf``). A non-finite
x or dy row reaches all 16 experts of its block (0 * inf in the one-hot product), pairs or not.

"runs" (``_pair_block_grad_kernel``): program (b, c) owns the runs that *start* in pair block
b (BLOCK consecutive sorted pairs) and the BD columns of slice c. It walks its pairs in chunks
of BP, gathers the BP x and dy rows of the chunk at once (many independent loads in flight, the
reason for this layout: the previous one-program-per-expert kernel waited on a chain of
dependent loads for one or two pairs), and reduces them per run with a one-hot matrix product
``W[s, p] = coef_p * [pair p is in segment s]``, so the tensor cores do the segmented sum. A
run that is still open at the end of a chunk is carried in registers into the next chunk; a
run that crosses the block end is finished by the block that owns its start, so every row is
written by exactly one program with a fixed summation order: the result is bitwise repeatable
and needs no float atomics, in both modes (the ``deterministic`` flag has nothing to switch).
A hot expert costs its owner program len(run) pairs; the other blocks skip that run, and the
column slices spread it over D / BD programs.

bf16 rows are reduced with bf16 tensor-core products and fp32 accumulation; the coefficient is
split into a bf16 high part and a bf16 residual, so each product keeps ~16 mantissa bits (x and
dy are exact in bf16). Other dtypes use a float32 (IEEE) product.

``_zero_rows_kernel`` writes the zero gradient rows of experts no pair routes to ("runs").

Pairs with id N ("no expert", see ``experts_pairs``) sort after every real expert; the programs
stop at ``off[N]``, the number of real pairs, read on the device (no host sync).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from omnimoe_kernels import experts_dense_grad
from omnimoe_kernels.experts_grad_blocks import _reduce, expert_block_grads

# Sorted pairs per block (a program's share of the runs); small blocks give more programs for
# small P, large ones bound the number of programs (and re-reads of the pair metadata).
BLOCK_PAIRS = 0  # 0 = chosen from P in ``expert_grads``; tests set a small value
# Tile: pairs reduced per one-hot product (the tensor-core tile's K and M; 16 is tl.dot's
# minimum), columns per program, warps. Picked by ``bench_kernels.py --sweep-tiles`` on the H100
# (docs/benchmarks.md): smaller chunks were faster at every config swept (16 vs 32 pairs:
# 5.7 vs 6.6 ms at the paper setting), and 2 warps beat 4 and 8.
CHUNK_PAIRS = 16
GRAD_BD = 128
GRAD_WARPS = 2
# Software-pipelining depth of the chunk loop: 2 beat Triton's default 3 by 10 to 16% at all
# four swept configs (0.71 vs 0.82 ms at N = 65,536; 5.05 vs 5.82 ms at the paper setting).
GRAD_STAGES = 2
# Which schedule ``expert_grads`` launches: "runs" (``_pair_block_grad_kernel``: blocks of
# sorted pairs, runs carried between chunks and closed where they end) or "experts"
# (``experts_grad_blocks``: blocks of 16 consecutive experts, each reducing its experts'
# contiguous pairs straight into a (16, BD) accumulator; no carries, no per-chunk stores, every
# row written once at the end, empty experts included; hot blocks optionally split). Both use
# CHUNK_PAIRS, GRAD_BD, GRAD_WARPS and GRAD_STAGES.
GRAD_SCHEDULE = "experts"
GRAD_SCHEDULES = ("runs", "experts")


@triton.jit
def _chunk_meta(e_ptr, order_ptr, h_ptr, w_ptr, g_ptr, p0, start, end, P, K, BP: tl.constexpr):
    """Per-pair data of the chunk at p0: what the row gathers and the segmentation need."""
    offs_P = p0 + tl.arange(0, BP)
    ok_P = offs_P < end
    e_P = tl.load(e_ptr + offs_P, mask=ok_P, other=-1)
    prev_P = tl.load(e_ptr + offs_P - 1, mask=ok_P & (offs_P > start), other=-2)
    new_P = ((e_P != prev_P) & ok_P).to(tl.int32)
    q_P = tl.load(order_ptr + offs_P, mask=ok_P, other=0).to(tl.int64)
    g_P = tl.load(g_ptr + q_P, mask=ok_P, other=0.0)
    h_P = tl.load(h_ptr + q_P, mask=ok_P, other=0.0)
    a_P = tl.load(w_ptr + q_P, mask=ok_P, other=0.0).to(tl.float32) * h_P * tl.sigmoid(h_P)
    nxt = p0 + BP
    e_next = tl.load(e_ptr + tl.minimum(nxt, P - 1))
    e_next = tl.where(nxt < end, e_next, -3)
    return ok_P, e_P, new_P, q_P // K, g_P, a_P, e_next


@triton.jit
def _pair_block_grad_kernel(
    x_ptr,  # (T, D)
    dy_ptr,  # (T, D)
    e_ptr,  # (P,) int32 expert ids, expert order
    order_ptr,  # (P,) int32 flat positions, expert order
    h_ptr,  # (P,) float32, flat order
    w_ptr,  # (P,) routing weights, flat order
    g_ptr,  # (P,) float32 dL/dh, flat order
    off_ptr,  # (N + 1,) int64 run starts; off[N] = number of real pairs
    dup_ptr,  # (N, D) out, param dtype
    ddown_ptr,  # (N, D) out, param dtype
    P,
    N,
    D,
    K,
    stride_x,
    stride_dy,
    BLOCK,  # pairs per block (runtime: a new P must not mean a new compile)
    BP: tl.constexpr,
    BD: tl.constexpr,
    SPLIT_BF16: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_D = tl.program_id(1) * BD + tl.arange(0, BD)
    ok_D = offs_D < D
    # Pairs [start, end): skip the tail of a run that began in an earlier block, and run past the
    # block end to finish the last run that begins in this one. Only the first off[N] sorted
    # pairs are real (id N, "no expert", sorts last); ids are clamped below N so that a block
    # with no real pair reads no offset out of range (its start >= b1 then, so it does nothing).
    real = tl.load(off_ptr + N)
    b0 = b * BLOCK
    b1 = tl.minimum(b0 + BLOCK, real)
    e_first = tl.minimum(tl.load(e_ptr + tl.minimum(b0, P - 1)), N - 1)
    prev = tl.minimum(tl.load(e_ptr + tl.maximum(tl.minimum(b0, P) - 1, 0)), N - 1)
    start = tl.where((b0 > 0) & (prev == e_first), tl.load(off_ptr + e_first + 1), b0)
    e_last = tl.minimum(tl.load(e_ptr + tl.maximum(b1 - 1, 0)), N - 1)
    end = tl.load(off_ptr + e_last + 1)
    end = tl.where(start < b1, end, start)

    rows_S = tl.arange(0, BP)
    carry_up_D = tl.zeros([BD], dtype=tl.float32)
    carry_dn_D = tl.zeros([BD], dtype=tl.float32)
    # The pair data of chunk i + 1 is fetched while chunk i's rows are reduced, so a chunk
    # waits on one round of loads (its row gathers) instead of a chain of three.
    ok_P, e_P, new_P, tok_P, g_P, a_P, e_next = _chunk_meta(
        e_ptr, order_ptr, h_ptr, w_ptr, g_ptr, start, start, end, P, K, BP
    )
    for p0 in range(start, end, BP):
        m_PD = ok_P[:, None] & ok_D[None, :]
        x_PD = tl.load(x_ptr + tok_P[:, None] * stride_x + offs_D[None, :], mask=m_PD, other=0)
        dy_PD = tl.load(dy_ptr + tok_P[:, None] * stride_dy + offs_D[None, :], mask=m_PD, other=0)
        n_ok_P, n_e_P, n_new_P, n_tok_P, n_g_P, n_a_P, n_e_next = _chunk_meta(
            e_ptr, order_ptr, h_ptr, w_ptr, g_ptr, p0 + BP, start, end, P, K, BP
        )
        # Segment rank in the chunk; row 0 is the run carried in from the previous chunk when
        # the chunk does not open with a new run.
        first_new = tl.sum(tl.where(rows_S == 0, new_P, 0))
        seg_P = tl.cumsum(new_P, axis=0) - first_new
        onehot_SP = (seg_P[None, :] == rows_S[:, None]) & ok_P[None, :]
        e_S = tl.max(tl.where(onehot_SP, e_P[None, :], -1), axis=1)
        last = tl.max(tl.where(ok_P, seg_P, -1))
        closed_S = (rows_S < last) | ((rows_S == last) & (e_S != e_next))

        up_SD = _reduce(g_P, onehot_SP, x_PD, SPLIT_BF16, False)
        dn_SD = _reduce(a_P, onehot_SP, dy_PD, SPLIT_BF16, False)
        into_S = (rows_S == 0) & (first_new == 0)
        up_SD += tl.where(into_S[:, None], carry_up_D[None, :], 0.0)
        dn_SD += tl.where(into_S[:, None], carry_dn_D[None, :], 0.0)
        open_S = (rows_S == last) & (e_S == e_next)
        carry_up_D = tl.sum(tl.where(open_S[:, None], up_SD, 0.0), axis=0)
        carry_dn_D = tl.sum(tl.where(open_S[:, None], dn_SD, 0.0), axis=0)

        m_SD = (closed_S & (e_S >= 0))[:, None] & ok_D[None, :]
        row_SD = e_S.to(tl.int64)[:, None] * D + offs_D[None, :]
        tl.store(dup_ptr + row_SD, up_SD.to(dup_ptr.dtype.element_ty), mask=m_SD)
        tl.store(ddown_ptr + row_SD, dn_SD.to(ddown_ptr.dtype.element_ty), mask=m_SD)
        ok_P, e_P, new_P, tok_P, g_P, a_P, e_next = (
            n_ok_P, n_e_P, n_new_P, n_tok_P, n_g_P, n_a_P, n_e_next
        )  # fmt: skip


@triton.jit
def _zero_rows_kernel(
    off_ptr,  # (N + 1,) int64 run starts
    dup_ptr,
    ddown_ptr,
    N,
    D,
    BE: tl.constexpr,
    BD: tl.constexpr,
):
    offs_E = tl.program_id(0).to(tl.int64) * BE + tl.arange(0, BE)
    ok_E = offs_E < N
    empty_E = tl.load(off_ptr + offs_E + 1, mask=ok_E, other=0) == tl.load(
        off_ptr + offs_E, mask=ok_E, other=0
    )
    offs_D = tl.program_id(1) * BD + tl.arange(0, BD)
    m_ED = (ok_E & empty_E)[:, None] & (offs_D[None, :] < D)
    ptr_ED = offs_E[:, None] * D + offs_D[None, :]
    zero_ED = tl.zeros([BE, BD], dtype=tl.float32)
    tl.store(dup_ptr + ptr_ED, zero_ED.to(dup_ptr.dtype.element_ty), mask=m_ED)
    tl.store(ddown_ptr + ptr_ED, zero_ED.to(ddown_ptr.dtype.element_ty), mask=m_ED)


def _block_pairs(P: int) -> int:
    """Pairs per block: ~2k blocks for large P, at least 256 pairs (measured: 256-pair blocks
    beat 32-pair ones at P = 65k, 0.24 vs 0.33 ms), at most 2048."""
    if BLOCK_PAIRS:
        return BLOCK_PAIRS
    return max(256, CHUNK_PAIRS, min(2048, triton.next_power_of_2(max(1, P // 2048))))


def expert_grads(
    x_TD: torch.Tensor,
    dy_TD: torch.Tensor,
    order_P: torch.Tensor,
    e_P: torch.Tensor,
    h_P: torch.Tensor,
    w_P: torch.Tensor,
    g_P: torch.Tensor,
    dup_ND: torch.Tensor,
    ddown_ND: torch.Tensor,
    K: int,
    *,
    deterministic: bool,
) -> None:
    """Fill dup_ND and ddown_ND (every row) from the expert-sorted pairs; no host sync.

    x_TD, dy_TD (T, D), any row stride; order_P, e_P (P,) from ``expert_order``; h_P, w_P, g_P
    the (T, K) pair values in flat order; dup_ND, ddown_ND (N, D) outputs, contiguous.
    ``e_P`` may end with pairs of id N ("no expert"): they are skipped.
    ``deterministic`` is accepted for the API: this schedule is always fixed-order (see above).

    Raises:
        ValueError: an unknown ``GRAD_SCHEDULE``; outputs that are not contiguous, not of one
            shape, or not D = x's columns wide (the kernels write rows at ``e * D`` and read D
            columns of x and dy).
    """
    del deterministic
    if GRAD_SCHEDULE not in GRAD_SCHEDULES:
        raise ValueError(f"GRAD_SCHEDULE={GRAD_SCHEDULE!r} must be one of {GRAD_SCHEDULES}")
    if (
        dup_ND.shape != ddown_ND.shape
        or dup_ND.shape[1:] != x_TD.shape[1:]
        or dy_TD.shape != x_TD.shape
        or not (dup_ND.is_contiguous() and ddown_ND.is_contiguous())
    ):
        raise ValueError(
            f"dup_ND {tuple(dup_ND.shape)} and ddown_ND {tuple(ddown_ND.shape)} must be "
            f"contiguous (N, D) with D the columns of x {tuple(x_TD.shape)} and dy "
            f"{tuple(dy_TD.shape)}"
        )
    # The kernels read x and dy rows by their row stride with unit column stride, and the
    # pair arrays as flat (P,) ones: other layouts are copied (a no-op for the callers' own).
    x_TD, dy_TD = (t if t.stride(-1) == 1 else t.contiguous() for t in (x_TD, dy_TD))
    order_P, e_P = order_P.contiguous(), e_P.contiguous()
    h_P, w_P, g_P = h_P.contiguous(), w_P.contiguous(), g_P.contiguous()
    N, D = dup_ND.shape
    P = e_P.numel()
    dev = x_TD.device
    experts_N1 = torch.arange(N + 1, device=dev, dtype=torch.int32)
    off_N1 = torch.searchsorted(e_P, experts_N1)
    BD = max(16, min(GRAD_BD, triton.next_power_of_2(D)))
    # Triton 3.6's CPU interpreter gets bf16 tl.dot wrong (garbage magnitudes), so CPU runs take
    # the float32 product; the GPU tests cover the bf16 split path.
    split = x_TD.is_cuda and x_TD.dtype == torch.bfloat16 and dy_TD.dtype == torch.bfloat16
    if GRAD_SCHEDULE == "experts":
        expert_block_grads(
            x_TD, dy_TD, order_P, e_P, h_P, w_P, g_P, off_N1, dup_ND, ddown_ND, K,
            tile=(CHUNK_PAIRS, BD, GRAD_WARPS, GRAD_STAGES), split_bf16=split,
            coef_bf16=experts_dense_grad.DENSE_COEF == "bf16",
        )  # fmt: skip
        return
    BE = 16
    BDZ = min(256, triton.next_power_of_2(max(D, 16)))
    _zero_rows_kernel[(triton.cdiv(N, BE), triton.cdiv(D, BDZ))](
        off_N1, dup_ND, ddown_ND, N, D, BE=BE, BD=BDZ, num_warps=4
    )
    if P == 0:
        return
    block = _block_pairs(P)
    _pair_block_grad_kernel[(triton.cdiv(P, block), triton.cdiv(D, BD))](
        x_TD, dy_TD, e_P, order_P, h_P, w_P, g_P, off_N1, dup_ND, ddown_ND,
        P, N, D, K, x_TD.stride(0), dy_TD.stride(0), block,
        BP=CHUNK_PAIRS, BD=BD, SPLIT_BF16=split, num_warps=GRAD_WARPS, num_stages=GRAD_STAGES,
    )  # fmt: skip
