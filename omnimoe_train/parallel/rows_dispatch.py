"""``rows`` sharding: expert parallelism over contiguous blocks of atomic-expert ids.

Rank r of the expert-parallel group (size P) owns expert ids [r*E, (r+1)*E), E = N/P (whole
router rows when n % P == 0). One call, per rank (shape legend in ``collectives``):

    gather        x (T, D), expert ids (T, K) int32, weights (T, K) of every rank, packed in
                  ONE all-gather (fixed size: no host sync) -> (G, D), (G, K), (G, K)
    local ids     id - r*E where this rank owns the expert, else E ("no expert": the kernels
                  skip the pair, no padding, no compaction, no sync); with ascending ids (the
                  routers' promise) also each token's run of its slots on this rank, sorted
                  by length (``rows_routing``, one pass): the combines then walk only those runs
    experts       y_part (G, D) = atomic_experts(x, U_r, V_r, w, local ids): the Triton kernels
                  on the group's whole pair list, each rank doing the pairs it owns, walked
                  in expert order from the forward on (``sort_forward``: the others sort
                  last and cost nothing); the weight gradients by the pair kernel or, at
                  small E, dense GEMMs whose "no expert" pairs are dropped
                  (``experts_dense_grad``)
    scatter-sum   y (T, D) = sum over ranks of their y_part rows of my tokens (reduce-scatter)

Backward (autograd through the same pieces, one chain, so every rank issues the same
collectives in the same order): all-gather dy -> the kernel backward (dU_r, dV_r stay on r) ->
reduce-scatter of dx and dweights.

Overlapped variant (``parallel.ep_overlap``, ``start_rows_tokens`` + ``rows_experts_overlapped``,
``overlap``): the x all-gather is issued before the router runs and travels while it does (ids
and weights follow in a second, small all-gather), and the reduce-scatter of y travels while the
caller computes the shared SwiGLU; backward: dy's all-gather overlaps the shared branch's
backward, dx's reduce-scatter the router's. Same values and bytes, one more collective launch.

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
from omnimoe_kernels.rows_routing import RowsRouting, rows_routing
from omnimoe_train.parallel.collectives import (
    GatherRows,
    GroupComm,
    ScatterSumRows,
    ShardingStats,
    row_bytes,
)
from omnimoe_train.parallel.overlap import PendingExchange, TokensInFlight, start_exchange


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
    distinct_ids: bool = False,
    ascending_ids: bool = False,
) -> tuple[torch.Tensor, ShardingStats]:
    """Atomic experts with the tables sharded by expert id over ``group``.

    Each rank passes its own tokens and global expert ids (0..N-1), and its shard (E = N/P rows)
    of U and V; it gets back exactly ``atomic_experts`` with the full tables for its tokens.
    ``group_tokens``: T of every rank of the group, if known (else one count exchange). All
    ranks of the group must call this together with the same ``requires_grad`` pattern.
    ``distinct_ids``: no expert twice in a token's row (``omnimoe_kernels.atomic_experts``).
    ``ascending_ids``: each token's ids in ascending order (both routers' promise), so its pairs
    on this rank are one run of its slots, which the combine kernels then walk alone
    (``pair_ranges`` of ``omnimoe_kernels.atomic_experts``). Raises ``ValueError`` for shards
    or routing of the wrong shape.
    """
    num_tokens = x_TD.shape[0]
    comm = GroupComm.create(group, num_tokens, group_tokens)
    _check_rows_shapes(comm, x_TD, up_local_ED, down_local_ED, weights_TK, indices_TK, num_experts)
    ids_TK = indices_TK.to(torch.int32)
    x_GD, weights_GK, ids_GK = GatherRows.apply(comm, x_TD, weights_TK, ids_TK)
    y_part_GD, routing = _local_experts(
        comm, x_GD, up_local_ED, down_local_ED, weights_GK, ids_GK, backend, distinct_ids,
        ascending_ids,
    )  # fmt: skip
    y_TD = ScatterSumRows.apply(comm, y_part_GD)
    stats = _rows_stats(comm, x_TD, weights_TK, y_part_GD, group_tokens is None, split=False)
    stats.local_pairs, stats.owner_ranks = routing.pairs, routing.owners
    return y_TD, stats


def start_rows_tokens(
    x_TD: torch.Tensor, *, group: ProcessGroup | None, group_tokens: list[int] | None = None
) -> TokensInFlight:
    """Start the all-gather of the tokens (they do not depend on the routing): the overlapped
    variant's first half (``parallel.ep_overlap``); ``rows_experts_overlapped`` finishes it.
    The backward reduce-scatters dx when it reaches this exchange, and the router's backward
    runs while it travels."""
    comm = GroupComm.create(group, x_TD.shape[0], group_tokens)
    tokens = start_exchange(x_TD, comm.gather_async, comm.scatter_sum_async)
    return TokensInFlight("rows", comm, x_TD, tokens, counted=group_tokens is None)


def rows_experts_overlapped(
    early: TokensInFlight,
    up_local_ED: torch.Tensor,
    down_local_ED: torch.Tensor,
    weights_TK: torch.Tensor,
    indices_TK: torch.Tensor,
    *,
    num_experts: int,
    backend: str = "auto",
    distinct_ids: bool = False,
    ascending_ids: bool = False,
) -> tuple[PendingExchange, ShardingStats]:
    """``sharded_atomic_experts_rows`` in two halves, the exchanges overlapped: the tokens'
    all-gather was started by ``start_rows_tokens``; this gathers ids and weights (one small
    all-gather), runs the local experts and starts the reduce-scatter of y, whose
    ``finish()`` gives y_TD. Work issued before ``finish()`` (the shared SwiGLU) overlaps it,
    and its backward overlaps the all-gather of dy. Same values as the one-call op; same bytes
    (the gather is split in two). Raises ``ValueError`` like it."""
    comm, x_TD = early.comm, early.x_TD
    _check_rows_shapes(comm, x_TD, up_local_ED, down_local_ED, weights_TK, indices_TK, num_experts)
    x_GD = early.tokens.finish()
    weights_GK, ids_GK = GatherRows.apply(comm, weights_TK, indices_TK.to(torch.int32))
    y_part_GD, routing = _local_experts(
        comm, x_GD, up_local_ED, down_local_ED, weights_GK, ids_GK, backend, distinct_ids,
        ascending_ids,
    )  # fmt: skip
    y_TD = start_exchange(y_part_GD, comm.scatter_sum_async, comm.gather_async)
    stats = _rows_stats(comm, x_TD, weights_TK, y_part_GD, early.counted, split=True)
    stats.local_pairs, stats.owner_ranks = routing.pairs, routing.owners
    return y_TD, stats


def _check_rows_shapes(
    comm: GroupComm,
    x_TD: torch.Tensor,
    up_local_ED: torch.Tensor,
    down_local_ED: torch.Tensor,
    weights_TK: torch.Tensor,
    indices_TK: torch.Tensor,
    num_experts: int,
) -> int:
    """E = N/P, or ``ValueError`` for shards or routing of the wrong shape."""
    num_tokens, hidden = x_TD.shape
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
    return experts_per_rank


def _local_experts(
    comm: GroupComm,
    x_GD: torch.Tensor,
    up_local_ED: torch.Tensor,
    down_local_ED: torch.Tensor,
    weights_GK: torch.Tensor,
    ids_GK: torch.Tensor,
    backend: str,
    distinct_ids: bool,
    ascending_ids: bool,
) -> tuple[torch.Tensor, RowsRouting]:
    """(y_part_GD of the pairs this rank owns, the routing pass: local ids and counters)."""
    experts_per_rank = up_local_ED.shape[0]
    first_id = comm.rank * experts_per_rank
    # One pass over the gathered ids: local ids, each token's run of this rank's slots
    # (ascending ids), the pair and owner counters (``omnimoe_kernels.rows_routing``).
    routing = rows_routing(
        ids_GK, first_id, experts_per_rank, comm.own_rows, comm.size, ascending=ascending_ids,
        backend=backend,
    )  # fmt: skip
    # The weight-gradient path from the pairs this rank owns (about 1/P of the group's, with
    # uniform routing), not all G*K: the pair kernel skips the others, the dense GEMMs do not.
    grad_path = choose_grad_path(
        "auto", x_GD.shape[0], experts_per_rank, x_GD.shape[1], ids_GK.shape[1], x_GD.dtype,
        x_GD.device, pairs=ids_GK.numel() // comm.size,
    )  # fmt: skip
    # Ascending ids: the combines walk only each token's run of this rank's pairs (about 1/P of
    # its K), not all K slots with the others masked.
    ranges = None
    if routing.start_G is not None and routing.count_G is not None:
        order_G = order_by_count(routing.count_G, ids_GK.shape[1])
        ranges = (routing.start_G, routing.count_G, order_G)
    y_part_GD = omnimoe_kernels.atomic_experts(
        x_GD, up_local_ED, down_local_ED, weights_GK, routing.local_GK, backend=backend,
        grad_path=grad_path, distinct_ids=distinct_ids, sort_forward=comm.size > 1,
        pair_ranges=ranges,
    )  # fmt: skip
    return y_part_GD, routing


def order_by_count(count_G: torch.Tensor, top_k: int) -> torch.Tensor:
    """int32 permutation of the tokens by their count of this rank's pairs, longest first (the
    ``order`` of ``atomic_experts(pair_ranges=...)``): counts vary a lot per token, and a
    combine tile of consecutive tokens walks nearly its worst token's K, so tiles of similar
    counts walk less; longest first, so the grid's last programs are short ones (a shorter
    tail). On the device, fixed shapes: no host sync, capturable in a CUDA graph."""
    with torch.no_grad():
        # 8-bit sort keys when K < 256: one radix pass instead of four (any tie order)
        keys_G = count_G.to(torch.uint8) if top_k < 256 else count_G
        return torch.sort(keys_G, descending=True).indices.to(torch.int32)


def _rows_stats(
    comm: GroupComm,
    x_TD: torch.Tensor,
    weights_TK: torch.Tensor,
    y_part_GD: torch.Tensor,
    counted: bool,
    *,
    split: bool,
) -> ShardingStats:
    """Bytes this rank sends (forward, and the backward it will run) from the shapes.
    ``split``: x gathered apart from ids and weights (the overlapped variant; same bytes)."""
    top_k = weights_TK.shape[1]
    x_row, w_row = row_bytes(x_TD), row_bytes(weights_TK)
    forward = {"counts": comm.count_bytes(counted)}
    if split:
        forward["x"] = comm.gather_bytes(x_row)
        forward["ids_weights"] = comm.gather_bytes(w_row + 4 * top_k)
    else:
        forward["gather"] = comm.gather_bytes(x_row + w_row + 4 * top_k)
    forward["y"] = comm.scatter_bytes(row_bytes(y_part_GD))
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
