"""The DeepSpeed engine: the same GPT/OmniMoE model trained data parallel with ZeRO stage 0-3,
optional CPU offload of the optimizer (stage >= 1) and of the parameters (stage 3).

What is ours and what is DeepSpeed's:

* model: ``model.gpt.build_model`` (megatron-core modules with tp = pp = 1, whose parallel state
  ``distributed.init_runtime`` creates), built whole on the host from the run's seed, then
  moved to the device and (ZeRO-3) partitioned by ``deepspeed.initialize``: a model must fit
  once in host memory and once, in its training dtype, on the device while it is partitioned.
* optimizer: a client AdamW over megatron's param groups (``engine.optim``) -- torch's AdamW, or
  DeepSpeed's CPU Adam when the optimizer is offloaded -- wrapped by DeepSpeed's ZeRO optimizer.
* LR schedule: our WSD scheduler, stepped here once per optimizer step (not handed to DeepSpeed).
* gradient accumulation: DeepSpeed's, with ``gradient_accumulation_steps`` = our micro-batches
  per step (``deepspeed_config``); the loss of each micro-batch is the token mean, which
  ``engine.backward`` divides by that count, as megatron's schedule does.

ZeRO-3 and the OmniMoE layer: a module's parameters are all-gathered by a hook before its
forward (and again before its backward) and released after. The atomic-expert tables U, V
[N, D] are parameters of ``OmniMoEMLP`` read by index, and ZeRO-3 has no partial gather: each
layer all-gathers both whole tables (2 * N * D elements) for the forward and again for the
backward, and reduce-scatters their full-size gradients, however few rows the tokens touched.
At ``a80m`` (N = 5776, D = 768, bf16) that is 17.7 MB per layer per gather. The tied embedding
is read by the output layer outside the embedding's forward: it is registered as an external
parameter of the GPT model so ZeRO-3 keeps it gathered for the output projection.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import nn

from omnimoe_train.config import RootConfig
from omnimoe_train.distributed import Runtime
from omnimoe_train.engine import deepspeed_checkpoint
from omnimoe_train.engine.deepspeed_config import (
    build_deepspeed_config,
    grad_accum_warning,
    offload_device,
    zero_stage,
)
from omnimoe_train.engine.megatron import PAD_ID
from omnimoe_train.engine.optim import param_groups, wsd_scheduler
from omnimoe_train.model.gpt import build_model, transformer_config
from omnimoe_train.model.router import GateNorm, GateNormSnapshot, apply_running_stats


def _micro_batch(batch_BL: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(tokens, positions, labels, mask): the megatron engine's, padding rows (``PAD_ID``,
    evaluation's) masked out of the loss and the token count."""
    batch_BL = batch_BL.to(device, non_blocking=True)
    mask_BS = batch_BL[:, 1:] != PAD_ID
    batch_BL = batch_BL.clamp_min(0)
    tokens_BS, labels_BS = batch_BL[:, :-1], batch_BL[:, 1:]
    position_ids_BS = torch.arange(tokens_BS.shape[1], device=device).expand_as(tokens_BS)
    return tokens_BS, position_ids_BS, labels_BS, mask_BS


