"""Expert-centric weight gradients of the atomic-expert layer (segmented reductions).

Legend: T tokens, D hidden, N experts, K experts per token, P = T * K pairs, G work items,
M experts long enough to be split, CH pairs per work item. ``order_P`` lists flat positions
``t * K + k`` sorted by expert id; ``off_N1`` is where each expert's run starts in that order.

    dup_e   = sum_{pairs p of e} g_p * x_{t_p}       (g = dL/dh)
    ddown_e = sum_{pairs p of e} a_p * dy_{t_p}      (a = w * silu(h))

Work item = (expert, chunk of at most CH of its pairs); an expert with no pair still gets one
item, which writes its zero row, so the dense gradients are written exactly once. The item
list has at most N + cdiv(P, CH) entries, a bound known from shapes, so the grid never waits
on data. One program accumulates one item in fp32 registers in pair order.

Experts with more than CH pairs (a hot expert) span several items and need a second pass:
deterministic mode writes per-item partial rows and ``_finish_kernel`` adds them in item order
(fixed order, no float atomics); fast mode adds the items into one fp32 row per split expert
with atomics and the finish pass only casts. Either way a hot expert is spread over many
programs instead of serialising the whole grid behind one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Pairs per work item: an expert with more pairs is split over several programs.
SPLIT_PAIRS = 1024


@triton.jit
def _expert_grad_kernel(
    x_ptr,  # (T, D)
    dy_ptr,  # (T, D)
    order_ptr,  # (P,) int32 flat positions, expert order
    h_ptr,  # (P,) float32, flat order
    w_ptr,  # (P,) routing weights, flat order
    g_ptr,  # (P,) float32 dL/dh, flat order
    off_ptr,  # (N + 1,) int64 run starts
    nch_ptr,  # (N,) int64 items per expert
    item0_ptr,  # (N,) int64 first item of each expert
    item_e_ptr,  # (G,) int64 expert of each item (items past the last point at expert N - 1)
    slot_ptr,  # (N,) int64 first partial row (deterministic) / split row (fast) of an expert
    dup_ptr,  # (N, D) out, param dtype
    ddown_ptr,  # (N, D) out, param dtype
    pup_ptr,  # (rows, D) float32 partials for split experts
    pdown_ptr,  # (rows, D) float32
    D,
    K,
    stride_x,
    stride_dy,
    CH: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
    BP: tl.constexpr,
    BD: tl.constexpr,
):
    item = tl.program_id(0).to(tl.int64)
    e = tl.load(item_e_ptr + item)
    j = item - tl.load(item0_ptr + e)
    nch = tl.load(nch_ptr + e)
    valid = j < nch
    run_end = tl.load(off_ptr + e + 1)
    start = tl.load(off_ptr + e) + j * CH
    end = tl.where(valid, tl.minimum(start + CH, run_end), start)
    single = nch == 1
    if DETERMINISTIC:
        prow = tl.load(slot_ptr + e) + j
    else:
        prow = tl.load(slot_ptr + e)
    for d0 in range(0, D, BD):
        offs_D = d0 + tl.arange(0, BD)
        ok_D = offs_D < D
        up_D = tl.zeros([BD], dtype=tl.float32)
        down_D = tl.zeros([BD], dtype=tl.float32)
        for p0 in range(start, end, BP):
            offs_P = p0 + tl.arange(0, BP)
            ok_P = offs_P < end
            q_P = tl.load(order_ptr + offs_P, mask=ok_P, other=0).to(tl.int64)
            tok_P = q_P // K
            g_P = tl.load(g_ptr + q_P, mask=ok_P, other=0.0)
            h_P = tl.load(h_ptr + q_P, mask=ok_P, other=0.0)
            a_P = tl.load(w_ptr + q_P, mask=ok_P, other=0.0).to(tl.float32) * h_P * tl.sigmoid(h_P)
            m_PD = ok_P[:, None] & ok_D[None, :]
            x_PD = tl.load(x_ptr + tok_P[:, None] * stride_x + offs_D[None, :], mask=m_PD, other=0)
            dy_PD = tl.load(
                dy_ptr + tok_P[:, None] * stride_dy + offs_D[None, :], mask=m_PD, other=0
            )
            up_D += tl.sum(g_P[:, None] * x_PD.to(tl.float32), axis=0)
            down_D += tl.sum(a_P[:, None] * dy_PD.to(tl.float32), axis=0)
        # Scalar flags are broadcast through int arithmetic (the CPU interpreter rejects a
        # vector & scalar-bool mask).
        m_whole = ok_D & ((offs_D * 0 + (valid & single).to(tl.int32)) > 0)
        tl.store(dup_ptr + e * D + offs_D, up_D.to(dup_ptr.dtype.element_ty), mask=m_whole)
        tl.store(ddown_ptr + e * D + offs_D, down_D.to(ddown_ptr.dtype.element_ty), mask=m_whole)
        m_split = ok_D & ((offs_D * 0 + (valid & (nch > 1)).to(tl.int32)) > 0)
        if DETERMINISTIC:
            tl.store(pup_ptr + prow * D + offs_D, up_D, mask=m_split)
            tl.store(pdown_ptr + prow * D + offs_D, down_D, mask=m_split)
        else:
            tl.atomic_add(pup_ptr + prow * D + offs_D, up_D, mask=m_split, sem="relaxed")
            tl.atomic_add(pdown_ptr + prow * D + offs_D, down_D, mask=m_split, sem="relaxed")


@triton.jit
def _finish_kernel(
    split_e_ptr,  # (M,) int64 split experts, -1 padded
    nch_ptr,
    slot_ptr,
    dup_ptr,
    ddown_ptr,
    pup_ptr,
    pdown_ptr,
    D,
    DETERMINISTIC: tl.constexpr,
    BD: tl.constexpr,
):
    e = tl.load(split_e_ptr + tl.program_id(0))
    ok = e >= 0
    e = tl.maximum(e, 0)
    row0 = tl.load(slot_ptr + e)
    n_rows = tl.where(ok, tl.load(nch_ptr + e), 0)
    if not DETERMINISTIC:
        n_rows = tl.minimum(n_rows, 1)  # atomics already summed into the expert's one row
    for d0 in range(0, D, BD):
        offs_D = d0 + tl.arange(0, BD)
        ok_D = offs_D < D
        up_D = tl.zeros([BD], dtype=tl.float32)
        down_D = tl.zeros([BD], dtype=tl.float32)
        for r in range(row0, row0 + n_rows):
            up_D += tl.load(pup_ptr + r * D + offs_D, mask=ok_D, other=0.0)
            down_D += tl.load(pdown_ptr + r * D + offs_D, mask=ok_D, other=0.0)
        m_D = ok_D & ((offs_D * 0 + ok.to(tl.int32)) > 0)
        tl.store(dup_ptr + e * D + offs_D, up_D.to(dup_ptr.dtype.element_ty), mask=m_D)
        tl.store(ddown_ptr + e * D + offs_D, down_D.to(ddown_ptr.dtype.element_ty), mask=m_D)


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
    CH: int | None = None,
    BD: int = 128,
    num_warps: int = 4,
) -> None:
    """Fill dup_ND and ddown_ND (every row) from the expert-sorted pairs; no host sync."""
    N, D = dup_ND.shape
    P = e_P.numel()
    CH = CH or SPLIT_PAIRS
    dev = x_TD.device
    experts_N1 = torch.arange(N + 1, device=dev, dtype=torch.int32)
    off_N1 = torch.searchsorted(e_P, experts_N1)
    cnt_N = off_N1[1:] - off_N1[:-1]
    nch_N = torch.clamp((cnt_N + CH - 1) // CH, min=1)
    item0_N = torch.cumsum(nch_N, 0) - nch_N
    G = N + triton.cdiv(P, CH)  # >= sum(nch_N) whatever the routing
    item_e_G = torch.searchsorted(item0_N, torch.arange(G, device=dev), right=True) - 1
    split_N = nch_N > 1
    M = P // (CH + 1) + 1  # a split expert has > CH pairs, so there are fewer than M of them
    if deterministic:
        rows_N = torch.where(split_N, nch_N, 0)
        n_rows = triton.cdiv(P, CH) + M  # >= sum of nch over split experts
        make = torch.empty
    else:
        rows_N = split_N.long()
        n_rows = M
        make = torch.zeros  # atomics accumulate into it
    slot_N = torch.cumsum(rows_N, 0) - rows_N
    pup = make(n_rows, D, dtype=torch.float32, device=dev)
    pdown = make(n_rows, D, dtype=torch.float32, device=dev)
    # Expected pairs per expert sets the pair-block size: small blocks waste no lanes when
    # experts have one or two pairs, larger ones give more loads in flight when they have many.
    BP = max(16, min(64, triton.next_power_of_2(max(1, P // max(N, 1)))))
    BD = min(BD, triton.next_power_of_2(D))
    _expert_grad_kernel[(G,)](
        x_TD, dy_TD, order_P, h_P, w_P, g_P, off_N1, nch_N, item0_N, item_e_G, slot_N,
        dup_ND, ddown_ND, pup, pdown, D, K, x_TD.stride(0), dy_TD.stride(0),
        CH=CH, DETERMINISTIC=deterministic, BP=BP, BD=BD, num_warps=num_warps,
    )  # fmt: skip
    split_rank_N = torch.cumsum(split_N, 0) - 1
    split_e_M = torch.full((M + 1,), -1, dtype=torch.int64, device=dev)
    # Unsplit experts all write to the spare slot M, which the finish grid (M programs) never
    # reads; resetting it would be a host-to-device copy, which a CUDA graph cannot hold.
    split_e_M.scatter_(0, torch.where(split_N, split_rank_N, M), torch.arange(N, device=dev))
    _finish_kernel[(M,)](
        split_e_M, nch_N, slot_N, dup_ND, ddown_ND, pup, pdown, D,
        DETERMINISTIC=deterministic, BD=BD, num_warps=num_warps,
    )  # fmt: skip
