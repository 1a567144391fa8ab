"""The optimizer settings and LR schedule every engine uses: one definition, so the engines
train the same way (same AdamW hyper-parameters, same weight-decay exemptions, same WSD schedule).

The megatron engine hands :func:`optimizer_config` to ``get_megatron_optimizer``; the DeepSpeed
engine builds its client optimizer from :func:`param_groups`, megatron's own grouping, so the
no-decay set (biases and 1-D parameters: norms) cannot drift between them.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer.optimizer_config import ParamKey, ParamPredicate
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from torch import nn

from omnimoe_train.config import OptimConfig
from omnimoe_train.lr_schedule import wsd_decay_steps

WSD_STYLES = {"linear": "linear", "cosine": "cosine", "sqrt": "minus_sqrt"}


def optimizer_config(o: OptimConfig, *, bf16: bool, distributed: bool = False) -> OptimizerConfig:
    """Megatron's optimizer config for AdamW with our hyper-parameters."""
    return OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.lr * o.min_lr_ratio,
        weight_decay=o.weight_decay,
        adam_beta1=o.beta1,
        adam_beta2=o.beta2,
        adam_eps=o.eps,
        clip_grad=o.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=distributed,
    )


def _full_shape(param: torch.Tensor) -> torch.Size:
    # A ZeRO-3 partitioned parameter holds an empty tensor; DeepSpeed keeps its shape aside.
    return getattr(param, "ds_shape", param.shape)


def param_groups(model: nn.Module, o: OptimConfig) -> list[dict[str, Any]]:
    """Megatron's parameter groups: ``wd_mult`` 0 for biases and 1-D parameters (norms).

    The override is megatron's standard one (``get_standard_config_overrides``) with the shape
    read through :func:`_full_shape`, so a model built under ``deepspeed.zero.Init`` groups like
    the whole model. ``_get_param_groups`` is what ``get_megatron_optimizer`` calls (private in
    megatron-core 0.19, which is pinned); reusing it keeps the groups, their order and their
    keys (``wd_mult``, ``lr_mult``, ``max_lr``, ``min_lr``) the megatron engine's. Collective
    over the default group (it aligns group keys across ranks).
    """
    from megatron.core.optimizer import _get_param_groups

    one_dim = ParamPredicate(name="param_len_1", fn=lambda p: len(_full_shape(p)) == 1)
    overrides = {ParamKey(name="*.bias", predicate=one_dim): {"wd_mult": 0.0}}
    groups = _get_param_groups([model], optimizer_config(o, bf16=False), overrides)
    return [g for g in groups if g["params"]]


def wsd_scheduler(optimizer: Any, o: OptimConfig, max_steps: int) -> OptimizerParamScheduler:
    """Warmup-stable-decay LR (and constant weight decay times ``wd_mult``), megatron's scheduler.

    Stepped once per optimizer step by the engine (``step(increment=1)``); it writes ``lr`` and
    ``weight_decay`` into every param group of ``optimizer``, so it drives any torch-style
    optimizer (megatron's, or the client optimizer DeepSpeed wraps).
    """
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.lr * o.min_lr_ratio,
        lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=max_steps,
        lr_decay_style="WSD",
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=max_steps,
        wd_incr_style="constant",
        wsd_decay_steps=wsd_decay_steps(o.decay_fraction, max_steps),
        lr_wsd_decay_style=WSD_STYLES[o.decay_style],
        # On resume the schedule's shape comes from the current config (a longer
        # trainer.max_steps extends the run) and only its position from the checkpoint.
        override_opt_param_scheduler=True,
        use_checkpoint_opt_param_scheduler=False,
    )
