"""The sharded atomic-experts call an OmniMoE layer makes when its tables are split over EP.

``ExpertParallel`` is attached to a layer by ``parallel.setup.apply_parallelism``; the layer
itself only knows "call the dispatch instead of the local kernel". It picks the ``rows`` or
``dim`` op and accumulates the bytes each call reports, so the trainer can log them per layer
per step without any host synchronisation of its own (the counts are host ints already).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from omnimoe_train.parallel.collectives import ShardingStats
from omnimoe_train.parallel.dim_sharding import sharded_atomic_experts_dim
from omnimoe_train.parallel.rows_dispatch import sharded_atomic_experts_rows


@dataclass
class DispatchCounters:
    """Host-side sums over the training calls of one layer since the last ``reset``."""

    forward_bytes: int = 0
    backward_bytes: int = 0
    dest_rank_tokens: float = 0.0  # sum over tokens of the ranks each token was sent to
    tokens: int = 0
    calls: int = 0

    def add(self, stats: ShardingStats) -> None:
        self.forward_bytes += stats.forward_bytes
        self.backward_bytes += stats.backward_bytes
        self.dest_rank_tokens += stats.avg_dest_ranks_per_token * stats.tokens
        self.tokens += stats.tokens
        self.calls += 1

    def reset(self) -> None:
        self.forward_bytes = self.backward_bytes = self.tokens = self.calls = 0
        self.dest_rank_tokens = 0.0


class ExpertParallel:
    """Runs one layer's atomic experts on its table shard of the expert-parallel ``group``."""

    def __init__(
        self, mode: str, group: ProcessGroup, *, num_experts: int, backend: str = "auto"
    ) -> None:
        if mode not in ("rows", "dim"):
            raise ValueError(f"mode={mode!r} must be rows or dim")
        self.mode, self.group = mode, group
        self.num_experts, self.backend = num_experts, backend
        self.counters = DispatchCounters()

    def __call__(
        self,
        x_TD: torch.Tensor,
        up_local: torch.Tensor,
        down_local: torch.Tensor,
        weights_TK: torch.Tensor,
        indices_TK: torch.Tensor,
        *,
        record: bool,
    ) -> torch.Tensor:
        if self.mode == "rows":
            y_TD, stats = sharded_atomic_experts_rows(
                x_TD,
                up_local,
                down_local,
                weights_TK,
                indices_TK,
                group=self.group,
                num_experts=self.num_experts,
                backend=self.backend,
            )
        else:
            y_TD, stats = sharded_atomic_experts_dim(
                x_TD, up_local, down_local, weights_TK, indices_TK, group=self.group
            )
        if record:  # evaluation traffic stays out of the per-step training numbers
            self.counters.add(stats)
        return y_TD


def dispatch_metrics(
    dispatches: list[ExpertParallel], steps: int, device: torch.device
) -> dict[str, float]:
    """Dispatch traffic per layer per optimizer step, averaged over ranks and layers; resets.

    Collective over the whole world (every pipeline stage's layers count): call on every rank.
    """
    totals = torch.zeros(5, dtype=torch.float64)
    for ep in dispatches:
        c = ep.counters
        totals += torch.tensor(
            [c.forward_bytes, c.backward_bytes, c.dest_rank_tokens, c.tokens, 1.0],
            dtype=torch.float64,
        )
        c.reset()
    if dist.is_initialized():
        totals = totals.to(device)  # NCCL reduces device tensors only
        dist.all_reduce(totals)
        totals = totals.cpu()
    fwd, bwd, dest_tokens, tokens, layer_ranks = totals.tolist()
    per = max(layer_ranks, 1.0) * max(steps, 1)
    return {
        "dispatch_fwd_bytes_per_layer": fwd / per,
        "dispatch_bwd_bytes_per_layer": bwd / per,
        "dispatch_dest_ranks": dest_tokens / max(tokens, 1.0),
    }
