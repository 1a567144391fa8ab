"""Rank-side bodies of the router-statistics test: BatchNorm running statistics after training
are identical on every replica and equal to one process's (megatron's DDP syncs parameters, not
buffers; ``model.router.apply_running_stats`` combines the step's records over the DP group).

The reference is one process (world 1) training on fixed global batches of 4 micro-batches;
each layout starts from its weights, trains the same steps with each data-parallel rank taking
its contiguous slice of every global batch (the data contract), and compares every local
GateNorm's running mean and variance with the reference's (layers mapped to their global index
under pipeline stages), and with its data-parallel peers' (bitwise).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from omnimoe_train.distributed import init_runtime
from omnimoe_train.engine.megatron import MegatronEngine

from .layout_checks import VOCAB, _close, _full_name, _local_params, _local_slice, _train
from .layout_checks import layout_config as _layout_config

STEPS = 3
RTOL = 1e-6
# 4 micro-batches per global batch: at dp=2 each rank runs 2, so the order of the EMA updates
# over ranks matters (swapping two updates changes the result by momentum^2 times the difference
# of their batch statistics, far above the tolerance).
OVERRIDES = ("data.global_batch_size=8",)


def layout_config(layout: str) -> Any:
    return _layout_config(layout, *OVERRIDES)


def _running_stats(engine: MegatronEngine, tied: bool) -> dict[str, torch.Tensor]:
    return {
        _full_name(name, chunk.module, tied): buf.detach().clone()
        for chunk in engine.model
        for name, buf in chunk.module.named_buffers()
        if name.endswith(("running_mean", "running_var"))
    }


def make_stats_reference(path: Path) -> None:
    """World 1: initial weights and the running statistics after STEPS steps."""
    cfg = layout_config("single")
    rt = init_runtime(cfg)
    engine = MegatronEngine(cfg, rt, VOCAB)
    init = {n: p.detach().clone() for n, p in engine.model[0].module.named_parameters()}
    _train(engine, cfg, STEPS)
    stats = _running_stats(engine, cfg.model.tie_embeddings)
    assert stats and all(not torch.equal(v, torch.zeros_like(v)) for k, v in stats.items() if
                         k.endswith("running_mean"))  # fmt: skip
    torch.save({"init": init, "stats": stats}, path)
    parallel_state.destroy_model_parallel()


def check_stats(ref_path: Path, layouts: list[str]) -> None:
    ref = torch.load(ref_path, weights_only=False)
    for layout in layouts:
        cfg = layout_config(layout)
        rt = init_runtime(cfg)
        assert rt.dp_size > 1, layout
        engine = MegatronEngine(cfg, rt, VOCAB)
        for name, param, model in _local_params(engine):
            full = _full_name(name, model, cfg.model.tie_embeddings)
            with torch.no_grad():
                param.copy_(_local_slice(ref["init"][full], param, engine.table_sharding))
        _train(engine, cfg, STEPS)
        stats = _running_stats(engine, cfg.model.tie_embeddings)
        assert stats, layout
        group = parallel_state.get_data_parallel_group()
        for name, value in stats.items():
            _close(f"{layout} {name}", value, ref["stats"][name], RTOL)
            peers = [torch.empty_like(value) for _ in range(dist.get_world_size(group))]
            dist.all_gather(peers, value, group=group)
            assert all(torch.equal(peer, value) for peer in peers), f"{layout} {name} differs"
        parallel_state.destroy_model_parallel()
