"""Pair-side device code of the Cartesian router: the K-th largest pair sum, and the emit.

Legend: a = min(K, n) candidates per half, A = next power of two >= a, K selected experts,
E x L a lane-chunked vector of the candidate rows (ascending index order, see
``router_select``), CB x RB the emit tile (live columns x live rows), G row-tile programs per
token. The candidate columns are sorted descending in ``csort``.

Per row i, #{j: r_i + c_j >= t} is the length of a prefix of the sorted columns. Each row keeps
the bracket [count at hi, count at lo] of the threshold search and a probe lifts inside it by
power-of-two steps, so it costs log2(max bracket width + 1) steps, which shrink with the
search instead of staying at log2(a).
"""

from __future__ import annotations

import triton
import triton.language as tl

from omnimoe_kernels.router_select import _excl_scan, _key, _mid, _unkey


@triton.jit
def _count_rows(r_EL, lo_EL, hi_EL, csort_ptr, t, STRICT: tl.constexpr):
    """Per row, #{j: r_i + c_j >= t} (> t if STRICT), known to lie in [lo_EL, hi_EL]: binary
    lifting from lo by power-of-two steps, capped at hi (csort is padded to 2A entries, so
    the loads need neither mask nor clamp)."""
    w = tl.max(hi_EL - lo_EL)
    step = w * 0 + 1
    while step * 2 <= w:
        step *= 2
    step = tl.where(w > 0, step, 0)
    pos_EL = lo_EL
    while step > 0:
        m_EL = pos_EL + step  # is column m - 1 in?
        s_EL = r_EL + tl.load(csort_ptr + m_EL - 1)
        if STRICT:
            in_EL = (m_EL <= hi_EL) & (s_EL > t)
        else:
            in_EL = (m_EL <= hi_EL) & (s_EL >= t)
        pos_EL = tl.where(in_EL, m_EL, pos_EL)
        step = step >> 1
    return pos_EL


@triton.jit
def _row_counts(r_EL, ok_EL, c_min, c_max, a, K, csort_ptr):
    """Per candidate row (float64 values), (gt, ge, take): how many of its pairs have a sum
    > tau, >= tau, and how many of those equal to tau are kept, tau being the K-th largest
    sum, bisected over float64 keys and stopping once a probe counts exactly K."""
    r_min = tl.min(tl.where(ok_EL, r_EL, float("inf")))
    r_max = tl.max(tl.where(ok_EL, r_EL, float("-inf")))
    # Invariant: count(>= unkey(lo)) = cnt_lo = sum(plo) >= K > count(>= unkey(hi)) = sum(phi).
    lo = _key(r_min + c_min, True)
    hi = _key(r_max + c_max, True) + 1
    plo_EL = tl.where(ok_EL, a, 0)
    phi_EL = tl.zeros_like(plo_EL)
    cnt_lo = a * a
    active = (lo < hi - 1) & (cnt_lo != K)
    while active:
        mid = _mid(lo, hi)
        cnt_EL = _count_rows(r_EL, phi_EL, plo_EL, csort_ptr, _unkey(mid, True), False)
        cnt = tl.sum(cnt_EL)
        big = cnt >= K
        lo = tl.where(big, mid, lo)
        hi = tl.where(big, hi, mid)
        cnt_lo = tl.where(big, cnt, cnt_lo)
        plo_EL = tl.where(big, cnt_EL, plo_EL)
        phi_EL = tl.where(big, phi_EL, cnt_EL)
        active = (cnt != K) & (lo < hi - 1)
    # Of the pairs equal to tau (only present when they straddle the K-th place), the lowest ids
    # are kept: whole rows first in row order, and in a row the lowest column indices. In a
    # row they are a run of the sorted columns; for float32 inputs one value, with float64
    # rounding or an infinite row several, so the emit ranks them by column index.
    gt_EL = plo_EL
    take_EL = tl.zeros_like(plo_EL)
    if cnt_lo > K:
        gt_EL = _count_rows(r_EL, phi_EL, plo_EL, csort_ptr, _unkey(lo, True), True)
        eq_EL = plo_EL - gt_EL
        take_EL = tl.minimum(tl.maximum(K - tl.sum(gt_EL) - _excl_scan(eq_EL), 0), eq_EL)
    return gt_EL, plo_EL, take_EL


@triton.jit
def _load_cols(cj_ptr, rank_ptr, c_ptr, c0, m_c, CB: tl.constexpr):
    """Live columns c0 .. c0 + CB - 1 (index, rank, value); past m_c never kept."""
    offs_C = c0 + tl.arange(0, CB)
    ok_C = offs_C < m_c
    cj_C = tl.load(cj_ptr + offs_C, mask=ok_C, other=0)
    rank_C = tl.load(rank_ptr + offs_C, mask=ok_C, other=0x7FFFFFFF)
    c_C = tl.load(c_ptr + offs_C, mask=ok_C, other=0.0)
    return cj_C, rank_C, c_C


