"""Rank-side bodies of the layout-equivalence tests: a parallel run equals one process.

The reference is one process (world 1, ``parallel=single``) training the tiny model below on
fixed global batches; it saves its initial weights, step-1 loss, step-1 gradients (after megatron's
grad sync) and grad norm, and its 5-step loss curve. Each parallel layout then, on every rank:
builds the model through the real trainer path (``MegatronEngine``: layout applied, megatron DDP,
optimizer, pipeline schedule), loads the reference weights into its local shards, feeds each
data-parallel rank its micro-batches of the same global batches, and checks its loss, the grads
of every local shard against the matching slice of the reference grads (so all ranks together
cover the gathered gradient), the grad norm, and the 5-step losses. Every layout, pipeline
stages included, also checks that its own seeded initialisation already equals the reference
slices bit for bit (``model.init``).

Also the metrics runs (``fit_with_metrics``; ``two_rank_fit_records`` is their test-process side)
shared with ``variant_checks``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from omnimoe_train.distributed import init_runtime
from omnimoe_train.engine.megatron import MegatronEngine
from omnimoe_train.parallel.setup import dispatch_layers
from tests.parallel.layout_in_effect import assert_layout_in_effect
from tests.train.conftest import compose_config

RTOL_STEP = 1e-5  # loss, grads, grad norm of step 1: relative to the largest reference entry
RTOL_CURVE = 1e-4  # the 5-step loss curve
STEPS = 5
VOCAB = 256  # a multiple of 128 * tp: the padded vocabulary is the same for every layout
MODEL = (
    "model.num_layers=4",
    "model.hidden_size=32",
    "model.num_attention_heads=4",
    "model.ffn_hidden_size=64",
    "model.num_experts=64",
    "model.top_k=4",
    f"model.vocab_size={VOCAB}",
    "data.seq_len=16",
    "data.micro_batch_size=2",
    "data.global_batch_size=4",
    "trainer.precision=fp32",
    "trainer.max_steps=10",
    "optim.warmup_steps=1",
    "optim.lr=0.01",
    "checkpoint.save_final=false",
)


def layout_config(layout: str, *extra: str, device: str = "cpu") -> Any:
    return compose_config(*MODEL, f"trainer.device={device}", f"parallel={layout}", *extra)


def global_batch(step: int, cfg: Any) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randint(
        0, VOCAB, (cfg.data.global_batch_size, cfg.data.seq_len + 1), generator=gen
    )


def rank_microbatches(step: int, cfg: Any, dp_rank: int, dp_size: int) -> list[torch.Tensor]:
    """The data contract: DP rank r takes the contiguous r-th slice of the global batch, cut
    into micro-batches, so it runs global micro-batches r*m .. r*m+m-1 (one process runs all,
    in order)."""
    m = cfg.data.micro_batch_size
    batch = global_batch(step, cfg)
    share = batch.shape[0] // dp_size
    mine = batch[dp_rank * share : (dp_rank + 1) * share]
    return list(mine.split(m))


def _local_params(engine: MegatronEngine) -> list[tuple[str, torch.nn.Parameter, torch.nn.Module]]:
    return [
        (n, p, chunk.module) for chunk in engine.model for n, p in chunk.module.named_parameters()
    ]


def _full_name(name: str, model: torch.nn.Module, tied: bool) -> str:
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:  # local layer index -> global (pipeline stages)
        parts[2] = str(model.decoder.layers[int(parts[2])].layer_number - 1)
    if tied and name == "output_layer.weight":  # the last stage's copy of the tied embedding
        return "embedding.word_embeddings.weight"
    return ".".join(parts)


def _local_slice(full: torch.Tensor, param: torch.Tensor, table_sharding: str) -> torch.Tensor:
    """The part of a full (single-process) tensor this rank's parameter holds."""
    if getattr(param, "tensor_model_parallel", False):
        tp, rank = (
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_rank(),
        )
        dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
        chunks = full.split(full.shape[dim] // (tp * stride), dim)  # megatron's CPU-init split
        return torch.cat(chunks[rank::tp], dim)
    if not getattr(param, "allreduce", True):  # an expert-table shard
        ep, rank = (
            parallel_state.get_expert_model_parallel_world_size(),
            parallel_state.get_expert_model_parallel_rank(),
        )
        if table_sharding == "rows":
            return full.chunk(ep, 0)[rank]
        return full.chunk(ep, 1)[rank]
    return full


def _gather_distributed_grads(engine: MegatronEngine) -> None:
    """The distributed optimizer reduce-scatters grads: all-gather each bucket's shards back."""
    for chunk in engine.model:
        for buffers, group in (
            (chunk.buffers, parallel_state.get_data_parallel_group()),
            (chunk.expert_parallel_buffers, parallel_state.get_expert_data_parallel_group()),
        ):
            size, rank = dist.get_world_size(group), dist.get_rank(group)
            for buffer in buffers:
                for bucket in buffer.buckets:
                    shards = list(bucket.grad_data.chunk(size))
                    mine = shards[rank].clone()
                    dist.all_gather(
                        shards_out := [torch.empty_like(mine) for _ in shards], mine, group=group
                    )
                    for dst, src in zip(shards, shards_out, strict=True):
                        dst.copy_(src)


def _close(name: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    assert actual.shape == expected.shape, (
        f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    scale = expected.abs().max().clamp_min(1e-12)
    error = ((actual.double() - expected.double()).abs().max() / scale).item()
    assert error <= rtol, (
        f"{name}: error {error:.3g} x largest entry > {rtol} (rank {dist.get_rank()})"
    )


def _train(engine: MegatronEngine, cfg: Any, steps: int, after_first: Any = None) -> list[float]:
    rt = engine.rt
    losses = []
    for step in range(steps):
        batches = rank_microbatches(step, cfg, rt.dp_rank, rt.dp_size)
        total = engine.forward_backward_step(iter(batches))
        losses.append(engine.mean_loss(total))
        if step == 0 and after_first is not None:
            after_first()
        grad_norm = engine.optimizer_step()
        if step == 0:
            engine.first_grad_norm = grad_norm
    return losses


def make_reference(path: Path, device: str = "cpu") -> None:
    """World 1: the single-process run every layout is compared with (tensors saved on CPU)."""
    cfg = layout_config("single", device=device)
    rt = init_runtime(cfg)
    engine = MegatronEngine(cfg, rt, VOCAB)
    model = engine.model[0].module
    init = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    grads: dict[str, torch.Tensor] = {}

    def keep_grads() -> None:
        grads.update({n: p.main_grad.detach().cpu().clone() for n, p in model.named_parameters()})

    losses = _train(engine, cfg, STEPS, keep_grads)
    torch.save(
        {"init": init, "grads": grads, "losses": losses, "grad_norm": engine.first_grad_norm}, path
    )
    parallel_state.destroy_model_parallel()


def _check_grads(
    layout: str, cfg: Any, engine: MegatronEngine, params: list, ref_grads: dict, rtol: float
) -> None:
    """Every local shard's reduced grad equals its slice of the single-process grad."""
    if cfg.parallel.distributed_optimizer:
        _gather_distributed_grads(engine)
    for name, param, model in params:
        full = _full_name(name, model, cfg.model.tie_embeddings)
        expected = _local_slice(ref_grads[full], param, engine.table_sharding)
        _close(f"{layout} grad {name}", param.main_grad, expected, rtol)


def check_layouts(
    ref_path: Path,
    layouts: list[str],
    device: str = "cpu",
    rtol_step: float = RTOL_STEP,
    rtol_curve: float = RTOL_CURVE,
) -> None:
    """On every rank of the spawned world: each layout in turn equals the reference."""
    ref = torch.load(ref_path, weights_only=False, map_location="cpu")
    for layout in layouts:
        cfg = layout_config(layout, device=device)
        rt = init_runtime(cfg)
        engine = MegatronEngine(cfg, rt, VOCAB)
        assert_layout_in_effect(layout, engine, cfg.model.num_experts, cfg.model.hidden_size)
        tied = cfg.model.tie_embeddings
        params = _local_params(engine)
        for name, param, model in params:
            full = _full_name(name, model, tied)
            expected = _local_slice(ref["init"][full], param, engine.table_sharding)
            # Same seed: every shard is a slice of the one-process init, whatever the layout.
            _close(f"{layout} init {name}", param.detach(), expected, 0.0)
            with torch.no_grad():
                param.copy_(expected.to(param.device))

        check = partial(_check_grads, layout, cfg, engine, params, ref["grads"], rtol_step)
        losses = _train(engine, cfg, STEPS, check)
        _close(
            f"{layout} step-1 loss",
            torch.tensor(losses[:1]),
            torch.tensor(ref["losses"][:1]),
            rtol_step,
        )
        _close(
            f"{layout} grad norm",
            torch.tensor(engine.first_grad_norm),
            torch.tensor(ref["grad_norm"]),
            rtol_step,
        )
        for step, (got, want) in enumerate(zip(losses, ref["losses"], strict=True)):
            _close(
                f"{layout} loss at step {step + 1}",
                torch.tensor(got),
                torch.tensor(want),
                rtol_curve,
            )
        if cfg.parallel.ep > 1:
            metrics = engine.dispatch_metrics(STEPS)
            assert (
                metrics["dispatch_fwd_bytes_per_layer"] > 0
                and metrics["dispatch_bwd_bytes_per_layer"] > 0
            )
            assert 1.0 <= metrics["dispatch_dest_ranks"] <= cfg.parallel.ep
        parallel_state.destroy_model_parallel()


def fit_overrides(data_dir: Path) -> tuple[str, ...]:
    """A 4-step ``Trainer.fit`` on the synthetic dataset in ``data_dir``, logging at steps 2
    and 4 and evaluating once."""
    return (
        f"data.dir={data_dir}",
        "model.vocab_size=2048",  # the synthetic dataset's token ids grow with the sample index
        "trainer.max_steps=4",
        "trainer.log_interval=2",
        "trainer.eval_interval=4",
        "trainer.eval_iters=1",
        "trainer.progress=false",
        "logging.wandb.mode=disabled",
    )


def fit_with_metrics(cfg: Any, run_dir: Path) -> None:
    """The real ``Trainer.fit`` of ``cfg`` on this rank, writing ``run_dir/metrics.jsonl``."""
    from omnimoe_train.metrics import MetricsSink
    from omnimoe_train.trainer import Trainer

    run_dir.mkdir(parents=True, exist_ok=True)
    rt = init_runtime(cfg)
    trainer = Trainer(cfg, rt, run_dir)
    sink = MetricsSink(
        run_dir,
        cfg.logging.wandb,
        {},
        enabled=rt.is_main,
        max_steps=cfg.trainer.max_steps,
        progress=False,
    )
    try:
        trainer.fit(sink)
    finally:
        sink.close()
    parallel_state.destroy_model_parallel()


def two_rank_fit_records(fit: Callable[[Path, Path], None], tmp_path: Path) -> list[dict]:
    """Test-process side: run ``fit(data_dir, run_dir)`` on 2 spawned ranks over a synthetic
    dataset (two 64-sample splits of 17 tokens) and return the training records of its
    metrics.jsonl."""
    from tests.data.helpers import make_token_dataset
    from tests.parallel.distributed import run_distributed

    data_dir = make_token_dataset(tmp_path / "data", [64, 64], sample_len=17)
    # A complete dataset names its tokenizer; the model's vocab_size is set, so it is never read.
    manifest = json.loads((data_dir / "manifest.json").read_text())
    (data_dir / "tokenizer.json").write_text("{}")
    # Its token ids are below 2048 (the model's vocab_size): the manifest says so.
    manifest.update(tokenizer="tokenizer.json", vocab_size=2048)
    (data_dir / "manifest.json").write_text(json.dumps(manifest))
    run_distributed(fit, 2, data_dir, tmp_path / "run", timeout_s=300)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def fit_and_log(data_dir: Path, run_dir: Path) -> None:
    """The real ``Trainer.fit`` on ep2_rows: metrics.jsonl gets the dispatch bytes per layer."""
    fit_with_metrics(layout_config("ep2_rows", *fit_overrides(data_dir)), run_dir)


def check_distopt_bitwise(steps: int, device: str = "cpu") -> None:
    """Without gradient clipping the distributed optimizer is plain data parallel to the bit.

    With clipping the two differ in the last bit of the grad norm (the distributed optimizer sums
    squared norms per shard, then over ranks: another order), so the clip factor does, and the
    top-K routing amplifies that over steps (a near-tie flips an expert choice)."""
    runs = {}
    for layout in ("single", "dp2_distopt"):
        cfg = layout_config(layout, "optim.clip_grad=0.0", device=device)
        rt = init_runtime(cfg)
        engine = MegatronEngine(cfg, rt, VOCAB)
        # Else a plain-DP run would be compared with the single process (and pass).
        assert_layout_in_effect(layout, engine, cfg.model.num_experts, cfg.model.hidden_size)
        losses = _train(engine, cfg, steps)
        params = {n: p.detach().cpu().clone() for n, p, _ in _local_params(engine)}
        runs[layout] = (losses, params)
        parallel_state.destroy_model_parallel()
    (plain_losses, plain), (dist_losses, sharded) = runs["single"], runs["dp2_distopt"]
    assert plain_losses == dist_losses, (plain_losses, dist_losses)
    for name, value in plain.items():
        assert torch.equal(value, sharded[name]), name


def check_ep_overlap_bitwise(layouts: list[str], steps: int, device: str = "cpu") -> None:
    """``parallel.ep_overlap`` moves only when the host waits for an exchange: with it on and
    off, the same layout gives the same step-1 gradients, losses and weights, bit for bit."""
    for layout in layouts:
        runs = {}
        for overlap in (False, True):
            cfg = layout_config(
                layout, f"parallel.ep_overlap={str(overlap).lower()}", device=device
            )
            rt = init_runtime(cfg)
            engine = MegatronEngine(cfg, rt, VOCAB)
            dispatches = [d for chunk in engine.model for d in dispatch_layers(chunk)]
            assert dispatches and all(d.overlap == overlap for d in dispatches), layout
            params = _local_params(engine)
            grads: dict[str, torch.Tensor] = {}

            def keep_grads(params: list = params, grads: dict = grads) -> None:
                grads.update({n: p.main_grad.detach().cpu().clone() for n, p, _ in params})

            losses = _train(engine, cfg, steps, keep_grads)
            metrics = engine.dispatch_metrics(steps)
            weights = {n: p.detach().cpu().clone() for n, p, _ in params}
            runs[overlap] = (losses, grads, weights, metrics)
            parallel_state.destroy_model_parallel()
        (off_losses, off_grads, off_weights, off_m), (on_losses, on_grads, on_weights, on_m) = (
            runs[False],
            runs[True],
        )
        assert on_losses == off_losses, (layout, on_losses, off_losses)
        for name, value in off_grads.items():
            assert torch.equal(value, on_grads[name]), f"{layout} step-1 grad {name}"
        for name, value in off_weights.items():
            assert torch.equal(value, on_weights[name]), f"{layout} weight {name}"
        for key in ("dispatch_fwd_bytes_per_layer", "dispatch_bwd_bytes_per_layer"):
            assert on_m[key] == off_m[key] > 0, (layout, key, on_m[key], off_m[key])
