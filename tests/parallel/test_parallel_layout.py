"""Parallel-layout validation: one-line errors naming the key and the broken rule."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from omnimoe_train.parallel.layout import (
    LayoutError,
    ParallelLayout,
    sharding_modes_allowed,
    validate_layout,
)

MODEL = dict(num_layers=24, num_heads=16, num_query_groups=4, num_experts=102_400, hidden_size=1536)


def test_valid_layout_derives_groups_without_process_groups() -> None:
    layout = ParallelLayout(
        world_size=64, tp=2, pp=2, vpp=3, ep=8, sequence_parallel=True, expert_table_sharding="rows"
    )
    validate_layout(layout, **MODEL)
    assert (layout.dp, layout.expert_dp) == (16, 4)
    assert not dist.is_initialized()


@pytest.mark.parametrize(
    ("layout", "model", "key", "fragment"),
    [
        (ParallelLayout(world_size=6, tp=4), {}, "world_size", "divisible by tp*pp"),
        (ParallelLayout(world_size=0), {}, "world_size", "positive integer"),
        (
            ParallelLayout(world_size=6, tp=3, sequence_parallel=True),
            {},
            "tp",
            "num_attention_heads=16",
        ),
        (
            ParallelLayout(world_size=8, tp=8, sequence_parallel=True),
            {},
            "tp",
            "num_query_groups=4",
        ),
        (ParallelLayout(world_size=10, pp=5), {}, "pp", "num_layers=24"),
        (ParallelLayout(world_size=8, pp=2, vpp=8), {}, "pp", "pp*vpp=16"),
        (ParallelLayout(world_size=8, vpp=2), {}, "vpp", "needs pp > 1"),
        (ParallelLayout(world_size=8, tp=2, ep=2), {}, "sequence_parallel", "tp=2 > 1"),
        (ParallelLayout(world_size=8, sequence_parallel=True), {}, "sequence_parallel", "tp > 1"),
        (ParallelLayout(world_size=12, pp=2, ep=4), {}, "ep", "must divide world_size/pp"),
        (
            ParallelLayout(world_size=8, ep=8),
            {"num_experts": 1000},
            "num_experts",
            "perfect square",
        ),
        (ParallelLayout(world_size=64, ep=64), {"num_experts": 32 * 32}, "ep", "<= n"),
        (ParallelLayout(world_size=6, ep=3, expert_table_sharding="rows"), {}, "ep", "n = sqrt"),
        (
            ParallelLayout(world_size=7, ep=7, expert_table_sharding="dim"),
            {"num_experts": 49 * 49},
            "ep",
            "hidden_size=1536",
        ),
        (
            ParallelLayout(world_size=7, ep=7, expert_table_sharding="auto"),
            {},
            "ep",
            "neither mode fits",
        ),
        (
            ParallelLayout(world_size=2, expert_table_sharding="columns"),
            {},
            "expert_table_sharding",
            "one of",
        ),
    ],
)
def test_bad_layouts_fail_with_one_line(layout, model, key, fragment) -> None:
    with pytest.raises(LayoutError) as info:
        validate_layout(layout, **{**MODEL, **model})
    message = str(info.value)
    assert info.value.key == key
    assert fragment in message and key in message
    assert "\n" not in message and message.startswith("invalid parallel layout: ")


def test_ep_may_span_tensor_parallel_ranks_like_megatron() -> None:
    # megatron with expert_tensor_parallel_size=1 needs world % (ep*pp) == 0, i.e. ep | tp*dp:
    # here dp = 2 but ep = 4 is fine because the EP group covers 2 DP x 2 TP ranks.
    layout = ParallelLayout(world_size=8, tp=2, pp=2, ep=4, sequence_parallel=True)
    validate_layout(layout, **MODEL)
    assert layout.dp == 2 and layout.expert_dp == 1


def test_auto_allows_modes_by_divisibility() -> None:
    layout = ParallelLayout(world_size=6, ep=3)
    assert sharding_modes_allowed(layout, num_experts=102_400, hidden_size=1536) == ("dim",)
    layout = ParallelLayout(world_size=8, ep=8)
    assert sharding_modes_allowed(layout, num_experts=102_400, hidden_size=1536) == ("rows", "dim")
