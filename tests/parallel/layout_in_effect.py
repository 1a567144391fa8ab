"""What a layout-equivalence check must see before it compares: the layout it names, in effect.

A layout that quietly ran as another (``tp2_sp`` without sequence parallelism, ``ep2_dim``
with rows tables, ``dp2_distopt`` with a plain optimizer) still equals the single process, so
the equivalence checks alone cannot tell. The expectations are written here per layout name,
not read from the config: a config group that lost a key must fail too.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from omnimoe_train.checkpoint.optimizer_state import chained
from omnimoe_train.model.omnimoe_layer import OmniMoEMLP
from omnimoe_train.model.router import GateNorm

# name: (tp, pp, model chunks, ep, sequence parallel, expert tables, distributed optimizer);
# data parallel takes the rest of the world ("single" on 2 ranks is plain DP).
EXPECTED: dict[str, tuple[int, int, int, int, bool, str, bool]] = {
    "single": (1, 1, 1, 1, False, "none", False),
    "tp2": (2, 1, 1, 1, False, "none", False),
    "tp2_sp": (2, 1, 1, 1, True, "none", False),
    "pp2": (1, 2, 1, 1, False, "none", False),
    "pp2_vpp2": (1, 2, 2, 1, False, "none", False),
    "dp2_distopt": (1, 1, 1, 1, False, "none", True),
    "ep2_rows": (1, 1, 1, 2, False, "rows", False),
    "ep2_dim": (1, 1, 1, 2, False, "dim", False),
    "tp2_sp_ep2": (2, 1, 1, 2, True, "dim", False),
    "tp2_ep2": (2, 1, 1, 2, True, "rows", False),
    "pp2_dp2": (1, 2, 1, 1, False, "none", False),
    "mixed4": (1, 2, 1, 2, False, "dim", True),
}


def assert_layout_in_effect(
    layout: str,
    engine: Any,
    num_experts: int,
    hidden: int,
    expected: tuple[int, int, int, int, bool, str, bool] | None = None,
) -> None:
    """The engine runs ``layout``: group sizes, model chunks, sequence parallelism (megatron's
    config and the routers' statistics group), the expert tables' sharding mode and the shard
    shapes (``num_experts`` x ``hidden`` in full), and the optimizer class. ``expected`` (as
    in :data:`EXPECTED`) for a layout not named there."""
    tp, pp, chunks, ep, sp, tables, distopt = expected or EXPECTED[layout]
    dp = dist.get_world_size() // (tp * pp)
    ps = parallel_state
    sizes = (
        ps.get_tensor_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_world_size(),
        len(engine.model),
        ps.get_expert_model_parallel_world_size(),
        ps.get_data_parallel_world_size(),
    )
    assert sizes == (tp, pp, chunks, ep, dp), (layout, "tp pp chunks ep dp", sizes)
    assert engine.table_sharding == tables, (layout, engine.table_sharding)
    shard = {
        "none": (num_experts, hidden),
        "rows": (num_experts // ep, hidden),
        "dim": (num_experts, hidden // ep),
    }[tables]
    layers = 0
    for chunk in engine.model:
        assert chunk.module.config.sequence_parallel == sp, (layout, "sequence_parallel")
        for layer in (m for m in chunk.module.modules() if isinstance(m, OmniMoEMLP)):
            layers += 1
            assert layer.settings.table_sharding == tables, (layout, layer.settings)
            assert tuple(layer.up_ND.shape) == tuple(layer.down_ND.shape) == shard, (
                layout,
                tuple(layer.up_ND.shape),
                shard,
            )
            mode = None if layer.expert_parallel is None else layer.expert_parallel.mode
            assert mode == (None if tables == "none" else tables), (layout, mode)
            norms = [m for m in layer.router.modules() if isinstance(m, GateNorm)]
            assert norms and all((n.stats_group is not None) == sp for n in norms), layout
    assert layers > 0, f"{layout}: no OmniMoE layer on this rank"
    optimizers = chained(engine.optimizer)
    assert any(isinstance(o, DistributedOptimizer) for o in optimizers) == distopt, (
        layout,
        [type(o).__name__ for o in optimizers],
    )
    for chunk in engine.model:
        assert chunk.ddp_config.use_distributed_optimizer == distopt, layout
