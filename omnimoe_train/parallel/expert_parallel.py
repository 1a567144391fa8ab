"""The sharded atomic-experts call an OmniMoE layer makes when its tables are split over EP.

``ExpertParallel`` is attached to a layer by ``parallel.setup.apply_parallelism``; the layer
itself only knows "call the dispatch instead of the local kernel". It picks the ``rows`` or
``dim`` op and accumulates what each call reports: bytes (host ints, from shapes) and the pairs
this rank computed and the ranks owning each token's experts (device tensors, summed without a
host sync). ``dispatch_metrics`` reads them once per logging step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from omnimoe_train.parallel.collectives import ShardingStats
from omnimoe_train.parallel.dim_sharding import (
    dim_experts_overlapped,
    sharded_atomic_experts_dim,
    start_dim_tokens,
)
from omnimoe_train.parallel.overlap import PendingExchange, TokensInFlight
from omnimoe_train.parallel.rows_dispatch import (
    rows_experts_overlapped,
    sharded_atomic_experts_rows,
    start_rows_tokens,
)


@dataclass
class DispatchCounters:
    """Sums over the training calls of one layer since the last ``reset``."""

    forward_bytes: int = 0
    backward_bytes: int = 0
    tokens: int = 0
    calls: int = 0
    local_pairs: torch.Tensor | None = None  # device scalar
    owner_ranks: torch.Tensor | None = None  # device scalar: sum over tokens

    def add(self, stats: ShardingStats) -> None:
        self.forward_bytes += stats.forward_bytes
        self.backward_bytes += stats.backward_bytes
        self.tokens += stats.tokens
        self.calls += 1
        if self.local_pairs is None:
            self.local_pairs = stats.local_pairs.clone()
            self.owner_ranks = stats.owner_ranks.clone()
        else:
            self.local_pairs += stats.local_pairs
            self.owner_ranks += stats.owner_ranks

    def reset(self) -> None:
        self.forward_bytes = self.backward_bytes = self.tokens = self.calls = 0
        self.local_pairs = self.owner_ranks = None


class ExpertParallel:
    """Runs one layer's atomic experts on its table shard of the expert-parallel ``group``.

    Every rank of an EP group holds a micro-batch of the same shape (same micro-batch size and
    sequence length; sequence parallelism splits evenly), so the token counts of the group are
    known without an exchange: no call waits on the host.

    ``overlap`` (``parallel.ep_overlap``): ``start`` issues the token exchange before the layer
    routes, and the call returns the output still in flight (``PendingExchange``) so the layer
    computes its shared branch before ``finish()`` (``parallel.overlap``). Off: ``start``
    returns None and the call returns y_TD, each exchange waited for at once.
    """

    def __init__(
        self,
        mode: str,
        group: ProcessGroup,
        *,
        num_experts: int,
        backend: str = "auto",
        overlap: bool = False,
    ) -> None:
        if mode not in ("rows", "dim"):
            raise ValueError(f"mode={mode!r} must be rows or dim")
        self.mode, self.group, self.overlap = mode, group, overlap
        self.num_experts, self.backend = num_experts, backend
        self.size = dist.get_world_size(group)
        self.counters = DispatchCounters()

    def start(self, x_TD: torch.Tensor) -> TokensInFlight | None:
        """Issue the token exchange of this call (overlap on; None when off). Every rank of
        the group must then make the matching call, in the same order."""
        if not self.overlap:
            return None
        tokens = [x_TD.shape[0]] * self.size
        start = start_rows_tokens if self.mode == "rows" else start_dim_tokens
        return start(x_TD, group=self.group, group_tokens=tokens)

    def __call__(
        self,
        x_TD: torch.Tensor,
        up_local: torch.Tensor,
        down_local: torch.Tensor,
        weights_TK: torch.Tensor,
        indices_TK: torch.Tensor,
        *,
        record: bool,
        early: TokensInFlight | None = None,
        distinct_ids: bool = False,
        ascending_ids: bool = False,
    ) -> torch.Tensor | PendingExchange:
        """y_TD, or (``early`` from ``start``) y_TD still in flight: ``finish()`` it.
        ``distinct_ids``: no expert twice in a token's row (the table gradients skip merging
        repeats, in either mode); ``ascending_ids``: each token's ids in ascending order (the
        rows mode's combines then walk pair ranges)."""
        tokens = [x_TD.shape[0]] * self.size
        if early is not None and (early.x_TD is not x_TD or early.mode != self.mode):
            raise ValueError(
                f"early ({early.mode}) was not started by this {self.mode} call's start(x_TD)"
            )
        y_TD: torch.Tensor | PendingExchange
        if early is not None and self.mode == "rows":
            y_TD, stats = rows_experts_overlapped(
                early, up_local, down_local, weights_TK, indices_TK,
                num_experts=self.num_experts, backend=self.backend, distinct_ids=distinct_ids,
                ascending_ids=ascending_ids,
            )  # fmt: skip
        elif early is not None:
            y_TD, stats = dim_experts_overlapped(
                early, up_local, down_local, weights_TK, indices_TK, backend=self.backend,
                distinct_ids=distinct_ids,
            )  # fmt: skip
        elif self.mode == "rows":
            y_TD, stats = sharded_atomic_experts_rows(
                x_TD, up_local, down_local, weights_TK, indices_TK, group=self.group,
                num_experts=self.num_experts, group_tokens=tokens, backend=self.backend,
                distinct_ids=distinct_ids, ascending_ids=ascending_ids,
            )  # fmt: skip
        else:
            y_TD, stats = sharded_atomic_experts_dim(
                x_TD, up_local, down_local, weights_TK, indices_TK, group=self.group,
                group_tokens=tokens, backend=self.backend, distinct_ids=distinct_ids,
            )  # fmt: skip
        if record:  # evaluation traffic stays out of the per-step training numbers
            self.counters.add(stats)
        return y_TD


