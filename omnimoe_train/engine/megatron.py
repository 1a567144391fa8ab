"""The megatron-core engine: DDP-wrapped model chunks, megatron's optimizer (plain or
distributed), its WSD LR schedule and its pipeline schedules (no pipelining, 1F1B, interleaved).

The parallel layout (TP/SP/PP/VPP/DP/EP) comes from megatron's process groups, created by
``distributed.init_runtime``; the OmniMoE tables are wired by ``parallel.setup``.
"""

from __future__ import annotations

import itertools
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.pipeline_parallel import get_forward_backward_func

from omnimoe_train.checkpoint import sharded
from omnimoe_train.checkpoint.optimizer_state import chained
from omnimoe_train.config import RootConfig
from omnimoe_train.distributed import Runtime
from omnimoe_train.engine.optim import optimizer_config, wsd_scheduler
from omnimoe_train.model.cuda_graphs import graph_mlps, graph_safe_stream
from omnimoe_train.model.gpt import build_model, transformer_config
from omnimoe_train.model.router import GateNorm, GateNormSnapshot, apply_running_stats
from omnimoe_train.parallel.expert_parallel import dispatch_metrics
from omnimoe_train.parallel.setup import apply_parallelism, dispatch_layers, resolve_table_sharding

# Token id of a padding row: evaluation fills its last micro-batches with such rows so every
# rank and pipeline stage runs the same number of equal-shaped micro-batches; their positions
# count neither in the loss nor in the token count.
PAD_ID = -1


def _loss_func(
    mask_BS: torch.Tensor, output_tensor: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    # Megatron's 3-tuple contract: the schedule divides by the token count and microbatches.
    loss_sum = (output_tensor.float() * mask_BS).sum()
    num_tokens = mask_BS.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), num_tokens.float()])}


def _forward_step(data_iterator, model, *, device: torch.device):  # noqa: ANN001, ANN202
    batch_BL = next(data_iterator).to(device, non_blocking=True)
    mask_BS = batch_BL[:, 1:] != PAD_ID  # all true in training (no padding there)
    batch_BL = batch_BL.clamp_min(0)
    tokens_BS, labels_BS = batch_BL[:, :-1], batch_BL[:, 1:]
    position_ids_BS = torch.arange(tokens_BS.shape[1], device=device).expand_as(tokens_BS)
    losses_BS = model(tokens_BS, position_ids_BS, None, labels=labels_BS)
    return losses_BS, partial(_loss_func, mask_BS)


