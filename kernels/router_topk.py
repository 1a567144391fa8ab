"""Exact Cartesian top-k router in one Triton program per token: select, bisect, emit.

Legend: T tokens, n router half width (N = n * n experts), NP = next power of two >= n,
a = min(K, n) candidate rows/columns per half, A = next power of two >= a, K selected experts,
RB rows per emit tile.

Per token, one program
1. selects the top a of each half without sorting it: the a-th largest order-preserving integer
   key is found by bisection over the n-vector held in registers (32 rounds for float32/bf16,
   stopping early once a probe counts exactly a); values above it are kept, and of the values
   equal to it the lowest indices, so the candidates equal the stable-sort top a of the
   reference. They are compacted in ascending index order (exclusive scan of the keep mask);
2. sorts the a candidate column values (``tl.sort`` of A values, indices not needed) and bisects
   on the K-th largest pair sum ``tau`` over float64 keys, counting ``#{(i, j): r_i + c_j >=
   tau}`` densely in registers when A <= 64, else with one binary search per candidate row
   (O(a log a) per probe), stopping once a probe counts exactly K;
3. emits the K ids already in ascending expert-id order: candidate rows are in ascending index
   order, so row i's ids precede row i+1's; within a row, the kept columns are written in
   ascending column order at ``start_i + rank``. Of the pairs equal to ``tau`` the lowest ids
   win: row-major order in (i, j), i.e. whole rows in row order and in a row the first columns.
   Only rows that keep a pair and columns with r_max + c_j >= tau are walked.

Sums are formed in float64, where the sum of two float32 values is exact, so "ties" are true
ties and the lowest-id rule is well defined; scores are returned in the input dtype.
Scratch (global, per token, read back by the same program after a barrier): the compacted
candidates, the sorted column values and the per-row (start, take) of the emit step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_FLIP64: tl.constexpr = tl.constexpr(0x7FFFFFFFFFFFFFFF)  # order-preserving xor, negative f64
_FLIP32: tl.constexpr = tl.constexpr(0x7FFFFFFF)  # the same for float32 bit patterns
_I64_MAX: tl.constexpr = tl.constexpr(0x7FFFFFFFFFFFFFFF)
_I64_MIN: tl.constexpr = tl.constexpr(-0x8000000000000000)


@triton.jit
def _key(v):
    """Order-preserving int64 image of a float64."""
    b = v.to(tl.int64, bitcast=True)
    return tl.where(b < 0, b ^ _FLIP64, b)


@triton.jit
def _half_key(v, IS64: tl.constexpr):
    """Order-preserving int64 image of a router value: float64 bits, or float32 bits
    (bf16/fp16 inputs widen exactly to float32), so at most 32 bisection rounds for those."""
    if IS64:
        k = _key(v.to(tl.float64))
    else:
        b = v.to(tl.float32).to(tl.int32, bitcast=True)
        k = tl.where(b < 0, b ^ _FLIP32, b).to(tl.int64)
    return k


@triton.jit
def _select_top(v_ptr, n, a, idx_ptr, val_ptr, NP: tl.constexpr, IS64: tl.constexpr):
    """Write the top a of v[0:n] (stable: lower index first among equal values) to
    idx_ptr/val_ptr[0:a], in ascending index order."""
    offs_N = tl.arange(0, NP)
    ok_N = offs_N < n
    v_N = tl.load(v_ptr + offs_N, mask=ok_N, other=0.0)
    key_N = _half_key(v_N, IS64)
    # Invariant: count(key >= lo) >= a > count(key >= hi).
    lo = tl.min(tl.where(ok_N, key_N, _I64_MAX))
    hi = tl.max(tl.where(ok_N, key_N, _I64_MIN)) + 1
    cnt_lo = n
    active = (lo < hi - 1) & (cnt_lo != a)
    while active:
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor average, no overflow
        cnt = tl.sum((ok_N & (key_N >= mid)).to(tl.int32))
        big = cnt >= a
        lo = tl.where(big, mid, lo)
        cnt_lo = tl.where(big, cnt, cnt_lo)
        hi = tl.where(big, hi, mid)
        active = (lo < hi - 1) & (cnt_lo != a)
    gt_N = ok_N & (key_N > lo)
    eq_N = (ok_N & (key_N == lo)).to(tl.int32)
    n_gt = tl.sum(gt_N.to(tl.int32))
    keep_N = gt_N | ((eq_N > 0) & (tl.cumsum(eq_N, axis=0) - eq_N < a - n_gt))
    keep_i_N = keep_N.to(tl.int32)
    slot_N = tl.cumsum(keep_i_N, axis=0) - keep_i_N
    tl.store(idx_ptr + slot_N, offs_N, mask=keep_N)
    tl.store(val_ptr + slot_N, v_N.to(val_ptr.dtype.element_ty), mask=keep_N)


@triton.jit
def _count_ge(r_A, ok_A, c_A, cs_ptr, a, tau, LOGA: tl.constexpr, DENSE: tl.constexpr):
    """Per candidate row, how many columns j satisfy key(r_i + c_j) >= tau. DENSE (A <= 64):
    all a x a sums in registers, no memory latency; else a binary search per row over the
    sorted columns in scratch, O(a log a)."""
    if DENSE:
        ok_AA = ok_A[:, None] & ok_A[None, :]
        pos_A = tl.sum((ok_AA & (_key(r_A[:, None] + c_A[None, :]) >= tau)).to(tl.int32), axis=1)
    else:
        pos_A = tl.zeros(r_A.shape, dtype=tl.int32)
        for s in tl.static_range(LOGA + 1):
            cand_A = pos_A + (1 << (LOGA - s))
            m_A = ok_A & (cand_A <= a)
            cv_A = tl.load(cs_ptr + cand_A - 1, mask=m_A, other=0.0).to(tl.float64)
            pos_A = tl.where(m_A & (_key(r_A + cv_A) >= tau), cand_A, pos_A)
    return pos_A


@triton.jit
def _cartesian_topk_kernel(
    rows_ptr,  # (T, n) row log-probs
    cols_ptr,  # (T, n) column log-probs
    cand_idx_ptr,  # (T, 2, A) int32 scratch: candidate rows, then columns, ascending index
    cand_val_ptr,  # (T, 2, A) scratch: their values (float32, or float64 for float64 inputs)
    csort_ptr,  # (T, A) scratch: candidate column values, descending
    meta_ptr,  # (T, 2, A) int32 scratch: per candidate row, first output slot and tie count
    ids_ptr,  # (T, K) int64 out
    scores_ptr,  # (T, K) float32 out (float64 for float64 inputs)
    n,
    a,
    K,
    NP: tl.constexpr,
    A: tl.constexpr,
    LOGA: tl.constexpr,
    RB: tl.constexpr,
    CB: tl.constexpr,
    IS64: tl.constexpr,
    DENSE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cand_idx_ptr += t * 2 * A
    cand_val_ptr += t * 2 * A
    csort_ptr += t * A
    meta_ptr += t * 2 * A
    _select_top(rows_ptr + t * n, n, a, cand_idx_ptr, cand_val_ptr, NP, IS64)
    _select_top(cols_ptr + t * n, n, a, cand_idx_ptr + A, cand_val_ptr + A, NP, IS64)
    tl.debug_barrier()  # the compacted candidates are read back by other threads

    offs_A = tl.arange(0, A)
    ok_A = offs_A < a
    r_A = tl.load(cand_val_ptr + offs_A, mask=ok_A, other=0.0).to(tl.float64)
    c_A = tl.load(cand_val_ptr + A + offs_A, mask=ok_A, other=0.0).to(tl.float64)
    ri_A = tl.load(cand_idx_ptr + offs_A, mask=ok_A, other=0)
    cj_A = tl.load(cand_idx_ptr + A + offs_A, mask=ok_A, other=0)
    neg_inf = float("-inf")
    if not DENSE:
        cs_A = tl.sort(tl.where(ok_A, c_A, neg_inf), dim=0, descending=True)
        tl.store(csort_ptr + offs_A, cs_A.to(csort_ptr.dtype.element_ty))
        tl.debug_barrier()

    # Invariant: count(>= lo) >= K > count(>= hi). The a x a corner holds a*a >= K pairs.
    lo = _key(tl.min(tl.where(ok_A, r_A, float("inf"))) + tl.min(tl.where(ok_A, c_A, 1e308)))
    hi = _key(tl.max(tl.where(ok_A, r_A, neg_inf)) + tl.max(tl.where(ok_A, c_A, neg_inf))) + 1
    # Stops as soon as a probe counts exactly K pairs (that probe then separates the top K with
    # no tie at the threshold): ~log2(range / gap between the K-th and (K+1)-th sum) rounds for
    # continuous scores, at most 64. ``lo < hi - 1``: a difference of two keys can overflow.
    active = lo < hi - 1
    while active:
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor average, no overflow
        cnt = tl.sum(_count_ge(r_A, ok_A, c_A, csort_ptr, a, mid, LOGA, DENSE))
        big = cnt >= K
        lo = tl.where(big, mid, lo)
        hi = tl.where(big, hi, mid)
        active = (cnt != K) & (lo < hi - 1)

    # tau = lo. Rows are in ascending index order, so ties (sum == tau) go to whole rows first.
    ge_A = _count_ge(r_A, ok_A, c_A, csort_ptr, a, lo, LOGA, DENSE)
    gt_A = _count_ge(r_A, ok_A, c_A, csort_ptr, a, lo + 1, LOGA, DENSE)
    eq_A = ge_A - gt_A
    need = K - tl.sum(gt_A)
    take_A = tl.minimum(tl.maximum(need - (tl.cumsum(eq_A, axis=0) - eq_A), 0), eq_A)
    cnt_A = gt_A + take_A
    # Compact, in index order, the rows that keep a pair and the columns that can (r_max + c_j
    # >= tau), over the candidates already read into registers; the emit walks only those.
    live_A = (cnt_A > 0).to(tl.int32)
    m_r = tl.sum(live_A)
    slot_A = tl.cumsum(live_A, axis=0) - live_A
    start_A = tl.cumsum(cnt_A, axis=0) - cnt_A
    tl.store(meta_ptr + slot_A, start_A, mask=live_A > 0)
    tl.store(meta_ptr + A + slot_A, take_A, mask=live_A > 0)
    tl.store(cand_val_ptr + slot_A, r_A.to(cand_val_ptr.dtype.element_ty), mask=live_A > 0)
    tl.store(cand_idx_ptr + slot_A, ri_A.to(tl.int32), mask=live_A > 0)
    r_max = tl.max(tl.where(ok_A, r_A, neg_inf))
    colv_A = (ok_A & (_key(r_max + c_A) >= lo)).to(tl.int32)
    m_c = tl.sum(colv_A)
    cslot_A = tl.cumsum(colv_A, axis=0) - colv_A
    tl.store(cand_val_ptr + A + cslot_A, c_A.to(cand_val_ptr.dtype.element_ty), mask=colv_A > 0)
    tl.store(cand_idx_ptr + A + cslot_A, cj_A.to(tl.int32), mask=colv_A > 0)
    tl.debug_barrier()

    # Emit RB live rows x CB live columns at a time; a kept pair's slot is its row's start plus
    # its rank among the row's kept columns (ascending column index, carried across column
    # tiles), so ids come out ascending.
    ids_ptr += t * K
    scores_ptr += t * K
    for r0 in range(0, m_r, RB):
        offs_R = r0 + tl.arange(0, RB)
        ok_R = offs_R < m_r
        r_R = tl.load(cand_val_ptr + offs_R, mask=ok_R, other=0.0).to(tl.float64)
        ri_R = tl.load(cand_idx_ptr + offs_R, mask=ok_R, other=0).to(tl.int64)
        start_R = tl.load(meta_ptr + offs_R, mask=ok_R, other=0)
        take_R = tl.load(meta_ptr + A + offs_R, mask=ok_R, other=0)
        kept_R = tl.zeros([RB], dtype=tl.int32)
        ties_R = tl.zeros([RB], dtype=tl.int32)
        for c0 in range(0, m_c, CB):
            offs_C = c0 + tl.arange(0, CB)
            ok_C = offs_C < m_c
            c_C = tl.load(cand_val_ptr + A + offs_C, mask=ok_C, other=0.0).to(tl.float64)
            cj_C = tl.load(cand_idx_ptr + A + offs_C, mask=ok_C, other=0).to(tl.int64)
            s_RC = r_R[:, None] + c_C[None, :]
            key_RC = _key(s_RC)
            ok_RC = ok_R[:, None] & ok_C[None, :]
            eq_RC = (ok_RC & (key_RC == lo)).to(tl.int32)
            tie_rank_RC = ties_R[:, None] + tl.cumsum(eq_RC, axis=1) - eq_RC
            keep_RC = (ok_RC & (key_RC > lo)) | ((eq_RC > 0) & (tie_rank_RC < take_R[:, None]))
            keep_i_RC = keep_RC.to(tl.int32)
            slot_RC = start_R[:, None] + kept_R[:, None] + tl.cumsum(keep_i_RC, axis=1) - keep_i_RC
            tl.store(ids_ptr + slot_RC, ri_R[:, None] * n + cj_C[None, :], mask=keep_RC)
            tl.store(scores_ptr + slot_RC, s_RC.to(scores_ptr.dtype.element_ty), mask=keep_RC)
            kept_R += tl.sum(keep_i_RC, axis=1)
            ties_R += tl.sum(eq_RC, axis=1)


def cartesian_topk_ids(rows_Tn: torch.Tensor, cols_Tn: torch.Tensor, k: int) -> tuple:
    """Launch the kernel: (scores_TK in the input dtype, ids_TK int64), ids ascending."""
    T, n = rows_Tn.shape
    rows_Tn, cols_Tn = rows_Tn.contiguous(), cols_Tn.contiguous()
    dev = rows_Tn.device
    is64 = rows_Tn.dtype == torch.float64 or cols_Tn.dtype == torch.float64
    acc = torch.float64 if is64 else torch.float32
    scores_TK = torch.empty(T, k, dtype=acc, device=dev)
    ids_TK = torch.empty(T, k, dtype=torch.int64, device=dev)
    if T == 0:
        return scores_TK.to(rows_Tn.dtype), ids_TK
    a = min(k, n)
    A = max(2, triton.next_power_of_2(a))
    NP = max(2, triton.next_power_of_2(n))
    cand_idx = torch.empty(T, 2, A, dtype=torch.int32, device=dev)
    cand_val = torch.empty(T, 2, A, dtype=acc, device=dev)
    csort = torch.empty(T, A, dtype=acc, device=dev)
    meta = torch.empty(T, 2, A, dtype=torch.int32, device=dev)
    _cartesian_topk_kernel[(T,)](
        rows_Tn, cols_Tn, cand_idx, cand_val, csort, meta, ids_TK, scores_TK, n, a, k,
        NP=NP, A=A, LOGA=A.bit_length() - 1, RB=max(1, 2048 // min(A, 64)), CB=min(A, 64),
        IS64=is64, DENSE=A <= 64, num_warps=8 if NP >= 4096 else 4,
    )  # fmt: skip
    # The cast happens here (round-to-nearest-even, as the reference) rather than in the kernel:
    # Triton's CPU interpreter truncates float32 -> bfloat16. Through float32, as the reference.
    return scores_TK.float().to(rows_Tn.dtype), ids_TK


class CartesianTopK(torch.autograd.Function):
    """scores = rows[id // n] + cols[id % n]; gradients scatter back to both halves."""

    @staticmethod
    def forward(ctx, rows_Tn: torch.Tensor, cols_Tn: torch.Tensor, k: int):
        scores_TK, ids_TK = cartesian_topk_ids(rows_Tn, cols_Tn, k)
        ctx.save_for_backward(ids_TK)
        ctx.n = rows_Tn.shape[1]
        ctx.dtypes = (rows_Tn.dtype, cols_Tn.dtype)
        ctx.mark_non_differentiable(ids_TK)
        return scores_TK, ids_TK

    @staticmethod
    def backward(ctx, dscores_TK: torch.Tensor, _dids: torch.Tensor | None):
        (ids_TK,) = ctx.saved_tensors
        T, n = ids_TK.shape[0], ctx.n
        g_TK = dscores_TK.float()
        zeros_Tn = torch.zeros(T, n, dtype=torch.float32, device=ids_TK.device)
        drows_Tn = zeros_Tn.scatter_add(1, ids_TK // n, g_TK).to(ctx.dtypes[0])
        dcols_Tn = zeros_Tn.scatter_add(1, ids_TK % n, g_TK).to(ctx.dtypes[1])
        return drows_Tn, dcols_Tn, None


def cartesian_topk_triton(
    rows_Tn: torch.Tensor, cols_Tn: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of all ``rows[i] + cols[j]``: (scores_TK, ids_TK), ids ascending."""
    if rows_Tn.dim() != 2 or cols_Tn.shape != rows_Tn.shape:
        raise ValueError(f"rows {tuple(rows_Tn.shape)} / cols {tuple(cols_Tn.shape)}: need (T, n)")
    n = rows_Tn.shape[1]
    if not 1 <= k <= min(n * n, 4096):
        raise ValueError(f"k={k} must be in [1, min(n*n, 4096)] with n={n}")
    return CartesianTopK.apply(rows_Tn, cols_Tn, k)