@triton.jit
def _emit_kernel(
    iscr_ptr,  # (T, 8, A) int32 scratch, written by the select kernel
    vscr_ptr,  # (T, 2, A) VT scratch: live row, live column values
    meta_ptr,  # (T, 4) int32: live rows m_r, live columns m_c, tie flag
    ids_ptr,  # (T, K) int64 out
    scores_ptr,  # (T, K) VT out
    n,
    K,
    A: tl.constexpr,
    CB: tl.constexpr,
    RB: tl.constexpr,
):
    """Write one token's kept pairs in ascending id order; program (t, g) walks the live-row
    tiles g, g + G, ... Scratch holds the m_r live rows (index, first output slot, #sums > tau,
    #sums >= tau, #ties kept, value) and the m_c live columns (index, sorted rank, value),
    both in ascending index order. Row i keeps the columns of rank < gt_i and, of those of
    rank in [gt_i, ge_i) (sum == tau), the first take_i in index order; a kept pair's slot is
    start_i + #kept columns of lower index. Columns are on lanes (CB = 32) and RB rows at a
    time in registers: the kept columns of a row go to consecutive slots, so each store is
    one coalesced run per row (rows on lanes made every lane write to another row's slots);
    a lane's rank among the kept is a warp scan. A separate launch: few registers, so many
    warps hide the load latency."""
    t = tl.program_id(0).to(tl.int64)
    iscr_ptr += t * 8 * A
    vscr_ptr += t * 2 * A
    ids_ptr += t * K
    scores_ptr += t * K
    m_r = tl.load(meta_ptr + t * 4)
    m_c = tl.load(meta_ptr + t * 4 + 1)
    tied = tl.load(meta_ptr + t * 4 + 2) != 0
    cj_ptr = iscr_ptr + A
    rank_ptr = iscr_ptr + 5 * A
    c_ptr = vscr_ptr + A
    for r0 in range(tl.program_id(1) * RB, m_r, tl.num_programs(1) * RB):
        offs_R = r0 + tl.arange(0, RB)
        ok_R = offs_R < m_r
        rid_R = tl.load(iscr_ptr + offs_R, mask=ok_R, other=0).to(tl.int64) * n
        kept_R = tl.load(iscr_ptr + 3 * A + offs_R, mask=ok_R, other=0)
        gt_R = tl.load(iscr_ptr + 4 * A + offs_R, mask=ok_R, other=0)
        r_R = tl.load(vscr_ptr + offs_R, mask=ok_R, other=0.0)
        if tied:
            ge_R = tl.load(iscr_ptr + 6 * A + offs_R, mask=ok_R, other=0)
            take_R = tl.load(iscr_ptr + 7 * A + offs_R, mask=ok_R, other=0)
        else:
            ge_R = gt_R
            take_R = gt_R * 0
        ties_R = gt_R * 0
        nxt_cj_C, nxt_rank_C, nxt_c_C = _load_cols(cj_ptr, rank_ptr, c_ptr, 0, m_c, CB)
        for c0 in range(0, m_c, CB):
            cj_C, rank_C, c_C = nxt_cj_C, nxt_rank_C, nxt_c_C
            nxt_cj_C, nxt_rank_C, nxt_c_C = _load_cols(cj_ptr, rank_ptr, c_ptr, c0 + CB, m_c, CB)
            keep_RC = rank_C[None, :] < gt_R[:, None]
            if tied:
                eq_RC = ((rank_C[None, :] < ge_R[:, None]) & ~keep_RC).to(tl.int32)
                tie_rank_RC = ties_R[:, None] + tl.cumsum(eq_RC, axis=1) - eq_RC
                keep_RC = keep_RC | ((eq_RC > 0) & (tie_rank_RC < take_R[:, None]))
                ties_R += tl.sum(eq_RC, axis=1)
            keep_i_RC = keep_RC.to(tl.int32)
            slot_RC = kept_R[:, None] + tl.cumsum(keep_i_RC, axis=1) - keep_i_RC
            id_RC = rid_R[:, None] + cj_C[None, :]
            s_RC = r_R[:, None] + c_C[None, :]
            tl.store(ids_ptr + slot_RC, id_RC, mask=keep_RC)
            tl.store(scores_ptr + slot_RC, s_RC.to(scores_ptr.dtype.element_ty), mask=keep_RC)
            kept_R += tl.sum(keep_i_RC, axis=1)
