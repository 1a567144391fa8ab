"""Differentiable variable-split all-to-all and the byte accounting shared by both sharding modes.

Shape legend used across ``omnimoe_train.parallel``: T tokens on this rank, D hidden size,
N experts, n = sqrt(N) router half, K top-k, P ranks of the expert-parallel group, E = N/P experts
owned by one rank (rows mode), Dp = D/P columns held by one rank (dim mode), R rows received,
S (token, destination-rank) rows, Q (token, expert) pairs, G tokens of the whole group.

Every collective here is an ``all_to_all_single`` with explicit split sizes: it is the only
variable-size primitive that gloo (CPU tests) and NCCL both support, and its backward is the same
collective with the splits swapped, so one autograd.Function serves every exchange.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


def _all_to_all(
    input_: torch.Tensor,
    output_splits: list[int],
    input_splits: list[int],
    group: ProcessGroup | None,
) -> torch.Tensor:
    """All-to-all over dim 0; ``input_splits[p]`` rows go to rank p, ``output_splits[p]`` come back."""
    input_ = input_.contiguous()
    output = input_.new_empty((sum(output_splits), *input_.shape[1:]))
    dist.all_to_all_single(
        output,
        input_,
        output_split_sizes=output_splits,
        input_split_sizes=input_splits,
        group=group,
    )
    return output


class _AllToAllSingle(torch.autograd.Function):
    """``all_to_all_single`` of several tensors; the backward is the reverse exchanges.

    Tensors exchanged together share one autograd node, so the backward issues their reversed
    collectives in one fixed order on every rank. Separate nodes could become ready in a
    rank-dependent order (it depends on how each rank's local compute graph consumes them) and
    the ranks would then pair up mismatched collectives.
    """

    @staticmethod
    def forward(
        ctx, group: ProcessGroup | None, splits: list[tuple[list[int], list[int]]], *inputs
    ):
        ctx.group, ctx.splits = group, splits
        return tuple(
            _all_to_all(t, out_splits, in_splits, group)
            for t, (out_splits, in_splits) in zip(inputs, splits)
        )

    @staticmethod
    def backward(ctx, *grad_outputs: torch.Tensor):
        grad_inputs = [
            _all_to_all(grad, in_splits, out_splits, ctx.group) if needed else None
            for grad, (out_splits, in_splits), needed in zip(
                grad_outputs, ctx.splits, ctx.needs_input_grad[2:]
            )
        ]
        return None, None, *grad_inputs


def all_to_all_many(
    exchanges: list[tuple[torch.Tensor, list[int], list[int]]], group: ProcessGroup | None
) -> list[torch.Tensor]:
    """Several variable-split all-to-alls over dim 0, differentiable, with one backward node.

    Each exchange is ``(input, output_splits, input_splits)``: ``input_splits[p]`` rows go to
    rank p and ``output_splits[p]`` rows come from it.
    """
    inputs = [t for t, _, _ in exchanges]
    splits = [(out_splits, in_splits) for _, out_splits, in_splits in exchanges]
    if any(t.requires_grad for t in inputs):
        return list(_AllToAllSingle.apply(group, splits, *inputs))
    return [_all_to_all(t, o, i, group) for t, (o, i) in zip(inputs, splits)]


def all_to_all(
    input_: torch.Tensor,
    output_splits: list[int],
    input_splits: list[int],
    group: ProcessGroup | None,
) -> torch.Tensor:
    """One variable-split all-to-all over dim 0, differentiable when ``input_`` requires grad."""
    return all_to_all_many([(input_, output_splits, input_splits)], group)[0]


def exchange_counts(counts_PC: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Send row p of ``counts_PC`` (C int64 counters) to rank p; returns what each rank sent us.

    This is the single host synchronisation of a layer call: the caller moves the result (and
    its own counts) to the host once, because ``all_to_all_single`` needs Python split lists.
    """
    num_ranks = counts_PC.shape[0]
    return _all_to_all(counts_PC, [1] * num_ranks, [1] * num_ranks, group)


def remote_bytes(splits: list[int], my_rank: int, bytes_per_row: int) -> int:
    """Bytes an all-to-all puts on the wire from this rank: every chunk but the one to itself."""
    return (sum(splits) - splits[my_rank]) * bytes_per_row


def row_bytes(t: torch.Tensor) -> int:
    """Bytes of one dim-0 row of ``t`` (the unit the split sizes count)."""
    per_row = t.element_size()
    for size in t.shape[1:]:
        per_row *= size
    return per_row


@dataclass
class ShardingStats:
    """Communication of one sharded atomic-experts call, as seen from this rank.

    Bytes count only chunks sent to other ranks (the self chunk never leaves the device).
    ``backward_bytes`` is known at forward time (the backward replays the same splits reversed),
    so it is a prediction that is exact as long as backward runs. All values are host numbers
    derived from split sizes that were on the host anyway: reading them costs no sync.
    """

    mode: str
    forward_bytes: int
    backward_bytes: int
    avg_dest_ranks_per_token: float
    tokens: int
    forward_bytes_by_exchange: dict[str, int] = field(default_factory=dict)

    def as_metrics(self, prefix: str = "expert_dispatch") -> dict[str, float]:
        """Flat dict for a metrics.jsonl row."""
        return {
            f"{prefix}/forward_bytes": float(self.forward_bytes),
            f"{prefix}/backward_bytes": float(self.backward_bytes),
            f"{prefix}/avg_dest_ranks_per_token": self.avg_dest_ranks_per_token,
        }
