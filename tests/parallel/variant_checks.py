"""Rank-side bodies of the variant layout tests: each baseline under TP and EP trains like one
process.

Per variant, a world-1 reference (``parallel=single``) records its initial weights and its loss
curve; then on every rank of a spawned world each layout builds the same variant through the real
engine, loads the reference weights into its local shards (TP slices, OmniMoE/PEER table shards,
and megatron's local experts: local expert i of EP rank r is global expert r * E/ep + i), trains
on the same global batches and compares its losses with the reference.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from megatron.core import parallel_state

from omnimoe_train.distributed import init_runtime
from omnimoe_train.engine.megatron import MegatronEngine
from tests.parallel.layout_checks import (
    VOCAB,
    _close,
    _full_name,
    _local_slice,
    _train,
    fit_overrides,
    fit_with_metrics,
    layout_config,
)

STEPS = 4
RTOL = 1e-6  # measured: 0 to 4e-8 (experts placed on the wrong EP rank: 1.1e-4)
VARIANT_MODEL = (
    "model.pkm_heads=2",
    "model.pkm_key_dim=16",
    "model.peer_heads=2",
    "model.peer_key_dim=16",
    "model.moe_num_experts=4",
    "model.moe_top_k=2",
    "model.moe_ffn_hidden_size=32",
    "model.moe_shared_ffn_hidden_size=32",
)
# OmniMoE itself is covered layout by layout in test_layouts_equivalence. Megatron's MoE layer
# needs sequence parallelism with TP; PKM and PEER use it too, to exercise their SP handling.
LAYOUTS = {
    "dense": ("tp2", "ep2_rows"),
    "gshard": ("tp2_sp", "ep2_rows"),
    "deepseekmoe": ("tp2_sp", "ep2_rows"),
    "pkm": ("tp2_sp", "ep2_rows"),
    "peer": ("tp2_sp", "ep2_rows"),
}
_LOCAL_EXPERT = re.compile(r"\.experts\.local_experts\.(\d+)\.")


def variant_config(mlp: str, layout: str, *extra: str) -> Any:
    overrides = [*VARIANT_MODEL, f"model.mlp={mlp}", *extra]
    if mlp == "gshard":
        overrides.remove("model.moe_shared_ffn_hidden_size=32")
    return layout_config(layout, *overrides)


def make_references(out_dir: Path) -> None:
    """World 1: initial weights and the loss curve of every variant."""
    for mlp in LAYOUTS:
        cfg = variant_config(mlp, "single")
        rt = init_runtime(cfg)
        engine = MegatronEngine(cfg, rt, VOCAB)
        model = engine.model[0].module
        init = {n: p.detach().clone() for n, p in model.named_parameters()}
        losses = _train(engine, cfg, STEPS)
        torch.save({"init": init, "losses": losses}, out_dir / f"{mlp}.pt")
        parallel_state.destroy_model_parallel()


def _global_name(name: str, model: torch.nn.Module, tied: bool, num_experts: int) -> str:
    name = _full_name(name, model, tied)
    match = _LOCAL_EXPERT.search(name)
    if match is None:
        return name
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    local = num_experts // parallel_state.get_expert_model_parallel_world_size()
    index = ep_rank * local + int(match.group(1))
    return name[: match.start()] + f".experts.local_experts.{index}." + name[match.end() :]


def _local_value(full: torch.Tensor, param: torch.Tensor, table_sharding: str) -> torch.Tensor:
    if full.shape == param.shape:  # replicated, or a whole megatron expert on this rank
        return full
    return _local_slice(full, param, table_sharding)


def check_variants(ref_dir: Path, mlps: list[str]) -> None:
    """On every rank: each variant under each of its layouts follows the reference losses."""
    for mlp in mlps:
        ref = torch.load(ref_dir / f"{mlp}.pt", weights_only=False)
        for layout in LAYOUTS[mlp]:
            cfg = variant_config(mlp, layout)
            rt = init_runtime(cfg)
            engine = MegatronEngine(cfg, rt, VOCAB)
            for chunk in engine.model:
                model = chunk.module
                for name, param in model.named_parameters():
                    full_name = _global_name(
                        name, model, cfg.model.tie_embeddings, cfg.model.moe_num_experts
                    )
                    value = _local_value(ref["init"][full_name], param, engine.table_sharding)
                    with torch.no_grad():
                        param.copy_(value)
            losses = _train(engine, cfg, STEPS)
            for step, (got, want) in enumerate(zip(losses, ref["losses"], strict=True)):
                _close(
                    f"{mlp} {layout} loss at step {step + 1}",
                    torch.tensor(got),
                    torch.tensor(want),
                    RTOL,
                )
            parallel_state.destroy_model_parallel()


def fit_gshard_and_log(data_dir: Path, run_dir: Path) -> None:
    """The real ``Trainer.fit`` of GShard with expert parallelism: metrics.jsonl gets the MoE
    metrics (aux loss from megatron's tracker, routing statistics) and tflops."""
    fit_with_metrics(variant_config("gshard", "ep2_rows", *fit_overrides(data_dir)), run_dir)
