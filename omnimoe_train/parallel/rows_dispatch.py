"""``rows`` sharding: expert parallelism over contiguous blocks of atomic-expert ids.

Rank r of the expert-parallel group (size P) owns expert ids [r*E, (r+1)*E), E = N/P. With E a
multiple of n, a block is a set of whole router rows, so the K experts of a token (top rows x top
columns of the Cartesian router) cluster on few ranks.

One call, per rank (shape legend in ``collectives``; R rows received, Kr = max pairs per row):

    counts   (P, 3) int64 all-to-all: rows, pairs and max pairs per row for each destination
             -> the only host sync; the split lists are reused by the backward.
    x        (S, D)  token rows, each token ONCE per destination rank (not once per expert)
    meta     (Q, 2)  int32 (local expert id, row slot within the chunk) for each (token, expert)
    weights  (Q,)    routing weights, same order as meta
    owner:   pairs packed into an (R, Kr) table, padded with weight 0 -> atomic_experts kernel
    y        (R, D)  partial outputs back to the source rank, which index_adds them per token

Forward bytes sent to other ranks: S_remote*D*b_x*2 (x out, y back) + Q_remote*(8 + b_w)
+ 24*(P-1) for the counts. Backward replays x, y and weights reversed: S_remote*D*b_x*2 +
Q_remote*b_w. Gradients: dx and dweights return to the source through the reversed all-to-alls,
dU/dV land on the owning shard (the kernel's own backward), never leaving the owner.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

import omnimoe_kernels
from omnimoe_train.parallel.collectives import (
    ShardingStats,
    all_to_all,
    all_to_all_many,
    exchange_counts,
    remote_bytes,
    row_bytes,
)

_META_BYTES = 8  # (local expert id, row slot) as two int32


def _plan_sends(
    dest_TK: torch.Tensor, num_ranks: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token destination table -> (pairs_TP, slot_TP, counts_P3) without host syncs.

    ``slot_TP[t, p]`` is the position of token t among the rows sent to rank p (rows are sent in
    (destination, token) order); ``counts_P3`` holds per destination: rows, pairs, max pairs/row.
    """
    num_tokens = dest_TK.shape[0]
    pairs_TP = torch.zeros(num_tokens, num_ranks, dtype=torch.int64, device=dest_TK.device)
    pairs_TP.scatter_add_(1, dest_TK, torch.ones_like(dest_TK))
    present_TP = (pairs_TP > 0).long()
    slot_TP = present_TP.cumsum(0) - 1
    max_pairs_P = pairs_TP.amax(0) if num_tokens > 0 else pairs_TP.new_zeros(num_ranks)
    counts_P3 = torch.stack([present_TP.sum(0), pairs_TP.sum(0), max_pairs_P], dim=1)
    return pairs_TP, slot_TP, counts_P3


