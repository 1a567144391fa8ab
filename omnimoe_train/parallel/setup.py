"""Apply the parallel layout to a built model, separately from the model code.

``model.py`` builds the same module tree for every layout (megatron's TP layers split themselves
from the process groups). What megatron does not know about -- the OmniMoE router and expert
tables -- is wired here, before the model is wrapped in megatron's DDP:

* ep > 1: each layer was built holding only its shard of U and V (``rows``: expert ids
  r*N/P..(r+1)*N/P; ``dim``: columns r*D/P..(r+1)*D/P), drawn as the slice of the full tables a
  single process draws (``model.init``). The shards are marked ``allreduce = False``: megatron's
  DDP then reduces them over the expert-data-parallel group only and its optimizer counts each
  shard once in the grad norm.
* sequence parallel: every TP rank routes different tokens, so the router gates (and the tables
  when ep = 1) are marked ``sequence_parallel = True`` -- megatron's ``finalize_model_grads``
  all-reduces those grads over TP -- and the router's BatchNorm statistics are summed over the TP
  group, so they cover the same tokens as one process running the whole micro-batch.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from torch import nn

from omnimoe_train.config import RootConfig
from omnimoe_train.model.omnimoe_layer import OmniMoEMLP
from omnimoe_train.model.router import GateNorm
from omnimoe_train.parallel.cost_model import choose_sharding, describe_choice, predict_bytes
from omnimoe_train.parallel.expert_parallel import ExpertParallel
from omnimoe_train.parallel.layout import sharding_modes_allowed
from omnimoe_train.validation import ATOMIC_EXPERT_MLPS, MEGATRON_MOE_MLPS, layout_from_config


def tokens_per_rank(cfg: RootConfig) -> int:
    """Tokens one rank routes per micro-batch (sequence parallel splits the sequence over TP)."""
    p, d = cfg.parallel, cfg.data
    tokens = d.micro_batch_size * d.seq_len
    return tokens // p.tp if p.sequence_parallel else tokens


def resolve_table_sharding(cfg: RootConfig, *, world_size: int, bf16: bool) -> tuple[str, str]:
    """(mode, one log line with the predicted bytes). mode is ``none`` when ep = 1."""
    p, m = cfg.parallel, cfg.model
    if p.ep == 1:
        return "none", "expert tables replicated (parallel.ep=1)"
    if m.mlp in MEGATRON_MOE_MLPS:
        return "none", f"model.mlp={m.mlp}: megatron-core's experts over parallel.ep={p.ep} ranks"
    if m.mlp not in ATOMIC_EXPERT_MLPS:  # PEER's experts are atomic experts too
        return "none", (
            f"model.mlp={m.mlp} has no expert tables: parallel.ep={p.ep} runs its layers data "
            "parallel"
        )
    layout = layout_from_config(cfg, world_size)
    allowed = sharding_modes_allowed(layout, num_experts=m.num_experts, hidden_size=m.hidden_size)
    shape = dict(
        tokens=tokens_per_rank(cfg),
        d=m.hidden_size,
        k=m.top_k,
        num_experts=m.num_experts,
        ranks=p.ep,
        dtype_bytes=2 if bf16 else 4,
    )
    overlap = "on" if ep_overlap_enabled(p.ep_overlap, cfg.trainer.cuda_graphs) else "off"
    if p.expert_table_sharding == "auto":
        choice, predicted = choose_sharding(**shape, allowed=allowed)
        return choice, describe_choice(choice, predicted) + f", ep={p.ep}, overlap {overlap}"
    mode = p.expert_table_sharding
    predicted = predict_bytes(mode, **shape)
    return mode, (
        f"expert_table_sharding={mode}, ep={p.ep}, overlap {overlap} (predicted per layer per "
        f"rank per micro-batch: fwd {predicted['forward'] / 1e6:.2f} MB + bwd "
        f"{predicted['backward'] / 1e6:.2f} MB)"
    )


def shard_expert_tables(layer: OmniMoEMLP, mode: str, *, overlap: bool = True) -> None:
    """Mark the layer's U, V shards as expert parameters and route through the dispatch
    (``overlap``: its exchanges overlapped with the router and the shared branch)."""
    if layer.settings.table_sharding != mode:
        raise ValueError(
            f"layer built with table_sharding={layer.settings.table_sharding!r}, layout says {mode!r}"
        )
    group = parallel_state.get_expert_model_parallel_group()
    for table in (layer.up_ND, layer.down_ND):
        # megatron's expert parameters: reduced over the expert-data-parallel group by DDP.
        table.allreduce = False
    layer.expert_parallel = ExpertParallel(
        mode,
        group,
        num_experts=layer.settings.num_experts,
        backend=layer.settings.backend,
        overlap=overlap,
    )


def mark_sequence_parallel(layer: OmniMoEMLP, *, tables_replicated: bool) -> None:
    """Grads of parameters that see only this TP rank's tokens must be summed over TP."""
    params: list[torch.Tensor] = list(layer.router.parameters())
    if tables_replicated:
        params += [layer.up_ND, layer.down_ND]
    for param in params:
        param.sequence_parallel = True
    tp_group = parallel_state.get_tensor_model_parallel_group()
    for module in layer.router.modules():
        if isinstance(module, GateNorm):
            module.stats_group = tp_group


def ep_overlap_enabled(ep_overlap: bool | None, cuda_graphs: str) -> bool:
    """``parallel.ep_overlap``: as set, or (null) on exactly when the MLPs are replayed from CUDA
    graphs. Why: graphed, the overlapped exchanges run beside the router and the shared SwiGLU
    (measured: a rows layer step 5.34 -> 4.94 ms, dim 5.05 -> 4.87 ms, 2 H200s); eager, the
    layer is host bound and the extra collective launch did not pay (docs/parallelism.md)."""
    return ep_overlap if ep_overlap is not None else cuda_graphs != "none"


def apply_parallelism(model: nn.Module, cfg: RootConfig, table_sharding: str) -> None:
    """Wire the OmniMoE layers of one model chunk for the layout; call before wrapping in DDP."""
    sequence_parallel = cfg.parallel.sequence_parallel and cfg.parallel.tp > 1
    overlap = ep_overlap_enabled(cfg.parallel.ep_overlap, cfg.trainer.cuda_graphs)
    for layer in [m for m in model.modules() if isinstance(m, OmniMoEMLP)]:
        if table_sharding != "none":
            shard_expert_tables(layer, table_sharding, overlap=overlap)
        if sequence_parallel:
            mark_sequence_parallel(layer, tables_replicated=table_sharding == "none")


def dispatch_layers(model: nn.Module) -> list[ExpertParallel]:
    return [
        m.expert_parallel
        for m in model.modules()
        if isinstance(m, OmniMoEMLP) and m.expert_parallel is not None
    ]
