"""The "experts" schedule of the expert weight gradients: blocks of experts, hot ones split.

Legend: T tokens, D hidden, N experts, K experts per token, P = T * K pairs, BE experts per
block (16: the one-hot product's M, tl.dot's minimum), NB = ceil(N / BE) blocks, BP pairs per
chunk, BD columns per program, S = ``SEGMENT_PAIRS``, U work items, L scratch slots.

    dup_e   = sum_{pairs p of e} g_p * x_{t_p}       (g = dL/dh)
    ddown_e = sum_{pairs p of e} a_p * dy_{t_p}      (a = w * silu(h))

The pairs sorted by expert make each block's pairs one contiguous range. A work item (one
program per column slice) walks a range in chunks of BP and adds each chunk into a (BE, BD)
float32 accumulator with the one-hot product ``W[e, p] = coef_p * [pair p is expert e's]``
(tensor cores for bf16 rows: the coefficient as a bf16 high part and a bf16 residual, ~16
mantissa bits, or with ``coef_bf16`` (``model.expert_grad_coef=bf16``) the coefficient
rounded once to bf16 and one product; float32 IEEE products otherwise), then writes its BE
rows once (zeros for empty experts). The pairs' tokens and coefficients are gathered into
expert order once (``_pair_coefs_kernel``), so every column slice reads them contiguously.

Why split: a block's work is its pairs, and a trained router is skewed (a80m's load imbalance,
the busiest expert's pairs over the mean, reached 25 within 20 steps), so one block can hold
many times the mean and its program is the kernel's tail. With S > 0 a block of more than S
pairs is cut into ceil(pairs / S) segments, one work item each, that write their (BE, D)
partial sums to scratch; ``_merge_partials_kernel`` then adds each split block's partials in
segment order and writes its rows. Every sum keeps a fixed order, so results are bitwise
repeatable (not bitwise equal across different S). The work map is built on the device (no
host sync), so the grid is sized for the worst case: U = NB + ceil(P / S) work items (those
past the real count exit at once) and L = 2 ceil(P / S) scratch slots of BE x D float32 per
table (a split block of n > S pairs has ceil(n / S) < 2 n / S segments).

Pairs with id N ("no expert") sort after every real expert, past ``off[N]``: no block reaches
them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Experts per block (the one-hot product's M: 16 is tl.dot's minimum).
BLOCK_EXPERTS = 16
#: S, the most pairs one work item reduces before its block is split (0: never split). Off
#: until measured on a GPU under skewed routing (``bench_grad_paths.py --zipf``); scratch is
#: 2 tables x 2 ceil(P / S) x 16 x D x 4 bytes (a80m, S = 2048: 100 MB while the call runs).
SEGMENT_PAIRS = 0


@triton.jit
def _reduce(coef_P, onehot_SP, rows_PD, SPLIT_BF16: tl.constexpr, COEF_BF16: tl.constexpr):
    """sum_p onehot[s, p] * coef[p] * rows[p, :] -> (S, BD) float32, in a fixed order.
    ``COEF_BF16``: the coefficients are bf16 values already (``_pair_coefs_kernel`` rounded
    them), so the tensor-core path needs one product, not the hi/lo pair."""
    w_SP = tl.where(onehot_SP, coef_P[None, :], 0.0)
    if SPLIT_BF16:
        hi_SP = w_SP.to(tl.bfloat16)
        acc_SD = tl.dot(hi_SP, rows_PD, out_dtype=tl.float32)
        if COEF_BF16:
            return acc_SD
        lo_SP = (w_SP - hi_SP.to(tl.float32)).to(tl.bfloat16)
        return tl.dot(lo_SP, rows_PD, acc=acc_SD, out_dtype=tl.float32)
    return tl.dot(w_SP, rows_PD.to(tl.float32), input_precision="ieee", out_dtype=tl.float32)


@triton.jit
def _block_sums(
    x_ptr, dy_ptr, e_ptr, tok_ptr, cu_ptr, cd_ptr, rows_E, offs_D, ok_D, start, end,
    stride_x, stride_dy,
    BE: tl.constexpr, BP: tl.constexpr, BD: tl.constexpr, SPLIT_BF16: tl.constexpr,
    COEF_BF16: tl.constexpr,
):  # fmt: skip
    """(up_ED, dn_ED) float32 (BE, BD): the pairs [start, end) of the expert order reduced into
    the experts ``rows_E``, chunk after chunk in pair order (fixed: bitwise repeatable)."""
    up_ED = tl.zeros([BE, BD], dtype=tl.float32)
    dn_ED = tl.zeros([BE, BD], dtype=tl.float32)
    for p0 in range(start, end, BP):
        offs_P = p0 + tl.arange(0, BP)
        ok_P = offs_P < end
        e_P = tl.load(e_ptr + offs_P, mask=ok_P, other=-1).to(tl.int64)
        tok_P = tl.load(tok_ptr + offs_P, mask=ok_P, other=0).to(tl.int64)
        cu_P = tl.load(cu_ptr + offs_P, mask=ok_P, other=0.0)
        cd_P = tl.load(cd_ptr + offs_P, mask=ok_P, other=0.0)
        onehot_EP = e_P[None, :] == rows_E[:, None]  # masked pairs (id -1) meet no row
        m_PD = ok_P[:, None] & ok_D[None, :]
        x_PD = tl.load(x_ptr + tok_P[:, None] * stride_x + offs_D[None, :], mask=m_PD, other=0)
        up_ED += _reduce(cu_P, onehot_EP, x_PD, SPLIT_BF16, COEF_BF16)
        dy_PD = tl.load(dy_ptr + tok_P[:, None] * stride_dy + offs_D[None, :], mask=m_PD, other=0)
        dn_ED += _reduce(cd_P, onehot_EP, dy_PD, SPLIT_BF16, COEF_BF16)
    return up_ED, dn_ED


@triton.jit
def _store_rows(dup_ptr, ddown_ptr, up_ED, dn_ED, rows_E, offs_D, m_ED, D):
    """Rows ``rows_E`` (columns ``offs_D``) of both gradients, in their dtype, where ``m_ED``."""
    ptr_ED = rows_E[:, None] * D + offs_D[None, :]
    tl.store(dup_ptr + ptr_ED, up_ED.to(dup_ptr.dtype.element_ty), mask=m_ED)
    tl.store(ddown_ptr + ptr_ED, dn_ED.to(ddown_ptr.dtype.element_ty), mask=m_ED)


@triton.jit
def _expert_block_grad_kernel(
    x_ptr,  # (T, D)
    dy_ptr,  # (T, D)
    e_ptr,  # (P,) int32 expert ids, expert order
    tok_ptr,  # (P,) int32 token of each pair, expert order
    cu_ptr,  # (P,) float32 g of each pair (dL/dh), expert order
    cd_ptr,  # (P,) float32 a = w * silu(h) of each pair, expert order
    off_ptr,  # (N + 1,) int64 run starts
    dup_ptr,  # (N, D) out, param dtype
    ddown_ptr,  # (N, D) out, param dtype
    N,
    D,
    stride_x,
    stride_dy,
    BE: tl.constexpr,
    BP: tl.constexpr,
    BD: tl.constexpr,
    SPLIT_BF16: tl.constexpr,
    COEF_BF16: tl.constexpr,
):
    """Program (b, c), S = 0: all pairs of experts [b * BE, b * BE + BE), columns slice c."""
    e0 = tl.program_id(0).to(tl.int64) * BE
    rows_E = e0 + tl.arange(0, BE)
    offs_D = tl.program_id(1) * BD + tl.arange(0, BD)
    ok_D = offs_D < D
    start = tl.load(off_ptr + e0)
    end = tl.load(off_ptr + tl.minimum(e0 + BE, N))
    up_ED, dn_ED = _block_sums(
        x_ptr, dy_ptr, e_ptr, tok_ptr, cu_ptr, cd_ptr, rows_E, offs_D, ok_D, start, end,
        stride_x, stride_dy, BE, BP, BD, SPLIT_BF16, COEF_BF16,
    )  # fmt: skip
    m_ED = (rows_E < N)[:, None] & ok_D[None, :]
    _store_rows(dup_ptr, ddown_ptr, up_ED, dn_ED, rows_E, offs_D, m_ED, D)


@triton.jit
def _expert_segment_grad_kernel(
    x_ptr,  # (T, D)
    dy_ptr,  # (T, D)
    e_ptr,  # (P,) int32 expert ids, expert order
    tok_ptr,  # (P,) int32 token of each pair, expert order
    cu_ptr,  # (P,) float32 g of each pair (dL/dh), expert order
    cd_ptr,  # (P,) float32 a = w * silu(h) of each pair, expert order
    off_ptr,  # (N + 1,) int64 run starts
    blk_ptr,  # (U,) int64 block of each work item (>= NB: no work)
    seg_ptr,  # (U,) int64 segment of that block
    nseg_ptr,  # (NB,) int64 segments of each block (1: not split)
    slot_ptr,  # (NB,) int64 first scratch slot of each split block
    dup_ptr,  # (N, D) out, param dtype
    ddown_ptr,  # (N, D) out, param dtype
    pu_ptr,  # (L, BE, D) float32 partial dup of split blocks
    pd_ptr,  # (L, BE, D) float32 partial ddown
    N,
    D,
    NB,
    SEG,
    stride_x,
    stride_dy,
    BE: tl.constexpr,
    BP: tl.constexpr,
    BD: tl.constexpr,
    SPLIT_BF16: tl.constexpr,
    COEF_BF16: tl.constexpr,
):
    """Work item w, columns slice c, S > 0: the pairs of segment seg[w] of block blk[w], stored
    as the block's rows (block not split) or as a partial in its scratch slot."""
    w = tl.program_id(0)
    b = tl.load(blk_ptr + w)
    live = b < NB
    b = tl.minimum(b, NB - 1)
    j = tl.load(seg_ptr + w)
    nseg = tl.load(nseg_ptr + b)
    e0 = b * BE
    rows_E = e0 + tl.arange(0, BE)
    offs_D = tl.program_id(1) * BD + tl.arange(0, BD)
    ok_D = offs_D < D
    start = tl.load(off_ptr + e0) + j * SEG
    end = tl.load(off_ptr + tl.minimum(e0 + BE, N))
    end = tl.where(nseg > 1, tl.minimum(start + SEG, end), end)
    end = tl.where(live, end, start)
    up_ED, dn_ED = _block_sums(
        x_ptr, dy_ptr, e_ptr, tok_ptr, cu_ptr, cd_ptr, rows_E, offs_D, ok_D, start, end,
        stride_x, stride_dy, BE, BP, BD, SPLIT_BF16, COEF_BF16,
    )  # fmt: skip
    m_ED = (live & (nseg == 1) & (rows_E < N))[:, None] & ok_D[None, :]
    _store_rows(dup_ptr, ddown_ptr, up_ED, dn_ED, rows_E, offs_D, m_ED, D)
    part_E = (tl.load(slot_ptr + b) + j) * BE + tl.arange(0, BE)
    m_part = (live & (nseg > 1))[:, None] & ok_D[None, :]
    _store_rows(pu_ptr, pd_ptr, up_ED, dn_ED, part_E, offs_D, m_part, D)


