"""Expert-usage statistics, accumulated on the device without host synchronisation.

Each OmniMoE layer adds its selections into an N-vector of counts every forward pass; the trainer
reads and resets them once per logging window. Definitions (per layer, then averaged over layers):

- ``expert_usage``: fraction of the N experts selected at least once in the window.
- ``unevenness``: KL(p || uniform) = log N - H(p), p the selection frequencies (PKM / PEER).
- ``router_entropy``: mean over tokens of the entropy (nats) of the full n*n routing distribution.
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

    @torch.no_grad()
    def update(self, indices_TK: torch.Tensor, entropy_T: torch.Tensor) -> None:
        flat = indices_TK.reshape(-1)
        self.counts_N.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))
        self.entropy_sum.add_(entropy_T.double().sum())
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


METRIC_NAMES = ("expert_usage", "unevenness", "router_entropy")


def layer_metrics(
    counts_LN: torch.Tensor, entropy_sum_L: torch.Tensor, tokens_L: torch.Tensor
) -> torch.Tensor:
    """Per-layer window metrics [L, 3] (columns: METRIC_NAMES) from the reduced accumulators."""
    num_experts = counts_LN.shape[-1]
    total_L = counts_LN.sum(-1).clamp_min(1.0)
    p_LN = counts_LN / total_L[:, None]
    usage_L = (counts_LN > 0).double().mean(-1)
    plogp = torch.where(p_LN > 0, p_LN * p_LN.clamp_min(1e-300).log(), torch.zeros_like(p_LN))
    uneven_L = math.log(num_experts) + plogp.sum(-1)
    entropy_L = entropy_sum_L / tokens_L.clamp_min(1.0)
    return torch.stack([usage_L, uneven_L, entropy_L], dim=-1)


def summarize(counts_LN: torch.Tensor, entropy_sum_L: torch.Tensor, tokens_L: torch.Tensor) -> dict:
    """Window metrics averaged over the given layers."""
    means = layer_metrics(counts_LN, entropy_sum_L, tokens_L).mean(0)
    return {name: means[i].item() for i, name in enumerate(METRIC_NAMES)}


def collect_expert_metrics(
    stats: list[ExpertStats], *, sequence_parallel: bool
) -> dict[str, float]:
    """Window metrics over every OmniMoE layer of the model, on every rank; resets ``stats``.

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
