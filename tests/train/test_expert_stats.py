"""Definitions of expert_usage, unevenness (KL from uniform), load_imbalance (max/mean) and
router_entropy."""

from __future__ import annotations

import math

import torch

from omnimoe_train.model.expert_stats import ExpertStats, layer_metrics, summarize


def test_uniform_selection_has_zero_unevenness_and_full_usage() -> None:
    counts = torch.full((2, 16), 5.0, dtype=torch.float64)
    m = summarize(
        counts,
        torch.tensor([4.0, 8.0], dtype=torch.float64),
        torch.tensor([2.0, 2.0], dtype=torch.float64),
    )
    assert m["expert_usage"] == 1.0
    assert abs(m["unevenness"]) < 1e-12
    assert m["load_imbalance"] == 1.0
    assert m["router_entropy"] == 3.0  # mean of 4/2 and 8/2


def test_one_expert_only_is_maximally_uneven() -> None:
    counts = torch.zeros(1, 64, dtype=torch.float64)
    counts[0, 3] = 10
    per_layer = layer_metrics(
        counts, torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    )
    usage, uneven, imbalance, _ = per_layer[0].tolist()
    assert usage == 1 / 64
    assert math.isclose(uneven, math.log(64))  # KL(one-hot || uniform) = log N
    assert imbalance == 64.0  # all tokens on one expert: max / mean = N


def test_load_imbalance_is_max_over_mean() -> None:
    counts = torch.tensor([[1.0, 2.0, 3.0, 6.0]], dtype=torch.float64)
    ones = torch.ones(1, dtype=torch.float64)
    (_, _, imbalance, _) = layer_metrics(counts, ones, ones)[0].tolist()
    assert imbalance == 6.0 / 3.0


def test_accumulator_counts_and_reset() -> None:
    stats = ExpertStats(8)
    stats.update(torch.tensor([[0, 1], [1, 7]]), torch.tensor([1.0, 3.0]))
    assert stats.counts_N.tolist() == [1, 2, 0, 0, 0, 0, 0, 1]
    assert stats.entropy_sum.item() == 4.0 and stats.tokens.item() == 2
    stats.update_counts(torch.tensor([0, 0, 5, 0, 0, 0, 0, 0]), torch.tensor([2.0]))
    assert stats.counts_N.tolist() == [1, 2, 5, 0, 0, 0, 0, 1]
    assert stats.entropy_sum.item() == 6.0 and stats.tokens.item() == 3
    stats.to(torch.bfloat16)  # a bf16 model keeps exact fp64 counters
    assert stats.counts_N.dtype == torch.float64
    stats.reset()
    assert stats.counts_N.sum().item() == 0 and stats.tokens.item() == 0