@triton.jit
def _merge_partials_kernel(
    nseg_ptr,  # (NB,) int64
    slot_ptr,  # (NB,) int64
    pu_ptr,  # (L, BE, D) float32
    pd_ptr,  # (L, BE, D) float32
    dup_ptr,  # (N, D) out
    ddown_ptr,  # (N, D) out
    N,
    D,
    BE: tl.constexpr,
    BD: tl.constexpr,
):
    """Block b, columns slice c: a split block's rows = its partials summed in segment order."""
    b = tl.program_id(0).to(tl.int64)
    nseg = tl.load(nseg_ptr + b)
    slot0 = tl.load(slot_ptr + b)
    offs_D = tl.program_id(1) * BD + tl.arange(0, BD)
    ok_D = offs_D < D
    local_E = tl.arange(0, BE)
    up_ED = tl.zeros([BE, BD], dtype=tl.float32)
    dn_ED = tl.zeros([BE, BD], dtype=tl.float32)
    for j in range(0, tl.where(nseg > 1, nseg, 0)):
        ptr = ((slot0 + j) * BE + local_E)[:, None] * D + offs_D[None, :]
        up_ED += tl.load(pu_ptr + ptr, mask=ok_D[None, :], other=0.0)
        dn_ED += tl.load(pd_ptr + ptr, mask=ok_D[None, :], other=0.0)
    rows_E = b * BE + local_E
    m_ED = ((nseg > 1) & (rows_E < N))[:, None] & ok_D[None, :]
    _store_rows(dup_ptr, ddown_ptr, up_ED, dn_ED, rows_E, offs_D, m_ED, D)


