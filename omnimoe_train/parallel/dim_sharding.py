"""``dim`` sharding: every rank holds all N expert rows, but only D/P columns of U and V.

The memory-layer / UltraMem dimension partition, adapted to OmniMoE's nonlinearity: silu needs
the FULL score up[e] . x, so the partial scores of the D/P slices must be summed before the
activation. Per call on rank r (T_r own tokens, G = sum of T over the group, Dp = D/P; shape
legend in ``collectives``):

    counts   one int64 per rank: every rank learns T_q of every q           (the one host sync)
    x        all-to-all: rank r sends x[:, slice q] of its tokens to rank q -> (G, Dp) on my slice
    indices  all-gather (as all-to-all): (G, K) int32 expert ids of the whole group
    h        partial scores U[e, slice] . x[slice] for all G*K pairs, all-to-all'd back to each
             token's source rank and summed there over P slices   (a reduce-scatter of G*K)
    a        source: a = w * silu(h); all-gathered back as (G, K)
    y        y[:, slice] = sum_k a * V[e, slice] for all G tokens; all-to-all'd to the sources,
             which assemble their full-D rows from the P slices

Scores and activations travel in fp32 (cancellation-prone sums of D/P products). Reducing the
scores on the source and all-gathering a = w * silu(h) instead of all-reducing h is the cheapest
correct scheme: same bytes as one all-reduce of h, minus the all-gather of the routing weights,
and silu runs once per pair. Forward bytes sent by a rank (b activation bytes, s = 4 score bytes):
    2 * T*(P-1)*D/P*b  +  T*K*(P-1)*(4 + 2*s)  + 8*(P-1)
Backward (reverse exchanges, indices excluded): 2 * T*(P-1)*D/P*b + 2 * T*K*(P-1)*s.
Nothing depends on N: only T, D, K and P.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed import ProcessGroup

from omnimoe_train.parallel.collectives import (
    ShardingStats,
    all_to_all,
    exchange_counts,
    remote_bytes,
    row_bytes,
)

# Gathered (pair, Dp) rows materialised at once by the score kernel: bounds its working memory.
_PAIR_ELEMENTS_PER_CHUNK = 1 << 22


def _token_chunks(num_tokens: int, top_k: int, width: int) -> list[tuple[int, int]]:
    step = max(1, _PAIR_ELEMENTS_PER_CHUNK // max(1, top_k * width))
    return [(start, min(start + step, num_tokens)) for start in range(0, num_tokens, step)]


class _PartialScores(torch.autograd.Function):
    """``h[g, k] = up[idx[g, k]] . x[g]`` on one column slice, without saving gathered rows.

    Backward: dx = sum_k dh * up[idx] (an embedding_bag) and dup[idx] += dh * x (chunked
    index_add), both in the compute dtype.
    """

    @staticmethod
    def forward(ctx, x_GDp, up_NDp, idx_GK, compute_dtype: torch.dtype):
        ctx.save_for_backward(x_GDp, up_NDp, idx_GK)
        ctx.compute_dtype = compute_dtype
        num_tokens, top_k = idx_GK.shape
        h_GK = x_GDp.new_empty((num_tokens, top_k), dtype=compute_dtype)
        for start, end in _token_chunks(num_tokens, top_k, up_NDp.shape[1]):
            rows_CKDp = up_NDp[idx_GK[start:end]].to(compute_dtype)
            x_CDp = x_GDp[start:end].to(compute_dtype)
            h_GK[start:end] = torch.einsum("ckd,cd->ck", rows_CKDp, x_CDp)
        return h_GK

    @staticmethod
    def backward(ctx, dh_GK):
        x_GDp, up_NDp, idx_GK = ctx.saved_tensors
        dx_GDp = dup_NDp = None
        if ctx.needs_input_grad[0]:
            up_c_NDp = up_NDp.to(ctx.compute_dtype)
            dx_GDp = F.embedding_bag(idx_GK, up_c_NDp, per_sample_weights=dh_GK, mode="sum")
            dx_GDp = dx_GDp.to(x_GDp.dtype)
        if ctx.needs_input_grad[1]:
            dup_NDp = torch.zeros_like(up_NDp, dtype=ctx.compute_dtype)
            num_tokens, top_k = idx_GK.shape
            for start, end in _token_chunks(num_tokens, top_k, up_NDp.shape[1]):
                outer_CKDp = dh_GK[start:end, :, None] * x_GDp[start:end, None, :]
                dup_NDp.index_add_(
                    0, idx_GK[start:end].flatten(), outer_CKDp.flatten(0, 1).to(dup_NDp.dtype)
                )
            dup_NDp = dup_NDp.to(up_NDp.dtype)
        return dx_GDp, dup_NDp, None, None


def sharded_atomic_experts_dim(
    x_TD: torch.Tensor,
    up_local_NDp: torch.Tensor,
    down_local_NDp: torch.Tensor,
    weights_TK: torch.Tensor,
    indices_TK: torch.Tensor,
    *,
    group: ProcessGroup | None,
) -> tuple[torch.Tensor, ShardingStats]:
    """Atomic experts with U and V sharded by hidden columns over ``group``.

    Rank r holds columns [r*D/P, (r+1)*D/P) of both tables (all N rows), passes its own tokens
    and gets back exactly ``atomic_experts`` with the full tables for them. All ranks of the group
    must call this together with the same ``requires_grad`` pattern.
    """
    num_ranks, my_rank = dist.get_world_size(group), dist.get_rank(group)
    num_tokens, hidden = x_TD.shape
    num_experts, slice_width = up_local_NDp.shape
    if slice_width * num_ranks != hidden or down_local_NDp.shape != up_local_NDp.shape:
        raise ValueError(
            f"table shards {tuple(up_local_NDp.shape)}, {tuple(down_local_NDp.shape)} must be "
            f"(N, D/P) with D={hidden}, P={num_ranks}"
        )
    if weights_TK.shape != indices_TK.shape or indices_TK.shape[0] != num_tokens:
        raise ValueError(f"weights {tuple(weights_TK.shape)} / indices {tuple(indices_TK.shape)}")
    top_k = indices_TK.shape[1]
    compute_dtype = torch.promote_types(x_TD.dtype, torch.float32)

    my_count_P1 = torch.full((num_ranks, 1), num_tokens, dtype=torch.int64, device=x_TD.device)
    group_tokens = exchange_counts(my_count_P1, group).flatten().tolist()  # T_q of every rank q
    mine = [num_tokens] * num_ranks  # every exchange sends all my tokens to each rank

    # Column slice q of my tokens goes to rank q; I receive my slice of every rank's tokens.
    x_PTDp = x_TD.view(num_tokens, num_ranks, slice_width).transpose(0, 1)
    x_slice_GDp = all_to_all(x_PTDp.reshape(-1, slice_width), group_tokens, mine, group)
    idx_send = indices_TK.to(torch.int32).repeat(num_ranks, 1)
    idx_GK = all_to_all(idx_send, group_tokens, mine, group).long()

    h_part_GK = _PartialScores.apply(x_slice_GDp, up_local_NDp, idx_GK, compute_dtype)
    h_parts_PTK = all_to_all(h_part_GK, mine, group_tokens, group)
    h_TK = h_parts_PTK.view(num_ranks, num_tokens, top_k).sum(0)
    a_TK = F.silu(h_TK) * weights_TK.to(compute_dtype)
    a_GK = all_to_all(a_TK.repeat(num_ranks, 1), group_tokens, mine, group)

    down_c_NDp = down_local_NDp.to(compute_dtype)
    y_slice_GDp = F.embedding_bag(idx_GK, down_c_NDp, per_sample_weights=a_GK, mode="sum")
    y_slice_GDp = y_slice_GDp.to(x_TD.dtype)
    y_PTDp = all_to_all(y_slice_GDp, mine, group_tokens, group)
    y_TD = y_PTDp.view(num_ranks, num_tokens, slice_width).transpose(0, 1).reshape(-1, hidden)

    # name -> (tensor whose rows are sent, bytes per row, its input splits, its output splits)
    sends = {
        "x": (x_TD, slice_width * x_TD.element_size(), mine, group_tokens),
        "indices": (idx_send, row_bytes(idx_send), mine, group_tokens),
        "scores": (h_part_GK, row_bytes(h_part_GK), group_tokens, mine),
        "activations": (a_TK, row_bytes(a_TK), mine, group_tokens),
        "y": (y_slice_GDp, row_bytes(y_slice_GDp), group_tokens, mine),
    }
    forward = {"counts": 8 * (num_ranks - 1)}
    backward = 0
    for name, (sent, per_row, in_splits, out_splits) in sends.items():
        forward[name] = remote_bytes(in_splits, my_rank, per_row)
        if sent.requires_grad:  # the reverse exchange returns the gradient of the received rows
            backward += remote_bytes(out_splits, my_rank, per_row)
    stats = ShardingStats(
        mode="dim",
        forward_bytes=sum(forward.values()),
        backward_bytes=backward,
        avg_dest_ranks_per_token=float(num_ranks),
        tokens=num_tokens,
        forward_bytes_by_exchange=forward,
    )
    return y_TD, stats