def skippable(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """``optimizer`` whose ``step`` does nothing while ``optimizer.skip_next`` is set.

    For a skipped bad step DeepSpeed still runs its own step (it ends the accumulation window);
    ours must leave weights and moments alone. The step is wrapped on the instance, not by a
    subclass: ZeRO accepts an optimizer by its exact type (torch's AdamW, DeepSpeed's CPU Adam).
    """
    step = optimizer.step

    def guarded_step(*args: Any, **kwargs: Any) -> Any:
        return None if optimizer.skip_next else step(*args, **kwargs)

    optimizer.skip_next = False  # type: ignore[attr-defined]
    optimizer.step = guarded_step  # type: ignore[method-assign]
    return optimizer


class DeepSpeedEngine:
    """``deepspeed.initialize`` around our model, optimizer and schedule (see ``base.Engine``)."""

    def __init__(self, cfg: RootConfig, runtime: Runtime, vocab_size: int) -> None:
        if runtime.device.type == "cpu":
            # DeepSpeed's CPU accelerator (communication through the gloo group that
            # ``init_runtime`` created); naming it skips the probe that warns about it.
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        self.cfg, self.rt, self.vocab_size = cfg, runtime, vocab_size
        d = cfg.data
        self.num_microbatches = d.global_batch_size // (d.micro_batch_size * runtime.dp_size)
        self.ds_config = build_deepspeed_config(cfg, dp_size=runtime.dp_size, bf16=runtime.bf16)
        warning = grad_accum_warning(self.ds_config)
        if warning is not None and runtime.is_main:
            print(warning, file=sys.stderr, flush=True)  # one plain line, as the trainer's
        self.zero_stage = zero_stage(self.ds_config)
        self.offload = {
            what: offload_device(self.ds_config, f"offload_{what}")
            for what in ("optimizer", "param")
        }
        self.tconfig = transformer_config(cfg, bf16=runtime.bf16)
        # DeepSpeed insists on LOCAL_RANK (torchrun sets it); a plain single process has none.
        os.environ.setdefault("LOCAL_RANK", str(runtime.device.index or 0))
        # Built whole on the host (``use_cpu_initialization``), as under the megatron engine; ZeRO-3
        # partitions it inside ``deepspeed.initialize``. Not under ``deepspeed.zero.Init``: that
        # recasts every floating tensor made during construction to the training dtype, buffers
        # included (RoPE frequencies, router BatchNorm statistics, fp64 expert counters).
        module = build_model(cfg, self.tconfig, vocab_size=vocab_size)
        if self.zero_stage == 3 and module.share_embeddings_and_output_weights:
            deepspeed.zero.register_external_parameter(
                module, module.shared_embedding_or_output_weight()
            )
        deepspeed_checkpoint.drop_empty_extra_state(module)
        self.client_optimizer = self._client_optimizer(module)
        engine, _, _, _ = deepspeed.initialize(
            model=module, optimizer=self.client_optimizer, config=self.ds_config
        )
        self.engine = engine
        self.model: list[nn.Module] = [engine]
        self.scheduler = wsd_scheduler(self.client_optimizer, cfg.optim, cfg.trainer.max_steps)
        self.gate_norms = [m for m in module.modules() if isinstance(m, GateNorm)]
        for norm in self.gate_norms:
            norm.pending = []
        self.stats_snapshot = GateNormSnapshot([module])  # to undo a skipped step
        self.sharding_note = self._describe()

    def _describe(self) -> str:
        partitioned = {0: "nothing", 1: "optimizer state", 2: "optimizer state and gradients"}
        what = partitioned.get(self.zero_stage, "parameters, gradients and optimizer state")
        note = f"DeepSpeed ZeRO-{self.zero_stage}: {what} partitioned over dp={self.rt.dp_size}"
        offloads = [f"{what} to {dev}" for what, dev in self.offload.items() if dev != "none"]
        if offloads:
            note += f"; offload {', '.join(offloads)}"
        m = self.cfg.model
        if self.zero_stage == 3 and m.mlp == "omnimoe":
            table_mb = 2 * m.num_experts * m.hidden_size * (2 if self.rt.bf16 else 4) / 1e6
            note += f"; each layer all-gathers its U, V tables ({table_mb:.1f} MB) per pass"
        return note

    def _client_optimizer(self, module: nn.Module) -> torch.optim.Optimizer:
        o = self.cfg.optim
        groups = param_groups(module, o)
        kwargs = dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
        if self.offload["optimizer"] != "none":
            # The offloaded step runs on the host: DeepSpeed's vectorised CPU Adam (a C++
            # extension built on first use) is the optimizer ZeRO-Offload is written for.
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return skippable(DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs))
        # torch's AdamW, as megatron-core uses without TransformerEngine/apex.
        return skippable(torch.optim.AdamW(groups, **kwargs))

    # -- steps --------------------------------------------------------------------------------
    def run_schedule(
        self, data_iterator: Any, num_microbatches: int, forward_only: bool
    ) -> torch.Tensor:
        """Forward (and backward) of ``num_microbatches``; returns float64 (loss sum, tokens).

        With backward, every micro-batch but the last is followed by ``engine.step()``, which
        only advances DeepSpeed's micro-step counter inside an accumulation window; the last
        backward reduces the gradients (the accumulation boundary) and :meth:`optimizer_step`
        makes the boundary step.
        """
        total = torch.zeros(2, dtype=torch.float64, device=self.rt.device)
        for i in range(num_microbatches):
            tokens_BS, position_ids_BS, labels_BS, mask_BS = _micro_batch(
                next(data_iterator), self.rt.device
            )
            with torch.no_grad() if forward_only else contextlib.nullcontext():
                losses_BS = self.engine(tokens_BS, position_ids_BS, None, labels=labels_BS)
            loss_sum = (losses_BS.float() * mask_BS).sum()
            num_tokens = mask_BS.sum()
            if not forward_only:
                self.engine.backward(loss_sum / num_tokens)
                if i < num_microbatches - 1:
                    self.engine.step()
            total += torch.stack([loss_sum.detach().double(), num_tokens.double()])
        return total

    def forward_backward_step(self, data_iterator: Any) -> torch.Tensor:
        self.engine.train()
        self.stats_snapshot.save()
        total = self.run_schedule(data_iterator, self.num_microbatches, forward_only=False)
        # The router's BatchNorm statistics, recorded per micro-batch, are applied over the
        # data-parallel group in global micro-batch order, as under the megatron engine.
        apply_running_stats(self.gate_norms, parallel_state.get_data_parallel_group())
        return total

    def grad_norm(self) -> float:
        """Global L2 norm of this step's reduced gradients, before the update (collective).

        DeepSpeed computes its norm inside ``engine.step()``, after which the update is made;
        to decide first whether to apply it (bad-step rule), the same norm is computed here with
        the functions its optimizers use in ``step`` -- one more pass over this rank's gradient
        partition and one scalar all-reduce per step. ``inf`` when any gradient is non-finite.
        """
        from deepspeed.runtime.utils import (
            combine_grad_norm_groups,
            get_global_norm_of_tensors,
            is_invalid_grad_norm,
        )

        opt = self.engine.optimizer
        if hasattr(opt, "scaled_global_norm"):  # ZeRO-1/2
            norm = opt.scaled_global_norm() / opt.loss_scale
        elif hasattr(opt, "_get_norm_groups"):  # ZeRO-3
            norm = combine_grad_norm_groups(opt._get_norm_groups()) / opt.loss_scale
        elif hasattr(opt, "get_grads_for_norm"):  # BF16 optimizer (ZeRO-1, bf16): fp32 grads
            norm = get_global_norm_of_tensors(opt.get_grads_for_norm()[0], mpu=None)
        else:  # no ZeRO: the all-reduced gradients, replicated on every rank
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads]))
        return float("inf") if is_invalid_grad_norm(norm) else float(norm)

    def apply_update(self, grad_norm: float) -> None:
        """The accumulation-boundary ``engine.step()`` (DeepSpeed clips by its own computation
        of the same norm, then updates), then one WSD step."""
        self.engine.step()
        self.scheduler.step(increment=1)

    def skip_update(self) -> None:
        """End a step the loop does not apply (a bad step) leaving the model as it was.

        ``engine.step()`` still has to run -- it closes DeepSpeed's accumulation window and
        clears the (possibly partitioned) gradients -- but with the client optimizer's step
        turned into a no-op: weights (ZeRO writes back its unchanged fp32 master copies), Adam
        moments and the schedule stay as they were (non-finite gradients DeepSpeed's optimizers
        would also skip by their overflow check). The router BatchNorm statistics the forward
        moved are put back.
        """
        self.client_optimizer.skip_next = True
        try:
            self.engine.step()
        finally:
            self.client_optimizer.skip_next = False
        self.stats_snapshot.restore()

    def optimizer_step(self) -> float:
        """``grad_norm`` then ``apply_update``, whatever the norm; returns the norm."""
        norm = self.grad_norm()
        self.apply_update(norm)
        return norm

    def mean_loss(self, total: torch.Tensor) -> float:
        """(sum, count) of this rank -> mean over all data-parallel ranks (= the world)."""
        if dist.is_initialized():
            dist.all_reduce(total)
        loss_sum, count = total.tolist()
        return loss_sum / count if count > 0 else float("nan")

    def dispatch_metrics(self, steps: int) -> dict[str, float]:
        """No expert-parallel dispatch: the tables are whole in every forward."""
        return {}

    def current_lr(self) -> float:
        return self.client_optimizer.param_groups[0]["lr"]

    def num_parameters(self) -> int:
        """Full parameter count (ZeRO-3 partitions keep the full size in ``ds_numel``)."""
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.engine.module.parameters())

    # -- checkpoints --------------------------------------------------------------------------
    def layout(self) -> dict[str, Any]:
        """What DeepSpeed's files and the per-rank state depend on; another layout loads
        through a universal checkpoint (``deepspeed_checkpoint.load``)."""
        return {
            "engine": "deepspeed",
            "world_size": self.rt.world_size,
            "dp": self.rt.dp_size,
            "zero_stage": self.zero_stage,
            "bf16": self.rt.bf16,
        }

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"engine": "deepspeed", "layout": self.layout(), "vocab_size": self.vocab_size}

    def save_checkpoint(
        self, directory: Path, client_state: dict[str, Any], *, async_save: bool = False
    ) -> None:
        """Write into ``directory`` (collective). DeepSpeed's default checkpoint engine writes
        synchronously, so ``async_save`` makes no difference here."""
        deepspeed_checkpoint.save(self, directory, client_state)

    def load_checkpoint(
        self, directory: Path, *, model_only: bool = False, scratch: Path | None = None
    ) -> dict[str, Any]:
        return deepspeed_checkpoint.load(self, directory, model_only=model_only, scratch=scratch)