@triton.jit
def _pair_coefs_kernel(
    order_ptr,  # (P,) int64 flat pair positions t * K + k, expert order
    g_ptr,  # (P,) g = dL/dh, flat order
    h_ptr,  # (P,) h, flat order
    w_ptr,  # (P,) routing weights, flat order
    tok_ptr,  # (P,) int32 out: each pair's token, expert order
    cu_ptr,  # (P,) float32 out: g, expert order
    cd_ptr,  # (P,) float32 out: a = w * silu(h), expert order
    P,
    K,
    BLOCK: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    """The pairs' tokens and coefficients gathered into expert order in one pass (PyTorch took
    seven launches for the same: ~25 us of a 0.78 ms layer step at (16384, 1024, 65536, 16));
    ``ROUND_BF16``: each coefficient rounded to the nearest bf16 value (ties to even)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < P
    flat = tl.load(order_ptr + offs, mask=ok, other=0).to(tl.int64)
    tl.store(tok_ptr + offs, (flat // K).to(tl.int32), mask=ok)
    cu = tl.load(g_ptr + flat, mask=ok, other=0.0).to(tl.float32)
    h = tl.load(h_ptr + flat, mask=ok, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + flat, mask=ok, other=0.0).to(tl.float32)
    cd = w * h * tl.sigmoid(h)
    if ROUND_BF16:
        cu, cd = _round_bf16(cu), _round_bf16(cd)
    tl.store(cu_ptr + offs, cu, mask=ok)
    tl.store(cd_ptr + offs, cd, mask=ok)


@triton.jit
def _round_bf16(v):
    """float32 -> the nearest bf16 value, ties to even, kept in float32. By its bits, because
    Triton's CPU interpreter truncates ``.to(tl.bfloat16)`` (the GPU rounds to nearest): the CPU
    tests then check the very values the GPU uses. NaN stays NaN, +-inf stay."""
    bits = v.to(tl.uint32, bitcast=True)
    up = bits + 0x7FFF + ((bits >> 16) & 1)
    rounded = ((up >> 16) << 16).to(tl.float32, bitcast=True)  # stays uint32 (no 64-bit mask)
    return tl.where(v != v, v, rounded)


def work_map(off_N1: torch.Tensor, num_pairs: int, segment: int) -> tuple[torch.Tensor, ...]:
    """(blk_U, seg_U, nseg_B, slot_B, slots): each work item's block and segment, each block's
    segment count and first scratch slot, and the scratch slots to allocate; on the device.

    ``off_N1`` (N + 1,) run starts; ``segment`` = S (0: one segment per block). U = NB +
    ceil(P / S); work items past the real count get block NB (no work).
    """
    N = off_N1.numel() - 1
    dev = off_N1.device
    nb = triton.cdiv(N, BLOCK_EXPERTS)
    firsts_B = torch.arange(nb, device=dev, dtype=torch.int64) * BLOCK_EXPERTS
    pairs_B = off_N1[(firsts_B + BLOCK_EXPERTS).clamp(max=N)] - off_N1[firsts_B]
    if segment > 0:
        nseg_B = torch.where(pairs_B > segment, (pairs_B + segment - 1) // segment, 1)
        extra, slots = triton.cdiv(num_pairs, segment), 2 * triton.cdiv(num_pairs, segment)
    else:
        nseg_B = torch.ones_like(pairs_B)
        extra, slots = 0, 0
    ends_B = torch.cumsum(nseg_B, 0)
    work_U = torch.arange(nb + extra, device=dev, dtype=torch.int64)
    blk_U = torch.searchsorted(ends_B, work_U, right=True)
    inside_U = blk_U.clamp(max=nb - 1)
    seg_U = work_U - (ends_B[inside_U] - nseg_B[inside_U])
    split_B = torch.where(nseg_B > 1, nseg_B, 0)
    slot_B = torch.cumsum(split_B, 0) - split_B
    return blk_U, seg_U, nseg_B, slot_B, slots


def expert_block_grads(
    x_TD: torch.Tensor,
    dy_TD: torch.Tensor,
    order_P: torch.Tensor,
    e_P: torch.Tensor,
    h_P: torch.Tensor,
    w_P: torch.Tensor,
    g_P: torch.Tensor,
    off_N1: torch.Tensor,
    dup_ND: torch.Tensor,
    ddown_ND: torch.Tensor,
    K: int,
    *,
    tile: tuple[int, int, int, int],
    split_bf16: bool,
    coef_bf16: bool = False,
) -> None:
    """Fill every row of dup_ND and ddown_ND (N, D) from the expert-sorted pairs (``order_P``
    flat positions t * K + k, ``e_P`` their int32 ids, ``off_N1`` each expert's first pair);
    ``tile`` = (BP, BD, warps, stages); ``split_bf16``: bf16 rows on tensor cores (hi/lo
    coefficients), ``coef_bf16``: each coefficient rounded once to bf16 instead (bf16 rows
    only). No host sync."""
    N, D = dup_ND.shape
    if N == 0:
        return
    BP, BD, warps, stages = tile
    coef_bf16 = coef_bf16 and x_TD.dtype == torch.bfloat16 and dy_TD.dtype == torch.bfloat16
    P = order_P.numel()
    dev = x_TD.device
    tok_P = torch.empty(P, device=dev, dtype=torch.int32)
    cu_P = torch.empty(P, device=dev, dtype=torch.float32)
    cd_P = torch.empty(P, device=dev, dtype=torch.float32)
    if P:
        _pair_coefs_kernel[(triton.cdiv(P, 1024),)](
            order_P, g_P.reshape(-1), h_P.reshape(-1), w_P.reshape(-1), tok_P, cu_P, cd_P,
            P, K, BLOCK=1024, ROUND_BF16=coef_bf16, num_warps=4,
        )  # fmt: skip
    grid_D = triton.cdiv(D, BD)
    if SEGMENT_PAIRS <= 0:
        _expert_block_grad_kernel[(triton.cdiv(N, BLOCK_EXPERTS), grid_D)](
            x_TD, dy_TD, e_P, tok_P, cu_P, cd_P, off_N1, dup_ND, ddown_ND,
            N, D, x_TD.stride(0), dy_TD.stride(0),
            BE=BLOCK_EXPERTS, BP=BP, BD=BD, SPLIT_BF16=split_bf16, COEF_BF16=coef_bf16,
            num_warps=warps, num_stages=stages,
        )  # fmt: skip
        return
    blk_U, seg_U, nseg_B, slot_B, slots = work_map(off_N1, e_P.numel(), SEGMENT_PAIRS)
    part = torch.empty((slots, BLOCK_EXPERTS, D), device=x_TD.device, dtype=torch.float32)
    part_dn = torch.empty_like(part)
    _expert_segment_grad_kernel[(blk_U.numel(), grid_D)](
        x_TD, dy_TD, e_P, tok_P, cu_P, cd_P, off_N1, blk_U, seg_U, nseg_B, slot_B,
        dup_ND, ddown_ND, part, part_dn, N, D, nseg_B.numel(), SEGMENT_PAIRS,
        x_TD.stride(0), dy_TD.stride(0),
        BE=BLOCK_EXPERTS, BP=BP, BD=BD, SPLIT_BF16=split_bf16, COEF_BF16=coef_bf16,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    _merge_partials_kernel[(nseg_B.numel(), grid_D)](
        nseg_B, slot_B, part, part_dn, dup_ND, ddown_ND, N, D, BE=BLOCK_EXPERTS, BD=BD,
        num_warps=4,
    )  # fmt: skip
