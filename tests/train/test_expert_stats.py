"""Definitions of expert_usage, unevenness (KL from uniform), load_imbalance (max/mean) and
router_entropy, and their reduction over data-parallel, sequence-parallel and pipeline ranks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from omnimoe_train.model.expert_stats import (
    METRIC_NAMES,
    ExpertStats,
    collect_expert_metrics,
    layer_metrics,
    summarize,
)
from tests.parallel.distributed import run_distributed


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


def _rank_stats(rank: int, layers: int = 2, n: int = 8) -> list[ExpertStats]:
    """Rank ``rank``'s accumulators: its own tokens' selections (ids skewed by the rank, so
    the union differs from every rank's part) and entropies."""
    gen = torch.Generator().manual_seed(100 + rank)
    stats = []
    for _ in range(layers):
        s = ExpertStats(n)
        ids = torch.randint(0, n // 2 + 2 * rank, (5 + 3 * rank, 2), generator=gen)
        s.update(ids, torch.rand(ids.shape[0], generator=gen) * (rank + 1))
        stats.append(s)
    return stats


def _stacked(stats: list[ExpertStats]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.stack([s.counts_N for s in stats]),
        torch.stack([s.entropy_sum for s in stats]),
        torch.stack([s.tokens for s in stats]),
    )


def _reduction_case(mode: str) -> None:
    """Two gloo ranks as data-parallel ranks ("dp"), sequence-parallel TP ranks ("sp") or two
    pipeline stages ("pp"): every rank logs the metrics of the whole model over all tokens."""
    from megatron.core import parallel_state

    rank, world = dist.get_rank(), dist.group.WORLD
    own = [dist.new_group([r]) for r in range(dist.get_world_size())][rank]
    groups = {"dp": own, "tp": own, "pp": own}
    groups["tp" if mode == "sp" else mode] = world
    parallel_state.get_data_parallel_group = lambda **_: groups["dp"]
    parallel_state.get_tensor_model_parallel_group = lambda **_: groups["tp"]
    parallel_state.get_pipeline_model_parallel_group = lambda **_: groups["pp"]
    got = collect_expert_metrics(_rank_stats(rank), sequence_parallel=mode == "sp")
    parts = [_stacked(_rank_stats(r)) for r in range(2)]
    if mode == "pp":  # each stage its own layers: the mean over all four layers
        per_layer = torch.cat([layer_metrics(*part) for part in parts])
        want = dict(zip(METRIC_NAMES, per_layer.mean(0).tolist(), strict=True))
    else:  # the same layers, other tokens: the metrics of the summed accumulators
        want = summarize(*(sum(p[i] for p in parts) for i in range(3)))
    local = summarize(*parts[rank])
    assert got == pytest.approx(want, rel=1e-12), (mode, got, want)
    assert got != pytest.approx(local, rel=1e-6), mode  # the case tells the two apart


@pytest.mark.parametrize("mode", ["dp", "sp", "pp"])
def test_collected_metrics_cover_every_rank(mode: str) -> None:
    run_distributed(_reduction_case, 2, mode)
