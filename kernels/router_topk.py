"""Exact Cartesian top-k router: a select kernel and an emit kernel, one warp per token.

Legend: T tokens, n router half width (N = n * n experts), a = min(K, n) candidate rows /
columns per half, A = next power of two >= a, K selected experts, VT the value type (float32,
or float64 for float64 inputs), E x L a per-token vector held as an [E, L] tile (L lanes, E
elements per lane, see ``router_select``), RB x CB the emit tile (live rows x live columns).

Select kernel, one program per token (one warp up to n = 1024, so every reduction is a warp
shuffle and every barrier is cheap):
1. when a < n, selects the top a of each half (``router_select._select_half_lanes``): the
   half is read by vector loads lane-chunked (lane l holds indices l * E .. l * E + E - 1),
   the a-th largest value is bisected over order-preserving int32 keys (int64 for float64)
   from a bracket whose low end is the least of S * L >= a group maxima (a group: E / S
   consecutive elements of a lane), a round counting the sign bits of r - t (an add and a
   shift per element); the early stop at a probe counting exactly a ends it after
   ~log2(range / gap) rounds (~8 for 1024 log-probs, at most 32). Values above it are kept,
   and of the values equal to it the lowest indices: the stable-sort top a of the reference.
   They are compacted in ascending index order: each lane's kept count (carried out of the
   bisection) gives its first slot by one warp scan, and the half is re-read in chunks of
   SELECT_CHUNK_ROWS rows with an in-thread running slot (registers: 96 per thread at
   n = 1024, ptxas sm_90). SELECT_MODE = "rows" is the earlier row-major selection
   (``_select_half``: cross-lane prefix sums with 4 rows packed per word, 80 registers, and
   ~2x the instructions of this step), kept for the A/B;
2. ranks the a candidate columns stably, descending (one ``tl.sort`` of key << 32 | slot): the
   sorted values (float64) go to scratch for the searches, each column's rank for the emit;
3. searches the K-th largest pair sum tau by bisection over float64 keys (a sum of two float32
   is exact in float64), stopping once a probe counts exactly K. Per candidate row, the count
   #{j: r_i + c_j >= t} is a prefix of the sorted columns, found by binary lifting inside the
   row's bracket [count at hi, count at lo]: the brackets narrow with the search, so the late
   probes take one or two steps. Of the pairs equal to tau (searched for only when they
   straddle the K-th place) the lowest ids are kept: whole rows first, in row order; in a row
   the lowest column indices. So row i keeps the columns of rank < gt_i (sum > tau) and the
   first take_i in index order of those of rank in [gt_i, ge_i) (sum == tau);
4. compacts into scratch, in index order, the live rows (kept count > 0: index, value, first
   output slot, gt, ge, take) and the live columns (rank < max ge: index, value, rank).
Emit kernel, program (token, row-tile group): 32 live columns on the lanes, RB rows at a time
in registers, both in ascending index order; a kept pair's slot is its row's first slot plus
the number of kept columns of lower index (a warp scan), so the ids come out ascending and a
row's kept pairs are stored as one coalesced run (rows on the lanes made every lane write into
another row's slots: 1.04 ms against 0.87 ms at T=4096, n=320, K=4096). It is a separate launch
because it is bound by memory latency: with few registers many warps share an SM, while the
select kernel's whole-vector registers leave room for few.

Comparisons are float compares (-0.0 == +0.0, as in the reference's sorts) of ranking values:
every input is read through ``_rank_value`` (NaN ranks as -inf, +inf as the largest finite
value: ``reference.rank_values``), so no sum is NaN, the order is total and every count is
exact for any input; hence exactly a candidates fill each half's slots, the live rows and
columns fill theirs, and every id emitted is a distinct i * n + j in [0, N). The values kept in
scratch for the emit are the inputs themselves: scores are r_i + c_j of the inputs (NaN where
an input is NaN), rounded once to VT (the reference's float64 sum cast to float32), cast to the
input dtype on the host. Scratch (global, per token; read back by the same program after a
barrier, or by the emit kernel; only slots written before are read, except the sorted-column
padding, which the lifting loads but never counts): int32 (8, A): candidate / live row and
column indices, column ranks, live-row first slots, gt, ge, take, live-column ranks; VT (2, A):
candidate / live values; float64 (2A): sorted columns, padded so the lifting loads need no
mask; int32 (4): m_r, m_c, tie flag.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from omnimoe_kernels.limits import ROUTER_MAX_TOP_K
from omnimoe_kernels.router_pairs import _emit_kernel, _row_counts
from omnimoe_kernels.router_select import (
    _chunk_offs,
    _excl_scan,
    _rank_columns,
    _rank_value,
    _select_half,
    _select_half_lanes,
)

# Live rows per step of the emit kernel (registers per lane): 2 measured fastest of 2, 4, 8
# (0.87 / 1.01 / 0.94 ms at T=4096, n=320, K=4096 on the H100).
EMIT_ROWS = 2
# The select kernel's launch (``bench_kernels.py --sweep-router`` times alternatives):
# SELECT_MODE the selection ("bracket": lane-chunked from the group-maximum bracket; "lanes":
# lane-chunked from (min, max); "rows": the earlier row-major ``_select_half``); SELECT_CHUNK_ROWS
# rows of the [E, L] selection vector per compaction chunk (0 with "rows": the whole vector in
# one chunk, the earliest kernel's register peak); SELECT_WARPS per token (None: one warp up to
# n = 1024); SELECT_MAXNREG a ptxas register cap (None: none). ptxas for sm_90 at
# (n, K) = (1024, 64): "rows" 168 registers per thread with one chunk, 80 with chunks of 4;
# "bracket" 96 with chunks of 4 (80 under a cap of 80: ~20 spill instructions, outside loops).
# Static SASS per round / chunk of one half: "rows" 122 per bisection round (~9.4 rounds on
# log-softmax inputs) and ~170 per 4-row chunk; "bracket" 95 per round (~8.4) and ~61.
# Measured (H200, 2026-11-30, T=16384, n=1024, K=64; every variant bitwise equal to "rows"):
# rows 0.324 ms, bracket 0.349, bracket capped at 80 registers 0.296, at 64 0.305, bracket
# with 8-row chunks capped at 80 0.299, lanes 0.358: the cap (more warps per SM) is what pays.
SELECT_MODE = "bracket"
SELECT_CHUNK_ROWS = 4
SELECT_WARPS: int | None = None
SELECT_MAXNREG: int | None = 80


@triton.jit
def _load_vals(v_ptr, offs_EL, ok_EL, IS64: tl.constexpr):
    """Candidate input values in VT (float32 / bfloat16 / float16 widen exactly to float32)."""
    v_EL = tl.load(v_ptr + offs_EL, mask=ok_EL, other=0.0)
    if IS64:
        v_EL = v_EL.to(tl.float64)
    else:
        v_EL = v_EL.to(tl.float32)
    return v_EL


@triton.jit
def _load_ranks(v_ptr, offs_EL, ok_EL, IS64: tl.constexpr):
    """Candidate ranking values in VT (``_rank_value``): what every comparison uses."""
    return _rank_value(_load_vals(v_ptr, offs_EL, ok_EL, IS64), IS64)


# Not specialised on a == K == 1: Triton 3.6's coalescing pass fails on that constant case.
@triton.jit(do_not_specialize=["a", "K"])
def _select_kernel(
    rows_ptr,  # (T, n) row log-probs
    cols_ptr,  # (T, n) column log-probs
    iscr_ptr,  # (T, 8, A) int32 scratch
    vscr_ptr,  # (T, 2, A) VT scratch: candidate row, column values
    csort_ptr,  # (T, 2A) float64 scratch: candidate column values, descending; padding
    meta_ptr,  # (T, 4) int32 out: live rows, live columns, tie flag
    n,
    a,
    K,
    EN: tl.constexpr,  # row-major selection vectors [EN, LN]: EN * LN >= n
    LN: tl.constexpr,
    EA: tl.constexpr,  # lane-chunked candidate vectors [EA, LA]: EA * LA = A
    LA: tl.constexpr,
    CH: tl.constexpr,
    IS64: tl.constexpr,
    SELECT: tl.constexpr,  # a < n
    CE: tl.constexpr,  # rows per compaction chunk of the selection (divides EN)
    LANES: tl.constexpr,  # lane-chunked selection (``_select_half_lanes``), else row-major
    S: tl.constexpr,  # its starting bracket: groups per lane (0: min, max)
):
    """Steps 1-3 for one token; leaves the live rows and columns in scratch for the emit."""
    A: tl.constexpr = EA * LA
    t = tl.program_id(0).to(tl.int64)
    rows_ptr += t * n
    cols_ptr += t * n
    iscr_ptr += t * 8 * A
    vscr_ptr += t * 2 * A
    csort_ptr += t * 2 * A
    offs_EL = _chunk_offs(EA, LA)
    ok_EL = offs_EL < a
    if SELECT:
        if LANES:
            _select_half_lanes(rows_ptr, n, a, iscr_ptr, vscr_ptr, EN, LN, IS64, S, CE)
            _select_half_lanes(cols_ptr, n, a, iscr_ptr + A, vscr_ptr + A, EN, LN, IS64, S, CE)
        else:
            _select_half(rows_ptr, n, a, iscr_ptr, vscr_ptr, EN, LN, IS64, CE)
            _select_half(cols_ptr, n, a, iscr_ptr + A, vscr_ptr + A, EN, LN, IS64, CE)
        tl.debug_barrier()  # the compacted candidates are read back by other threads
        rsrc_ptr = vscr_ptr
        csrc_ptr = vscr_ptr + A
    else:  # a == n: every index is a candidate, read the inputs directly
        rsrc_ptr = rows_ptr
        csrc_ptr = cols_ptr
    c_EL = _load_ranks(csrc_ptr, offs_EL, ok_EL, IS64)
    _rank_columns(c_EL, ok_EL, csrc_ptr, a, csort_ptr, iscr_ptr + 2 * A, A, CH, IS64)
    c_min = tl.min(tl.where(ok_EL, c_EL, float("inf"))).to(tl.float64)
    c_max = tl.max(tl.where(ok_EL, c_EL, float("-inf"))).to(tl.float64)
    tl.debug_barrier()  # sorted columns and ranks
    r_EL = _load_ranks(rsrc_ptr, offs_EL, ok_EL, IS64).to(tl.float64)
    gt_EL, ge_EL, take_EL = _row_counts(r_EL, ok_EL, c_min, c_max, a, K, csort_ptr)

    # Compact, in index order, the rows that keep a pair, then the columns that can (rank <
    # max ge). Values and indices are re-read, not kept live through the search (registers);
    # the barriers order those reads before the areas are overwritten.
    if SELECT:
        ri_EL = tl.load(iscr_ptr + offs_EL, mask=ok_EL, other=0)
    else:
        ri_EL = offs_EL
    r_EL = _load_vals(rsrc_ptr, offs_EL, ok_EL, IS64)
    tl.debug_barrier()
    cnt_EL = gt_EL + take_EL
    live_EL = cnt_EL > 0
    rslot_EL = _excl_scan(live_EL.to(tl.int32))
    tl.store(vscr_ptr + rslot_EL, r_EL, mask=live_EL)
    tl.store(iscr_ptr + rslot_EL, ri_EL, mask=live_EL)
    tl.store(iscr_ptr + 3 * A + rslot_EL, _excl_scan(cnt_EL), mask=live_EL)
    tl.store(iscr_ptr + 4 * A + rslot_EL, gt_EL, mask=live_EL)
    tl.store(iscr_ptr + 6 * A + rslot_EL, ge_EL, mask=live_EL)
    tl.store(iscr_ptr + 7 * A + rslot_EL, take_EL, mask=live_EL)
    ge_max = tl.max(ge_EL)
    if SELECT:
        cj_EL = tl.load(iscr_ptr + A + offs_EL, mask=ok_EL, other=0)
    else:
        cj_EL = offs_EL
    c_EL = _load_vals(csrc_ptr, offs_EL, ok_EL, IS64)
    rank_EL = tl.load(iscr_ptr + 2 * A + offs_EL, mask=ok_EL, other=0)
    tl.debug_barrier()
    colv_EL = ok_EL & (rank_EL < ge_max)
    cslot_EL = _excl_scan(colv_EL.to(tl.int32))
    tl.store(vscr_ptr + A + cslot_EL, c_EL, mask=colv_EL)
    tl.store(iscr_ptr + A + cslot_EL, cj_EL, mask=colv_EL)
    tl.store(iscr_ptr + 5 * A + cslot_EL, rank_EL, mask=colv_EL)
    tl.store(meta_ptr + t * 4, tl.sum(live_EL.to(tl.int32)))
    tl.store(meta_ptr + t * 4 + 1, tl.sum(colv_EL.to(tl.int32)))
    tl.store(meta_ptr + t * 4 + 2, tl.sum(take_EL))


def _lanes(size: int, lanes: int) -> tuple[int, int]:
    """(E, L) = (vector elements per lane, lanes) of a per-token vector of >= size elements."""
    return max(1, triton.next_power_of_2(size) // lanes), lanes


def cartesian_topk_ids(
    rows_Tn: torch.Tensor,
    cols_Tn: torch.Tensor,
    k: int,
    *,
    num_warps: int | None = None,
    maxnreg: int | None = None,
) -> tuple:
    """Launch the kernels: (scores_TK in the input dtype, ids_TK int64), ids ascending.
    ``num_warps`` (1, 2 or 4) and ``maxnreg`` tune the select kernel (default: the module's
    SELECT_WARPS / SELECT_MAXNREG when a < n)."""
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
    # One warp per token up to n = 1024: reductions are warp shuffles, barriers are cheap. At
    # most 4 (L <= 128 lanes: the packed prefix sum has 8-bit fields). The module's knobs tune
    # the selection path (a < n) only: with a == n the kernel is the pair search alone.
    if a < n:
        num_warps, maxnreg = num_warps or SELECT_WARPS, maxnreg or SELECT_MAXNREG
    num_warps = min(4, num_warps or max(1, triton.next_power_of_2(n) // 1024))
    EN, LN = _lanes(n, 32 * num_warps)
    EA, LA = _lanes(a, 32 * num_warps)
    A = EA * LA
    iscr = torch.empty(T, 8, A, dtype=torch.int32, device=dev)
    vscr = torch.empty(T, 2, A, dtype=acc, device=dev)
    csort = torch.empty(T, 2 * A, dtype=torch.float64, device=dev)
    meta = torch.empty(T, 4, dtype=torch.int32, device=dev)
    ce = EN if SELECT_CHUNK_ROWS <= 0 else min(SELECT_CHUNK_ROWS, EN)
    groups = triton.next_power_of_2(triton.cdiv(a, LN)) if SELECT_MODE == "bracket" else 0
    lanes = SELECT_MODE != "rows" and a < n  # (a == n: no selection, one kernel for all modes)
    groups, ce = (groups, ce) if a < n else (0, 1)
    _select_kernel[(T,)](
        rows_Tn, cols_Tn, iscr, vscr, csort, meta, n, a, k, EN=EN, LN=LN, EA=EA, LA=LA,
        CH=max(1, min(64, 4096 // A)), IS64=is64, SELECT=a < n, CE=ce, LANES=lanes, S=groups,
        num_warps=num_warps,
        # A ptxas option: the CPU interpreter has no registers to cap.
        **({} if maxnreg is None or dev.type != "cuda" else {"maxnreg": maxnreg}),
    )  # fmt: skip
    # One warp: 32 live columns on the lanes, EMIT_ROWS rows per step; up to 8 programs per
    # token share its live rows.
    _emit_kernel[(T, max(1, min(8, A // 32)))](
        iscr, vscr, meta, ids_TK, scores_TK, n, k, A=A, CB=32, RB=EMIT_ROWS, num_warps=1
    )
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
    if not 1 <= k <= min(n * n, ROUTER_MAX_TOP_K):
        raise ValueError(f"k={k} must be in [1, min(n*n, {ROUTER_MAX_TOP_K})] with n={n}")
    return CartesianTopK.apply(rows_Tn, cols_Tn, k)
