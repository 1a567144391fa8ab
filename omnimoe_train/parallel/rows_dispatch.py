"""``rows`` sharding: expert parallelism over contiguous blocks of atomic-expert ids.

Rank r of the expert-parallel group (size P) owns expert ids [r*E, (r+1)*E), E = N/P (whole
router rows when n % P == 0). One call, per rank (shape legend in ``collectives``):

    gather        x (T, D), expert ids (T, K) int32, weights (T, K) of every rank, packed in
                  ONE all-gather (fixed size: no host sync) -> (G, D), (G, K), (G, K)
    local ids     id - r*E where this rank owns the expert, else E ("no expert": the kernels
                  skip the pair, no padding, no compaction, no sync)
    experts       y_part (G, D) = atomic_experts(x, U_r, V_r, w, local ids): the Triton kernels
                  on the group's whole pair list, each rank doing the pairs it owns (the
                  weight gradients by the pair kernel or, at small E, dense GEMMs whose "no
                  expert" pairs are dropped: ``experts_dense_grad``)
    scatter-sum   y (T, D) = sum over ranks of their y_part rows of my tokens (reduce-scatter)

Backward (autograd through the same pieces, one chain, so every rank issues the same
collectives in the same order): all-gather dy -> the kernel backward (dU_r, dV_r stay on r) ->
reduce-scatter of dx and dweights.

Why gather everything instead of a variable all-to-all: with K experts out of N a token's
experts span ~K / n router rows, so at small P (K = 64 of 76 x 76 at a80m) nearly every token
has experts on every rank (measured ``dispatch_dest_ranks``), and the all-to-all moves the same
rows while needing a host sync per call for its split sizes, a padded (rows, max pairs) table
and PyTorch gathers. At large P with few rows per token the all-to-all would move fewer bytes;
the cost model says how many (``cost_model.rows_bytes``).

Bytes a rank sends, forward: (P-1)*T*(D*b + K*(4 + w)) gathered + (G-T)*D*b scatter-summed;
backward: (P-1)*T*D*b (dy) + (G-T)*(D*b + K*w) (dx, dweights); b = activation bytes,
w = routing-weight bytes.
"""

from __future__ import annotations

import torch
from torch.distributed import ProcessGroup

import omnimoe_kernels
from omnimoe_kernels.experts_dense_grad import choose_grad_path
from omnimoe_train.parallel.collectives import (
    GatherRows,
    GroupComm,
    ScatterSumRows,
    ShardingStats,
    row_bytes,
)


def sharded_atomic_experts_rows(
    x_TD: torch.Tensor,
    up_local_ED: torch.Tensor,
    down_local_ED: torch.Tensor,
    weights_TK: torch.Tensor,
    indices_TK: torch.Tensor,
    *,
    group: ProcessGroup | None,
    num_experts: int,
    group_tokens: list[int] | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, ShardingStats]:
    """Atomic experts with the tables sharded by expert id over ``group``.

    Each rank passes its own tokens and global expert ids (0..N-1), and its shard (E = N/P rows)
    of U and V; it gets back exactly ``atomic_experts`` with the full tables for its tokens.
    ``group_tokens``: T of every rank of the group, if known (else one count exchange). All
    ranks of the group must call this together with the same ``requires_grad`` pattern.
    Raises ``ValueError`` for shards or routing of the wrong shape.
    """
    num_tokens, hidden = x_TD.shape
    comm = GroupComm.create(group, num_tokens, group_tokens)
    if num_experts % comm.size != 0:
        raise ValueError(f"num_experts={num_experts} is not divisible by the EP size {comm.size}")
    experts_per_rank = num_experts // comm.size
    if up_local_ED.shape != (experts_per_rank, hidden) or down_local_ED.shape != up_local_ED.shape:
        raise ValueError(
            f"table shards {tuple(up_local_ED.shape)}, {tuple(down_local_ED.shape)} must be "
            f"({experts_per_rank}, {hidden}) = (N/P, D)"
        )
    if weights_TK.shape != indices_TK.shape or indices_TK.shape[0] != num_tokens:
        raise ValueError(f"weights {tuple(weights_TK.shape)} / indices {tuple(indices_TK.shape)}")

    ids_TK = indices_TK.to(torch.int32)
    x_GD, weights_GK, ids_GK = GatherRows.apply(comm, x_TD, weights_TK, ids_TK)
    local_GK = ids_GK - comm.rank * experts_per_rank
    mine_GK = (local_GK >= 0) & (local_GK < experts_per_rank)
    local_GK = torch.where(mine_GK, local_GK, experts_per_rank)  # E = "no expert"
    # The weight-gradient path from the pairs this rank owns (about 1/P of the group's, with
    # uniform routing), not all G*K: the pair kernel skips the others, the dense GEMMs do not.
    grad_path = choose_grad_path(
        "auto", x_GD.shape[0], experts_per_rank, hidden, ids_GK.shape[1], x_GD.dtype,
        x_GD.device, pairs=ids_GK.numel() // comm.size,
    )  # fmt: skip
    y_part_GD = omnimoe_kernels.atomic_experts(
        x_GD, up_local_ED, down_local_ED, weights_GK, local_GK, backend=backend,
        grad_path=grad_path,
    )  # fmt: skip
    y_TD = ScatterSumRows.apply(comm, y_part_GD)

    with torch.no_grad():  # device-side counters: no host sync
        owners_TP = torch.zeros(num_tokens, comm.size, dtype=torch.bool, device=x_TD.device)
        owners_TP.scatter_(1, (indices_TK // experts_per_rank).long(), True)
        stats = _rows_stats(comm, x_TD, weights_TK, y_part_GD, group_tokens is None)
        stats.local_pairs = mine_GK.sum()
        stats.owner_ranks = owners_TP.sum()
    return y_TD, stats


def _rows_stats(
    comm: GroupComm,
    x_TD: torch.Tensor,
    weights_TK: torch.Tensor,
    y_part_GD: torch.Tensor,
    counted: bool,
) -> ShardingStats:
    """Bytes this rank sends (forward, and the backward it will run) from the shapes."""
    top_k = weights_TK.shape[1]
    x_row, w_row = row_bytes(x_TD), row_bytes(weights_TK)
    forward = {
        "counts": comm.count_bytes(counted),
        "gather": comm.gather_bytes(x_row + w_row + 4 * top_k),
        "y": comm.scatter_bytes(row_bytes(y_part_GD)),
    }
    backward = 0
    if y_part_GD.requires_grad:
        backward += comm.gather_bytes(row_bytes(y_part_GD))  # dy to every rank
    if x_TD.requires_grad:
        backward += comm.scatter_bytes(x_row)  # dx summed back to the sources
    if weights_TK.requires_grad:
        backward += comm.scatter_bytes(w_row)  # dweights summed back to the sources
    zero = torch.zeros((), dtype=torch.int64, device=x_TD.device)
    return ShardingStats(
        mode="rows",
        forward_bytes=sum(forward.values()),
        backward_bytes=backward,
        tokens=x_TD.shape[0],
        local_pairs=zero,
        owner_ranks=zero,
        forward_bytes_by_exchange=forward,
    )
