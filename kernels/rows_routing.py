"""One pass over the gathered expert ids for ``rows`` expert parallelism.

Rank r of a ``rows`` group owns expert ids [first, first + E). Per call it needs, for the
group's G gathered tokens (legend: G tokens, K experts per token, E experts of this rank):

    local_GK   id - first where this rank owns the expert, else E ("no expert": skipped)
    start_G    the slots below first       } with each token's ids ascending (the routers'
    count_G    the slots this rank owns    } promise) its pairs here are slots [start, start+count)
    pairs      sum of count_G: the pairs this rank computes (a device scalar, for metrics)
    owners     over this rank's own tokens (rows ``own``), the number of ranks owning at least one
               of a token's experts, summed (the ``dispatch_dest_ranks`` metric's numerator)

Why a kernel: as PyTorch ops that is about a dozen launches over the (G, K) ids (subtract, two
compares, where, two row sums and their dtype copies, a total, and the owner counter's floor
division, int64 copy, scatter and sum), each a full pass; a profiled a80m ``ep2_rows`` training
step spent ~20 ms of its kernel time in such passes that data parallelism does not run. The
Triton program reads a block of rows once and writes every output; the two scalars are summed
with integer atomics (exact, so deterministic). The PyTorch path is the reference and the
fallback for ids in any order (then no ranges, and the owners counted by a scatter).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omnimoe_kernels import resolve_backend


@dataclass
class RowsRouting:
    """What ``rows_routing`` returns (int32 unless noted; ranges None unless ascending)."""

    local_GK: torch.Tensor
    start_G: torch.Tensor | None
    count_G: torch.Tensor | None
    pairs: torch.Tensor  # int64 scalar
    owners: torch.Tensor  # int64 scalar


def rows_routing(
    ids_GK: torch.Tensor,
    first_id: int,
    experts: int,
    own: slice,
    ranks: int,
    *,
    ascending: bool,
    backend: str = "auto",
) -> RowsRouting:
    """Local ids, pair ranges and counters of the gathered ``ids_GK`` (int32, (G, K), global
    expert ids in [0, ranks * experts)) for the rank owning ids [first_id, first_id +
    experts); ``own``: this rank's rows of the group. ``ascending``: each row's ids ascend
    (then the ranges are returned and the Triton kernel may run). No host sync. Raises
    ``ValueError`` for ids that are not int32 (G, K) or an empty expert block."""
    if ids_GK.dim() != 2 or ids_GK.dtype != torch.int32:
        raise ValueError(f"ids {tuple(ids_GK.shape)} {ids_GK.dtype} must be int32 (G, K)")
    if experts < 1 or first_id < 0:
        raise ValueError(f"expert block [{first_id}, {first_id} + {experts}) is empty")
    if ascending and ids_GK.numel() and resolve_backend(backend, ids_GK.device) == "triton":
        return _rows_routing_triton(ids_GK.contiguous(), first_id, experts, own)
    return _rows_routing_torch(ids_GK, first_id, experts, own, ranks, ascending)


def _rows_routing_torch(
    ids_GK: torch.Tensor, first_id: int, experts: int, own: slice, ranks: int, ascending: bool
) -> RowsRouting:
    with torch.no_grad():
        local_GK = ids_GK - first_id
        mine_GK = (local_GK >= 0) & (local_GK < experts)
        local_GK = torch.where(mine_GK, local_GK, experts)
        start_G = count_G = None
        if ascending:
            start_G = (ids_GK < first_id).sum(1, dtype=torch.int32)
            count_G = mine_GK.sum(1, dtype=torch.int32)
        own_TK = ids_GK[own]
        owners_TP = torch.zeros(own_TK.shape[0], ranks, dtype=torch.bool, device=ids_GK.device)
        owners_TP.scatter_(1, (own_TK // experts).long(), True)
    return RowsRouting(local_GK, start_G, count_G, mine_GK.sum(), owners_TP.sum())


def _rows_routing_triton(
    ids_GK: torch.Tensor, first_id: int, experts: int, own: slice
) -> RowsRouting:
    import triton

    from omnimoe_kernels.rows_routing_kernel import rows_routing_kernel

    rows, top_k = ids_GK.shape
    local_GK = torch.empty_like(ids_GK)
    start_G = torch.empty(rows, dtype=torch.int32, device=ids_GK.device)
    count_G = torch.empty_like(start_G)
    sums = torch.zeros(2, dtype=torch.int64, device=ids_GK.device)  # pairs, owners
    block_k = triton.next_power_of_2(top_k)
    block_rows = max(1, 4096 // block_k)
    own_lo, own_hi, _ = own.indices(rows)
    rows_routing_kernel[(triton.cdiv(rows, block_rows),)](
        ids_GK, local_GK, start_G, count_G, sums, rows, top_k, first_id, experts, own_lo,
        own_hi, BLOCK_ROWS=block_rows, BLOCK_K=block_k, num_warps=4,
    )  # fmt: skip
    return RowsRouting(local_GK, start_G, count_G, sums[0], sums[1])