class MegatronEngine:
    """Model chunks (DDP-wrapped, parallel layout applied), optimizer, LR schedule, pipeline
    schedule: everything one optimizer step needs, fed by any iterator of micro-batches."""

    def __init__(self, cfg: RootConfig, runtime: Runtime, vocab_size: int) -> None:
        self.cfg, self.rt, self.vocab_size = cfg, runtime, vocab_size
        d = cfg.data
        self.num_microbatches = d.global_batch_size // (d.micro_batch_size * runtime.dp_size)
        self.table_sharding, self.sharding_note = resolve_table_sharding(
            cfg, world_size=runtime.world_size, bf16=runtime.bf16
        )
        self.tconfig = transformer_config(cfg, bf16=runtime.bf16)
        chunks = self._build_model_chunks()
        self.model = chunks
        optimizer = get_megatron_optimizer(
            optimizer_config(
                cfg.optim, bf16=runtime.bf16, distributed=cfg.parallel.distributed_optimizer
            ),
            chunks,
        )
        scheduler = wsd_scheduler(optimizer, cfg.optim, cfg.trainer.max_steps)
        # Megatron's schedule calls these hooks: grad sync, loss scaling, no-sync for accumulation.
        self.tconfig.finalize_model_grads_func = finalize_model_grads
        self.tconfig.grad_scale_func = optimizer.scale_loss
        self.tconfig.no_sync_func = (
            chunks[0].no_sync if len(chunks) == 1 else [c.no_sync for c in chunks]
        )
        self.optimizer, self.scheduler = optimizer, scheduler
        self.dispatches = [ep for c in chunks for ep in dispatch_layers(c)]
        # Router BatchNorm running statistics are recorded during a step and applied at its end
        # over the data-parallel group, in global micro-batch order (``apply_running_stats``).
        self.gate_norms = [m for c in chunks for m in c.modules() if isinstance(m, GateNorm)]
        for norm in self.gate_norms:
            norm.pending = []
        self.stats_snapshot = GateNormSnapshot(chunks)  # to undo a skipped step
        if cfg.trainer.cuda_graphs == "mlp":  # captured at the first training micro-batch
            for chunk in chunks:
                graph_mlps(chunk)
        self.forward_backward = get_forward_backward_func()

    # -- construction -------------------------------------------------------------------------
    def _build_model_chunks(self) -> list[DistributedDataParallel]:
        vpp = self.cfg.parallel.vpp or 1
        chunks = []
        for vp_stage in range(vpp):
            model = build_model(
                self.cfg,
                self.tconfig,
                vocab_size=self.vocab_size,
                pre_process=parallel_state.is_pipeline_first_stage(
                    ignore_virtual=False, vp_stage=vp_stage
                ),
                post_process=parallel_state.is_pipeline_last_stage(
                    ignore_virtual=False, vp_stage=vp_stage
                ),
                vp_stage=vp_stage if self.cfg.parallel.vpp else None,
                table_sharding=self.table_sharding,
            )
            apply_parallelism(model, self.cfg, self.table_sharding)  # before DDP reads the attrs
            model = model.to(self.rt.device)
            ddp_config = DistributedDataParallelConfig(
                grad_reduce_in_fp32=True,
                overlap_grad_reduce=False,
                use_distributed_optimizer=self.cfg.parallel.distributed_optimizer,
            )
            # With CUDA graphs the wrapper is built on a side stream: see graph_safe_stream.
            with graph_safe_stream(self.cfg.trainer.cuda_graphs != "none"):
                chunks.append(
                    DistributedDataParallel(
                        self.tconfig, ddp_config, model, disable_bucketing=vp_stage > 0
                    )
                )
        return chunks

    # -- steps --------------------------------------------------------------------------------
    def run_schedule(
        self, data_iterator, num_microbatches: int, forward_only: bool
    ) -> torch.Tensor:  # noqa: ANN001
        """Forward (+ backward and grad sync) of ``num_microbatches``; returns (loss sum, tokens)."""
        d = self.cfg.data
        if len(self.model) > 1:
            # Interleaved pipeline: every model chunk calls next() once per micro-batch, and the
            # chunk with the loss must see the micro-batch the embedding chunk saw: one iterator
            # per chunk over the same micro-batches (a shared one would hand them out in turn).
            batches = list(itertools.islice(data_iterator, num_microbatches))
            data_iterator = [iter(batches) for _ in self.model]
        losses = self.forward_backward(
            forward_step_func=partial(_forward_step, device=self.rt.device),
            data_iterator=data_iterator,
            model=self.model,
            num_microbatches=num_microbatches,
            seq_length=d.seq_len,
            micro_batch_size=d.micro_batch_size,
            forward_only=forward_only,
        )
        total = torch.zeros(2, dtype=torch.float64, device=self.rt.device)
        for entry in losses:  # only the last pipeline stage has entries
            total += entry["lm loss"].double()
        return total

    def forward_backward_step(self, data_iterator) -> torch.Tensor:  # noqa: ANN001
        """One step's gradients, reduced as the layout says (main_grad), before the update."""
        for chunk in self.model:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        # The step moves the router BatchNorm statistics; keep them to undo a skipped step
        # (a few n-vectors per layer, copied on the device).
        self.stats_snapshot.save()
        total = self.run_schedule(data_iterator, self.num_microbatches, forward_only=False)
        group = parallel_state.get_data_parallel_group() if dist.is_initialized() else None
        apply_running_stats(self.gate_norms, group)
        return total

    def skip_update(self) -> None:
        """Leave the model as before this step: the weights and the optimizer were not touched;
        the router BatchNorm statistics the step moved (possibly to NaN) are put back."""
        self.stats_snapshot.restore()

    def grad_norm(self) -> float:
        """Global norm of this step's reduced grads (megatron's own computation, one host sync);
        inf or NaN if any grad is non-finite."""
        if self.optimizer.prepare_grads():  # found inf/NaN while unscaling (fp16 loss scaling)
            return float("inf")
        return float(self.optimizer.get_grad_norm())

    def apply_update(self, grad_norm: float) -> None:
        """Clip by ``grad_norm``, update the weights, advance the LR schedule.

        The pieces of megatron's ``ChainedOptimizer.step`` after its grad norm, so the trainer
        can decide in between whether the step is applied at all.
        """
        clip = self.cfg.optim.clip_grad
        if clip > 0:
            for opt in chained(self.optimizer):
                params = opt.get_parameters()
                if params:
                    clip_grad_by_total_norm_fp32(params, max_norm=clip, total_norm=grad_norm)
        self.optimizer.step_with_ready_grads()
        self.scheduler.step(increment=1)

    def optimizer_step(self) -> float:
        """``apply_update(grad_norm())`` whatever the norm; returns the norm."""
        grad_norm = self.grad_norm()
        self.apply_update(grad_norm)
        return grad_norm

    def mean_loss(self, total: torch.Tensor) -> float:
        """(sum, count) on the last stage -> token-weighted mean over all data-parallel ranks,
        on every rank; NaN when no rank counted a token."""
        if dist.is_initialized():
            dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
            # Non-last pipeline stages hold zeros: summing over the pipeline group broadcasts.
            dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
        loss_sum, count = total.tolist()
        return loss_sum / count if count > 0 else float("nan")

    def dispatch_metrics(self, steps: int) -> dict[str, float]:
        """Expert-dispatch traffic per layer per step, averaged over ranks and layers (ep > 1)."""
        if self.cfg.parallel.ep == 1:
            return {}
        return dispatch_metrics(self.dispatches, steps, self.rt.device)

    def num_parameters(self) -> int:
        return sum(p.numel() for chunk in self.model for p in chunk.parameters())

    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # -- checkpoints ------------------------------------------------------------------------------
    def layout(self) -> dict[str, Any]:
        """What a checkpoint must match for per-rank state (RNG, BatchNorm stats) to carry over."""
        p = self.cfg.parallel
        return {
            "world_size": self.rt.world_size,
            "tp": p.tp,
            "pp": p.pp,
            "vpp": p.vpp,
            "ep": p.ep,
            "dp": self.rt.dp_size,
            "sequence_parallel": p.sequence_parallel,
            "expert_table_sharding": self.table_sharding,
            "distributed_optimizer": p.distributed_optimizer,
        }

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"engine": "megatron", "layout": self.layout(), "vocab_size": self.vocab_size}

    def sharded_state_dict(self) -> dict[str, Any]:
        """The model chunks' ``dist_checkpointing`` sharded state dict (global keys)."""
        return sharded.model_sharded_state_dict(self.model)

    def save_checkpoint(
        self, directory: Path, client_state: dict[str, Any], *, async_save: bool
    ) -> Any:
        return sharded.save(self, directory, client_state, async_save=async_save)

    def load_checkpoint(
        self, directory: Path, *, model_only: bool = False, scratch: Path | None = None
    ) -> dict[str, Any]:
        del scratch  # dist_checkpointing reshards as it loads: nothing to convert first
        return sharded.load(self, directory, model_only=model_only)
