"""Triton kernels over (token, expert) pairs for the atomic-expert layer.

Legend: T tokens, D hidden, N experts, K experts per token, P = T * K pairs. A pair's *flat
position* is ``t * K + k`` (token order); ``order_P`` lists flat positions sorted by expert id
(expert order), ``e_P`` the matching expert ids. An id equal to N (the table's row count) means
"no expert": the pair is skipped (no row is read, its score, output and gradients are 0). The
expert-parallel ``rows`` layout marks the pairs of experts another rank owns that way, so a
rank runs the kernels on the whole group's pair list with no compaction and no padding.

- ``pair_scores``: one dot product per pair, walked in expert order (expert-centric): a block of
  BP consecutive pairs touches few distinct experts, so each expert row is fetched from memory
  once per block and re-read from cache by its other pairs; the token rows are gathered. When
  the tables fit in L2 the forward walks the pairs in token order instead and skips the sort.
  Forward: ``h = x_t . up_e``. Backward: ``da = dy_t . down_e`` and, in the same pass,
  ``dw = da * silu(h)`` and ``g = da * w * silu'(h)``. Results land at the flat position.
- ``combine_rows``: ``out_t = sum_k coef_tk * table[e_tk]`` for a tile of BT tokens and BD
  columns; used for ``y`` (coef = w * silu(h), table = down) and ``dx`` (coef = g, table = up).
  The K-way reduction of a token stays in registers: no atomics, fixed order, one write of out.
  Grid order is column-block major, so programs running together share one BD-wide column
  slice of the table, which stays in L2 when N * BD is small. With ``ranges`` (each token's
  pairs of this table in one contiguous run of its slots, tokens tiled in an order sorted by
  run length) a tile walks only its tokens' runs: the ``rows`` layout's cost of the pairs a
  rank owns instead of the group's K per token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tiles (``bench_kernels.py --sweep-tiles`` times the alternatives, docs/benchmarks.md): pairs,
# columns, warps of ``pair_scores``; tokens, pairs per step, columns, warps of ``combine_rows``
# for K < 256 and for K >= 256 (many pairs per token: more rows in flight per step pays there,
# 0.74 vs 0.88 ms at the paper setting, and costs at K = 16, 0.126 vs 0.095 ms). Pairs: 32
# pairs of 64 columns beat 16 of 128 at four of the five swept shapes (H200, 2026-11-30: a80m
# 0.225 vs 0.259 ms in expert order, 0.219 vs 0.240 in token order; 1.27 vs 1.40 ms in total).
PAIR_TILE = (32, 64, 4)
COMBINE_TILES = ((32, 8, 64, 4), (32, 16, 128, 8))
COMBINE_TILE: tuple[int, int, int, int] | None = None  # forces one tile (the benchmark)


@triton.jit
def _pair_scores_kernel(
    rows_ptr,  # (T, D) token rows: x (forward) or dy (backward)
    table_ptr,  # (N, D) expert rows: up (forward) or down (backward)
    e_ptr,  # (P,) expert keys (int16 / int32), expert order: id = key + base
    order_ptr,  # (P,) int32 / int64 flat positions, expert order
    w_ptr,  # (P,) routing weights, flat order
    h_ptr,  # (P,) float32 pre-activations, flat order: written (forward) / read (backward)
    dw_ptr,  # (P,) float32 out (backward)
    g_ptr,  # (P,) float32 out (backward): d loss / d h
    P,
    N,
    D,
    K,
    base,
    stride_row,
    stride_tab,
    BACKWARD: tl.constexpr,
    TOKEN_ORDER: tl.constexpr,
    BP: tl.constexpr,
    BD: tl.constexpr,
):
    offs_P = tl.program_id(0).to(tl.int64) * BP + tl.arange(0, BP)
    ok_P = offs_P < P
    e_P = tl.load(e_ptr + offs_P, mask=ok_P, other=0).to(tl.int64) + base
    use_P = ok_P & (e_P < N)  # id N = no expert: nothing read, score 0
    if TOKEN_ORDER:  # pairs walked in flat (token) order: no sort
        q_P = offs_P
    else:
        q_P = tl.load(order_ptr + offs_P, mask=ok_P, other=0).to(tl.int64)
    tok_P = q_P // K
    acc_P = tl.zeros([BP], dtype=tl.float32)
    if tl.max(use_P.to(tl.int32), axis=0) > 0:  # a block of skipped pairs walks no columns
        for d0 in range(0, D, BD):
            offs_D = d0 + tl.arange(0, BD)
            m_PD = use_P[:, None] & (offs_D[None, :] < D)
            a_PD = tl.load(
                rows_ptr + tok_P[:, None] * stride_row + offs_D[None, :], mask=m_PD, other=0
            )
            b_PD = tl.load(
                table_ptr + e_P[:, None] * stride_tab + offs_D[None, :], mask=m_PD, other=0
            )
            acc_P += tl.sum(a_PD.to(tl.float32) * b_PD.to(tl.float32), axis=1)
    if BACKWARD:  # skipped pairs: acc = 0, so dw = g = 0 whatever h and w hold
        h_P = tl.load(h_ptr + q_P, mask=use_P, other=0.0)
        w_P = tl.load(w_ptr + q_P, mask=use_P, other=0.0).to(tl.float32)
        sig_P = tl.sigmoid(h_P)
        tl.store(dw_ptr + q_P, acc_P * h_P * sig_P, mask=ok_P)
        tl.store(g_ptr + q_P, acc_P * w_P * sig_P * (1.0 + h_P * (1.0 - sig_P)), mask=ok_P)
    else:
        tl.store(h_ptr + q_P, acc_P, mask=ok_P)


@triton.jit
def _combine_step(
    idx_ptr, coef_ptr, w_ptr, tok_T, start_T, count_T, ok_T, k0, N, K,
    GATED: tl.constexpr, RANGES: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """Expert ids, coefficients and mask of the BK pairs at k0 of each token of the tile
    (pairs with id N, "no expert", are masked out). RANGES: step k0 of token t reads slots
    start_t + k0 .. of its row, up to its count; else slots k0 .. of all K."""
    offs_K = k0 + tl.arange(0, BK)
    if RANGES:
        m_TK = ok_T[:, None] & (offs_K[None, :] < count_T[:, None])
        pos_TK = tok_T[:, None] * K + (start_T[:, None] + offs_K[None, :])
    else:
        m_TK = ok_T[:, None] & (offs_K[None, :] < K)
        pos_TK = tok_T[:, None] * K + offs_K[None, :]
    e_TK = tl.load(idx_ptr + pos_TK, mask=m_TK, other=0).to(tl.int64)
    m_TK = m_TK & (e_TK < N)
    c_TK = tl.load(coef_ptr + pos_TK, mask=m_TK, other=0.0).to(tl.float32)
    if GATED:
        w_TK = tl.load(w_ptr + pos_TK, mask=m_TK, other=0.0).to(tl.float32)
        c_TK = w_TK * c_TK * tl.sigmoid(c_TK)
    return e_TK, c_TK, m_TK


@triton.jit
def _combine_rows_kernel(
    table_ptr,  # (N, D) expert rows
    idx_ptr,  # (T, K) expert ids
    coef_ptr,  # (T, K) float32: h (GATED, coef = w * silu(h)) or the coefficient itself
    w_ptr,  # (T, K) routing weights (GATED only)
    out_ptr,  # (T, D) out
    start_ptr,  # (T,) int32 first slot of each token's range (RANGES only)
    count_ptr,  # (T,) int32 slots in each token's range (RANGES only)
    order_ptr,  # (T,) int32 tokens in tile order (RANGES only)
    T,
    N,
    D,
    K,
    stride_tab,
    stride_out,
    GATED: tl.constexpr,
    RANGES: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
):
    pid = tl.program_id(0)
    n_tb = tl.cdiv(T, BT)
    slot_T = (pid % n_tb).to(tl.int64) * BT + tl.arange(0, BT)
    offs_D = (pid // n_tb) * BD + tl.arange(0, BD)
    ok_T = slot_T < T
    ok_D = offs_D < D
    if RANGES:
        # Tokens in the caller's order (sorted by count: a tile's tokens need about the same
        # number of steps); the range is clamped into the row, so a malformed one cannot read
        # another token's slots or past the arrays.
        tok_T = tl.load(order_ptr + slot_T, mask=ok_T, other=0).to(tl.int64)
        start_T = tl.load(start_ptr + tok_T, mask=ok_T, other=0)
        start_T = tl.minimum(tl.maximum(start_T, 0), K)
        count_T = tl.minimum(tl.load(count_ptr + tok_T, mask=ok_T, other=0), K - start_T)
        k_end = tl.max(count_T, axis=0)  # the tile walks only its longest range
    else:
        tok_T, start_T, count_T = slot_T, slot_T, slot_T  # unused without RANGES
        k_end = K
    acc_TD = tl.zeros([BT, BD], dtype=tl.float32)
    # The ids of step k + 1 are loaded before step k's rows are summed, so each step waits on
    # one round of loads (its row gathers), not on ids and then rows.
    e_TK, c_TK, m_TK = _combine_step(
        idx_ptr, coef_ptr, w_ptr, tok_T, start_T, count_T, ok_T, 0, N, K, GATED, RANGES, BK
    )
    for k0 in range(0, k_end, BK):
        # Skipped pairs ("no expert") are masked out of the gather. A branch that skips a step
        # whose pairs are all skipped measured slower on the H200 (0.44 vs 0.35 ms at a80m's
        # one-GPU shape, 0.78 vs 0.62 ms under rows EP): it breaks the load pipelining.
        ptr_TKD = table_ptr + e_TK[:, :, None] * stride_tab + offs_D[None, None, :]
        v_TKD = tl.load(ptr_TKD, mask=m_TK[:, :, None] & ok_D[None, None, :], other=0)
        n_e_TK, n_c_TK, n_m_TK = _combine_step(
            idx_ptr, coef_ptr, w_ptr, tok_T, start_T, count_T, ok_T, k0 + BK, N, K,
            GATED, RANGES, BK,
        )  # fmt: skip
        acc_TD += tl.sum(c_TK[:, :, None] * v_TKD.to(tl.float32), axis=1)
        e_TK, c_TK, m_TK = n_e_TK, n_c_TK, n_m_TK
    ptr_TD = out_ptr + tok_T[:, None] * stride_out + offs_D[None, :]
    tl.store(ptr_TD, acc_TD.to(out_ptr.dtype.element_ty), mask=ok_T[:, None] & ok_D[None, :])


def pair_scores(
    rows_TD: torch.Tensor,
    table_ND: torch.Tensor,
    e_P: torch.Tensor,
    order_P: torch.Tensor | None,
    K: int,
    h_P: torch.Tensor,
    *,
    w_P: torch.Tensor | None = None,
    dw_P: torch.Tensor | None = None,
    g_P: torch.Tensor | None = None,
    base: int = 0,
) -> None:
    """Forward (w_P is None): write h_P. Backward: read h_P, write dw_P and g_P. Expert ids
    are ``e_P + base`` (see ``experts_autograd.expert_order``); ``order_P`` None walks the
    pairs in token order (e_P = the flat indices)."""
    BP, BD, num_warps = PAIR_TILE
    P, D = e_P.numel(), rows_TD.shape[1]
    if P == 0:
        return
    backward = w_P is not None
    dummy = h_P
    BD = min(BD, triton.next_power_of_2(D))
    _pair_scores_kernel[(triton.cdiv(P, BP),)](
        rows_TD, table_ND, e_P, e_P if order_P is None else order_P,
        w_P if backward else dummy, h_P,
        dw_P if backward else dummy, g_P if backward else dummy,
        P, table_ND.shape[0], D, K, base, rows_TD.stride(0), table_ND.stride(0),
        BACKWARD=backward, TOKEN_ORDER=order_P is None, BP=BP, BD=BD, num_warps=num_warps,
    )  # fmt: skip


PairRanges = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (start_T, count_T, order_T)


def combine_rows(
    table_ND: torch.Tensor,
    idx_TK: torch.Tensor,
    coef_TK: torch.Tensor,
    out_TD: torch.Tensor,
    *,
    w_TK: torch.Tensor | None = None,
    ranges: PairRanges | None = None,
) -> None:
    """out_t = sum_k c_tk * table[idx_tk]; c = w * silu(coef) when w_TK is given, else coef
    (any float dtype, accumulated in float32). Pairs with idx = N are skipped.

    ``ranges = (start_T, count_T, order_T)``, int32 (T,) tensors on the device: token t's
    pairs of this table are slots [start_t, start_t + count_t) of its row, and order_T (a
    permutation of 0..T-1) is the order tokens are tiled in. Only those slots are read (ids
    there still skipped when = N); a tile of BT tokens of order_T loops over its largest count,
    so order_T sorted by count keeps the tiles' loops short (the expert-parallel ``rows``
    layout: about half of each token's K pairs are another rank's). Contract: the slots outside
    a token's range are not needed, i.e. hold no expert of this table (id N) -- the caller
    guarantees it, nothing checks it (that would read the slots this skips); and order_T is a
    permutation (a token missing from it gets no row of out). A range is clamped into its row
    (start into [0, K], count to K - start: memory safety only, a wrong range gives a wrong
    sum). No host sync.
    """
    T, D = out_TD.shape
    K = idx_TK.shape[1]
    BT, BK, BD, num_warps = COMBINE_TILE or COMBINE_TILES[K >= 256]
    if T == 0:
        return
    BD = min(BD, triton.next_power_of_2(D))
    BK = min(BK, triton.next_power_of_2(K))
    grid = (triton.cdiv(T, BT) * triton.cdiv(D, BD),)
    start_T, count_T, order_T = ranges if ranges is not None else (idx_TK,) * 3
    _combine_rows_kernel[grid](
        table_ND, idx_TK, coef_TK, w_TK if w_TK is not None else coef_TK, out_TD,
        start_T, count_T, order_T,
        T, table_ND.shape[0], D, K, table_ND.stride(0), out_TD.stride(0),
        GATED=w_TK is not None, RANGES=ranges is not None, BT=BT, BK=BK, BD=BD,
        num_warps=num_warps,
    )  # fmt: skip


@triton.jit
def _silu_grads_kernel(da_ptr, h_ptr, w_ptr, g_ptr, dw_ptr, P, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < P
    da = tl.load(da_ptr + offs, mask=ok, other=0.0)
    h = tl.load(h_ptr + offs, mask=ok, other=0.0)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    sig = tl.sigmoid(h)
    tl.store(dw_ptr + offs, (da * h * sig).to(dw_ptr.dtype.element_ty), mask=ok)
    tl.store(g_ptr + offs, da * w * sig * (1.0 + h * (1.0 - sig)), mask=ok)


def silu_grads(
    da_P: torch.Tensor, h_P: torch.Tensor, w_P: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """g = dL/dh and dw = dL/dw through a = w * silu(h), from float32 da = dL/da (any shape;
    g float32, dw in w's dtype): the column-sharded layout's step between the reduction of
    the partial da and the dx combine, in one launch."""
    da_P, h_P, w_P = da_P.contiguous(), h_P.contiguous(), w_P.contiguous()
    g_P, dw_P = torch.empty_like(da_P), torch.empty_like(w_P)
    P = da_P.numel()
    if P:
        _silu_grads_kernel[(triton.cdiv(P, 1024),)](
            da_P, h_P, w_P, g_P, dw_P, P, BLOCK=1024, num_warps=4
        )
    return g_P, dw_P
