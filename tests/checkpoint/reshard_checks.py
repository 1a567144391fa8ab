"""Rank-side bodies of the resharding tests: a checkpoint written under one layout continues,
under another, exactly where the original layout would have continued.

Every run trains the tiny model below on fixed global batches (``layout_checks.global_batch``:
the same tokens whatever the data-parallel split). The saving layout trains ``SAVE_AT`` steps,
saves through the real ``CheckpointManager`` + ``MegatronEngine.save_checkpoint``, and records
the losses of the next ``AFTER`` steps. A loading layout builds its engine, loads, and must give
the same next-step loss (weights resharded) within 1e-6 relative, and the same loss after one
more update (Adam moments, step count and LR schedule resharded too).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from megatron.core import parallel_state
from omegaconf import OmegaConf

from omnimoe_train.checkpoint.manager import CheckpointManager
from omnimoe_train.distributed import init_runtime
from omnimoe_train.engine.megatron import MegatronEngine
from tests.parallel.layout_checks import rank_microbatches
from tests.parallel.layout_in_effect import EXPECTED, assert_layout_in_effect
from tests.train.conftest import compose_config

SAVE_AT = 2
AFTER = 2
VOCAB = 256
RTOL_NEXT = 1e-6  # the first step after the load: same weights, other reduction order
RTOL_UPDATE = 1e-5  # one Adam update later
MODEL = (
    "model.num_layers=2",
    "model.hidden_size=32",
    "model.num_attention_heads=4",
    "model.ffn_hidden_size=64",
    "model.num_experts=64",
    "model.top_k=4",
    f"model.vocab_size={VOCAB}",
    "data.seq_len=16",
    "data.micro_batch_size=2",
    "data.global_batch_size=8",
    "trainer.device=cpu",
    "trainer.max_steps=10",
    "optim.warmup_steps=1",
    "optim.lr=0.01",
)
# Layouts by name: the conf/parallel files, 4-way EP with dim-sharded tables, and bf16 runs (the
# GPU default: bf16 weights with an fp32 router, i.e. mixed-dtype optimizer groups).
EXTRA = {
    "ep4_dim": ("parallel=single", "parallel.ep=4", "parallel.expert_table_sharding=dim"),
    "single_bf16": ("parallel=single", "trainer.precision=bf16"),
    "dp2_distopt_bf16": ("parallel=dp2_distopt", "trainer.precision=bf16"),
}
RTOL_BF16 = 2e-2  # another layout in bf16: other reduction orders in bf16 arithmetic
# The layouts of EXTRA in effect (as ``layout_in_effect.EXPECTED``): a load that quietly kept
# the saving layout (rows tables for ep4_dim) would not reshard at all, and still pass.
EXTRA_EXPECTED = {
    "ep4_dim": (1, 1, 1, 4, False, "dim", False),
    "single_bf16": EXPECTED["single"],
    "dp2_distopt_bf16": EXPECTED["dp2_distopt"],
}


def layout_config(layout: str) -> Any:
    overrides = EXTRA.get(layout, (f"parallel={layout}",))
    return compose_config(*MODEL, *overrides)


def _steps(engine: MegatronEngine, cfg: Any, first: int, count: int) -> list[float]:
    rt = engine.rt
    losses = []
    for step in range(first, first + count):
        batches = rank_microbatches(step, cfg, rt.dp_rank, rt.dp_size)
        losses.append(engine.mean_loss(engine.forward_backward_step(iter(batches))))
        engine.optimizer_step()
    return losses


def _engine(layout: str) -> tuple[MegatronEngine, Any]:
    cfg = layout_config(layout)
    engine = MegatronEngine(cfg, init_runtime(cfg), VOCAB)
    m = cfg.model
    assert_layout_in_effect(
        layout, engine, m.num_experts, m.hidden_size, EXTRA_EXPECTED.get(layout)
    )
    return engine, cfg


def save_and_continue(layout: str, root: Path, async_save: bool = False) -> None:
    """Train SAVE_AT steps under ``layout``, checkpoint, record the next AFTER losses.

    With ``async_save`` those steps run while the checkpoint is being written: the loading
    side then checks that the write kept the state of step SAVE_AT.
    """
    engine, cfg = _engine(layout)
    _steps(engine, cfg, 0, SAVE_AT)
    manager = CheckpointManager(root, cfg.checkpoint)
    config = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    manager.save(
        SAVE_AT,
        lambda d: engine.save_checkpoint(d, {"step": SAVE_AT}, async_save=async_save),
        {**engine.checkpoint_meta(), "config": config},
    )
    after = _steps(engine, cfg, SAVE_AT, AFTER)
    manager.wait()
    assert (root / f"step_{SAVE_AT:08d}" / "meta.json").is_file()
    if engine.rt.rank == 0:
        (root / "reference.json").write_text(json.dumps({"layout": layout, "losses": after}))
    parallel_state.destroy_model_parallel()


def _close(what: str, got: float, want: float, rtol: float) -> None:
    error = abs(got - want) / abs(want)
    assert error <= rtol, f"{what}: {got!r} vs {want!r} (relative error {error:.3g} > {rtol})"


def load_and_compare(layouts: list[str], root: Path) -> None:
    """Each layout in turn loads the newest checkpoint under ``root`` and continues."""
    reference = json.loads((root / "reference.json").read_text())
    for layout in layouts:
        engine, cfg = _engine(layout)
        path = CheckpointManager(root, cfg.checkpoint).resolve_resume()
        assert path is not None and path.name == f"step_{SAVE_AT:08d}"
        client = engine.load_checkpoint(path)
        assert client["step"] == SAVE_AT
        assert client["_rank_local_restored"] == (layout == reference["layout"])
        got = _steps(engine, cfg, SAVE_AT, AFTER)
        what = f"{reference['layout']} -> {layout}"
        if layout == reference["layout"]:  # the same layout resumes exactly, RNG included
            assert got == reference["losses"], f"{what}: {got} != {reference['losses']}"
        elif cfg.trainer.precision == "bf16":
            for i, (g, w) in enumerate(zip(got, reference["losses"], strict=True)):
                _close(f"{what}: loss {i + 1} after the load", g, w, RTOL_BF16)
        else:
            _close(f"{what}: next-step loss", got[0], reference["losses"][0], RTOL_NEXT)
            _close(
                f"{what}: loss after one more update", got[1], reference["losses"][1], RTOL_UPDATE
            )
        parallel_state.destroy_model_parallel()
        torch.distributed.barrier()


def stage(loads: list[tuple[list[str], Path]], save: tuple[Any, ...] | None = None) -> None:
    """One spawned world: an optional save (layout, root[, async]), then each (layouts, root)
    of ``loads`` in turn."""
    if save is not None:
        save_and_continue(*save)
    for layouts, root in loads:
        load_and_compare(layouts, root)