def _pack_received_pairs(
    meta_Q2: torch.Tensor,
    weights_Q: torch.Tensor,
    recv_counts_P3: torch.Tensor,
    num_rows: int,
    max_pairs_per_row: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Received (token, expert) pairs -> dense (R, Kr) weights and local expert ids.

    Pairs arrive grouped by source and, within a source, ordered by row slot, so their global row
    index is non-decreasing and a pair's column is its rank among the pairs of its row. Padding
    entries repeat the row's first expert with weight 0: they add exact zeros to y, dx and dU/dV,
    and spread over the experts actually used instead of piling onto one expert group. Offsets
    come from the device copy of the counts: no host-to-device copy (which would sync).
    """
    device = meta_Q2.device
    num_pairs = meta_Q2.shape[0]
    recv_rows_P, recv_pairs_P = recv_counts_P3[:, 0], recv_counts_P3[:, 1]
    local_id_Q = meta_Q2[:, 0].long()
    row_offset_P = recv_rows_P.cumsum(0) - recv_rows_P
    source_Q = torch.repeat_interleave(
        torch.arange(len(recv_rows_P), device=device), recv_pairs_P, output_size=num_pairs
    )
    row_Q = meta_Q2[:, 1].long() + row_offset_P[source_Q]
    pairs_per_row_R = torch.zeros(num_rows, dtype=torch.int64, device=device)
    pairs_per_row_R.scatter_add_(0, row_Q, torch.ones_like(row_Q))
    first_pair_R = pairs_per_row_R.cumsum(0) - pairs_per_row_R
    col_Q = torch.arange(num_pairs, device=device) - first_pair_R[row_Q]

    weights_RK = weights_Q.new_zeros(num_rows, max_pairs_per_row)
    weights_RK = weights_RK.index_put((row_Q, col_Q), weights_Q)
    first_id_R = local_id_Q[first_pair_R.clamp(max=max(num_pairs - 1, 0))]
    local_ids_RK = first_id_R[:, None].expand(num_rows, max_pairs_per_row).clone()
    local_ids_RK[row_Q, col_Q] = local_id_Q
    return weights_RK, local_ids_RK


def sharded_atomic_experts_rows(
    x_TD: torch.Tensor,
    up_local_ED: torch.Tensor,
    down_local_ED: torch.Tensor,
    weights_TK: torch.Tensor,
    indices_TK: torch.Tensor,
    *,
    group: ProcessGroup | None,
    num_experts: int,
    backend: str = "auto",
) -> tuple[torch.Tensor, ShardingStats]:
    """Atomic experts with the tables sharded by expert id over ``group``.

    Each rank passes its own tokens and global expert ids, and its shard (E = N/P rows) of U and V;
    it gets back exactly ``atomic_experts`` with the full tables for its tokens. All ranks of the
    group must call this together with the same ``requires_grad`` pattern (the backward runs
    matching collectives).
    """
    num_ranks, my_rank = dist.get_world_size(group), dist.get_rank(group)
    num_tokens, hidden = x_TD.shape
    if num_experts % num_ranks != 0:
        raise ValueError(f"num_experts={num_experts} is not divisible by the EP size {num_ranks}")
    experts_per_rank = num_experts // num_ranks
    if up_local_ED.shape != (experts_per_rank, hidden) or down_local_ED.shape != up_local_ED.shape:
        raise ValueError(
            f"table shards {tuple(up_local_ED.shape)}, {tuple(down_local_ED.shape)} must be "
            f"({experts_per_rank}, {hidden}) = (N/P, D)"
        )
    if weights_TK.shape != indices_TK.shape or indices_TK.shape[0] != num_tokens:
        raise ValueError(f"weights {tuple(weights_TK.shape)} / indices {tuple(indices_TK.shape)}")
    top_k = indices_TK.shape[1]

    # Plan on the source, then one count exchange and one host sync for every split list.
    dest_TK = torch.div(indices_TK.long(), experts_per_rank, rounding_mode="floor")
    pairs_TP, slot_TP, send_counts_P3 = _plan_sends(dest_TK, num_ranks)
    recv_counts_P3 = exchange_counts(send_counts_P3, group)
    (send_counts, recv_counts) = torch.stack([send_counts_P3, recv_counts_P3]).tolist()
    send_rows, send_pairs, _ = (list(c) for c in zip(*send_counts))
    recv_rows, recv_pairs, recv_max = (list(c) for c in zip(*recv_counts))
    num_send_rows, num_recv_rows = sum(send_rows), sum(recv_rows)

    # Token rows in (destination, token) order: the present (p, t) cells of the P x T grid.
    absent_PT = (pairs_TP.T == 0).to(torch.uint8)
    flat_S = torch.argsort(absent_PT.flatten(), stable=True)[:num_send_rows]
    token_S = flat_S % max(num_tokens, 1)

    # (token, expert) pairs in (destination, token, k) order, with their row slot at the owner.
    order_Q = torch.argsort(dest_TK.flatten(), stable=True)
    token_Q = torch.div(order_Q, top_k, rounding_mode="floor")
    dest_Q = dest_TK.flatten()[order_Q]
    local_id_Q = indices_TK.long().flatten()[order_Q] - dest_Q * experts_per_rank
    meta_Q2 = torch.stack([local_id_Q, slot_TP[token_Q, dest_Q]], dim=1).to(torch.int32)
    meta_recv_Q2 = all_to_all(meta_Q2, recv_pairs, send_pairs, group)
    # x and weights travel in one autograd node: their backward exchanges keep a fixed order.
    x_recv_RD, weights_recv_Q = all_to_all_many(
        [
            (x_TD[token_S], recv_rows, send_rows),
            (weights_TK.flatten()[order_Q], recv_pairs, send_pairs),
        ],
        group,
    )

    if num_recv_rows > 0:
        weights_RK, local_ids_RK = _pack_received_pairs(
            meta_recv_Q2, weights_recv_Q, recv_counts_P3, num_recv_rows, max(recv_max)
        )
        y_RD = omnimoe_kernels.atomic_experts(
            x_recv_RD, up_local_ED, down_local_ED, weights_RK, local_ids_RK, backend=backend
        )
    else:
        # Nothing to compute, but keep every received tensor and the shards in the graph so the
        # backward still runs this rank's side of the reversed all-to-alls (and dU/dV are zeros).
        keep_in_graph = weights_recv_Q.sum() + up_local_ED.sum() + down_local_ED.sum()
        y_RD = (x_recv_RD * 0 + keep_in_graph * 0).to(x_TD.dtype)
    y_back_SD = all_to_all(y_RD, send_rows, recv_rows, group)
    y_TD = y_back_SD.new_zeros(num_tokens, hidden).index_add(0, token_S, y_back_SD)

    stats = _rows_stats(
        x_TD, y_RD, weights_TK, send_rows, send_pairs, recv_rows, recv_pairs, my_rank
    )
    return y_TD, stats


def _rows_stats(
    x_TD: torch.Tensor,
    y_RD: torch.Tensor,
    weights_TK: torch.Tensor,
    send_rows: list[int],
    send_pairs: list[int],
    recv_rows: list[int],
    recv_pairs: list[int],
    my_rank: int,
) -> ShardingStats:
    """Bytes this rank sends (forward, and the backward it will run) from the split lists."""
    num_ranks = len(send_rows)
    x_row, y_row, w_bytes = row_bytes(x_TD), row_bytes(y_RD), weights_TK.element_size()
    forward = {
        "counts": 3 * 8 * (num_ranks - 1),
        "x": remote_bytes(send_rows, my_rank, x_row),
        "meta": remote_bytes(send_pairs, my_rank, _META_BYTES),
        "weights": remote_bytes(send_pairs, my_rank, w_bytes),
        "y": remote_bytes(recv_rows, my_rank, y_row),
    }
    backward = 0
    if y_RD.requires_grad:
        backward += remote_bytes(send_rows, my_rank, y_row)  # dy to the owners
    if x_TD.requires_grad:
        backward += remote_bytes(recv_rows, my_rank, x_row)  # dx back to the sources
    if weights_TK.requires_grad:
        backward += remote_bytes(recv_pairs, my_rank, w_bytes)  # dweights back to the sources
    num_tokens = x_TD.shape[0]
    return ShardingStats(
        mode="rows",
        forward_bytes=sum(forward.values()),
        backward_bytes=backward,
        avg_dest_ranks_per_token=sum(send_rows) / num_tokens if num_tokens else 0.0,
        tokens=num_tokens,
        forward_bytes_by_exchange=forward,
    )
