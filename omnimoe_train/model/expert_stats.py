"""Routing statistics of every routed MLP, accumulated on the device without host synchronisation.

Each routed layer (OmniMoE and its ablations, PEER, PKM, and the GShard / DeepSeekMoE router)
owns an :class:`ExpertStats` and adds its selections into an N-vector of counts every training
forward pass; the trainer reads and resets them once per logging window. Definitions (per layer
over the window, then averaged over layers; N = experts, or memory slots for PKM):

- ``expert_usage``: fraction of the N experts selected at least once in the window.
- ``unevenness``: KL(p || uniform) = log N - H(p), p the selection frequencies (PKM / PEER).
- ``load_imbalance``: max over experts of the tokens routed to one expert / their mean
  (1 = perfectly balanced; the max/mean load of the busiest expert).
- ``router_entropy``: mean over tokens of the entropy (nats) of the full routing distribution
  (over all N experts; for multi-head product keys, the mean over heads).

``aux_loss`` (GShard / DeepSeekMoE only) is megatron's load-balancing loss without its coefficient,
as its router records it per layer (``collect_aux_loss``), averaged over layers and micro-batches.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ExpertStats(nn.Module):
    """Per-layer accumulators; buffers are not persistent (they are not model state)."""

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.register_buffer(
            "counts_N", torch.zeros(num_experts, dtype=torch.float64), persistent=False
        )
        self.register_buffer("entropy_sum", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("tokens", torch.zeros((), dtype=torch.float64), persistent=False)
        self.enabled = True  # trainer.expert_stats: false makes the updates no-ops

    @torch.no_grad()
    def update(self, indices_TK: torch.Tensor, entropy_T: torch.Tensor) -> None:
        """Add the selections ``indices_TK`` (expert ids) of T tokens and their entropies."""
        if not self.enabled:
            return
        flat = indices_TK.reshape(-1)
        self.counts_N.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))
        self.add_entropy(entropy_T)

    @torch.no_grad()
    def update_counts(self, counts_N: torch.Tensor, entropy_T: torch.Tensor) -> None:
        """Add per-expert selection counts (e.g. a routing map summed over tokens)."""
        if not self.enabled:
            return
        self.counts_N.add_(counts_N.to(torch.float64))
        self.add_entropy(entropy_T)

    def counter(self) -> torch.Tensor | None:
        """The (N,) float64 counts for a kernel to add selections into itself (OmniMoE's adds
        them in its backward, off the expert sort: ``omnimoe_kernels.atomic_experts``'s
        ``usage_N``); None while disabled."""
        return self.counts_N if self.enabled else None

    @torch.no_grad()
    def add_entropy(self, entropy_T: torch.Tensor) -> None:
        """Add the routing entropies (nats) of T tokens."""
        if not self.enabled:
            return
        self.entropy_sum.add_(entropy_T.sum(dtype=torch.float64))
        self.tokens.add_(entropy_T.numel())

    def _apply(self, fn, recurse=True):  # noqa: ANN001
        # Keep fp64 counters when the model is cast to bf16: counts must stay exact.
        super()._apply(fn, recurse)
        for name in ("counts_N", "entropy_sum", "tokens"):
            buf = getattr(self, name)
            if buf.dtype != torch.float64:
                setattr(self, name, buf.double())
        return self

    def reset(self) -> None:
        self.counts_N.zero_()
        self.entropy_sum.zero_()
        self.tokens.zero_()


METRIC_NAMES = ("expert_usage", "unevenness", "load_imbalance", "router_entropy")


def layer_metrics(
    counts_LN: torch.Tensor, entropy_sum_L: torch.Tensor, tokens_L: torch.Tensor
) -> torch.Tensor:
    """Per-layer window metrics [L, 4] (columns: METRIC_NAMES) from the reduced accumulators.

    Layers are stacked per width: all layers of one model route over the same N.
    """
    num_experts = counts_LN.shape[-1]
    total_L = counts_LN.sum(-1).clamp_min(1.0)
    p_LN = counts_LN / total_L[:, None]
    usage_L = (counts_LN > 0).double().mean(-1)
    plogp = torch.where(p_LN > 0, p_LN * p_LN.clamp_min(1e-300).log(), torch.zeros_like(p_LN))
    uneven_L = math.log(num_experts) + plogp.sum(-1)
    imbalance_L = counts_LN.max(-1).values * num_experts / total_L
    entropy_L = entropy_sum_L / tokens_L.clamp_min(1.0)
    return torch.stack([usage_L, uneven_L, imbalance_L, entropy_L], dim=-1)


def summarize(counts_LN: torch.Tensor, entropy_sum_L: torch.Tensor, tokens_L: torch.Tensor) -> dict:
    """Window metrics averaged over the given layers."""
    means = layer_metrics(counts_LN, entropy_sum_L, tokens_L).mean(0)
    return {name: means[i].item() for i, name in enumerate(METRIC_NAMES)}


def collect_expert_metrics(
    stats: list[ExpertStats], *, sequence_parallel: bool
) -> dict[str, float]:
    """Window metrics over every routed layer of the model, on every rank; resets ``stats``.

    Collective when a process group exists: data-parallel ranks route different tokens, and so
    do TP ranks under sequence parallelism (without it they route the same tokens, which must not
    be counted twice); each pipeline stage holds different layers, whose per-layer metrics are
    averaged over all stages.
    """
    if not stats:
        return {}
    import torch.distributed as dist
    from megatron.core import parallel_state

    counts = torch.stack([s.counts_N for s in stats])
    entropy = torch.stack([s.entropy_sum for s in stats])
    tokens = torch.stack([s.tokens for s in stats])
    for s in stats:
        s.reset()
    if not dist.is_initialized():
        return summarize(counts, entropy, tokens)
    groups = [parallel_state.get_data_parallel_group()]
    if sequence_parallel:
        groups.append(parallel_state.get_tensor_model_parallel_group())
    for t in (counts, entropy, tokens):
        for group in groups:
            dist.all_reduce(t, group=group)
    per_layer = layer_metrics(counts, entropy, tokens)
    totals = torch.cat([per_layer.sum(0), per_layer.new_tensor([per_layer.shape[0]])])
    dist.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
    means = totals[:-1] / totals[-1]
    return {name: means[i].item() for i, name in enumerate(METRIC_NAMES)}


AUX_LOSS_NAME = "load_balancing_loss"  # the name megatron's TopKRouter records it under


def collect_aux_loss(*, num_layers: int, microbatches: int) -> dict[str, float]:
    """megatron's recorded load-balancing loss, mean per layer and micro-batch; resets it.

    ``microbatches``: micro-batches run since the last call (steps x micro-batches per step).
    Collective on every rank of an initialised process group (megatron's tracker reduces over
    the pipeline group, sums over the TP group under sequence parallelism, averages over
    data-parallel ranks): every rank must call it, also one whose layers recorded nothing yet.
    """
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    tracker = get_moe_metrics_tracker()
    # megatron returns metrics whose names end in "loss" through total_loss_dict, not the log.
    losses: dict[str, torch.Tensor] = {}
    tracker.report(
        loss_scale=1.0 / max(microbatches, 1),
        iteration=0,
        force_initialize=True,
        track_names=[AUX_LOSS_NAME],
        num_layers=num_layers,
        total_loss_dict=losses,
    )
    return {"aux_loss": float(losses[AUX_LOSS_NAME])}