def dispatch_metrics(
    dispatches: list[ExpertParallel], steps: int, device: torch.device
) -> dict[str, float]:
    """Dispatch traffic and load per layer per optimizer step, averaged over ranks and layers;
    resets the counters. Collective over the whole world (every pipeline stage's layers count,
    and every rank must call it, with or without layers).

    ``dispatch_load_imbalance``: max over the ranks of an EP group of the (token, expert) pairs a
    rank computed, over their mean (1 = balanced; ``dim`` is 1 by construction), averaged over
    layers; ``dispatch_load_imbalance_max``: the worst layer.
    """
    ep_group = dispatches[0].group if dispatches else None
    ep_size = dispatches[0].size if dispatches else 1
    rank_in_ep = dist.get_rank(ep_group) if dist.is_initialized() and dispatches else 0
    # Pairs of every layer on every rank of this EP group: (layers, P), summed over the group.
    pairs_LP = torch.zeros(len(dispatches), ep_size, dtype=torch.float64, device=device)
    host = torch.zeros(4, dtype=torch.float64)
    owner_ranks = torch.zeros((), dtype=torch.float64, device=device)
    for layer, ep in enumerate(dispatches):
        c = ep.counters
        host += torch.tensor(
            [c.forward_bytes, c.backward_bytes, c.tokens, 1.0], dtype=torch.float64
        )
        if c.local_pairs is not None:
            pairs_LP[layer, rank_in_ep] = c.local_pairs.to(pairs_LP)
            owner_ranks += c.owner_ranks.to(owner_ranks)
        c.reset()
    if dist.is_initialized() and dispatches:
        dist.all_reduce(pairs_LP, group=ep_group)
    mean_L = pairs_LP.mean(1)
    balanced = mean_L > 0
    ratio_L = torch.where(balanced, pairs_LP.amax(1) / mean_L.clamp_min(1e-30), 1.0)
    # Summed over the world: bytes, tokens, layer-ranks, owner ranks, imbalance sum and max.
    totals = torch.cat([host.to(device), owner_ranks[None], ratio_L.sum()[None]])
    worst = ratio_L.amax()[None] if len(dispatches) else torch.ones(1, device=device).double()
    if dist.is_initialized():
        dist.all_reduce(totals)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    fwd, bwd, tokens, layer_ranks, owners, ratio_sum = totals.tolist()
    per = max(layer_ranks, 1.0) * max(steps, 1)
    return {
        "dispatch_fwd_bytes_per_layer": fwd / per,
        "dispatch_bwd_bytes_per_layer": bwd / per,
        "dispatch_dest_ranks": owners / max(tokens, 1.0),
        "dispatch_load_imbalance": ratio_sum / max(layer_ranks, 1.0),
        "dispatch_load_imbalance_max": worst.item(),
    }
