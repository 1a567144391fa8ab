"""One validation step for the whole configuration, and the rules that need the data.

:func:`validate` runs before any model, data or process-group work. Each violated rule raises a
:class:`ConfigError` whose message is one line naming the key and the rule; the CLI prints it and
exits with code 2. Where an input breaks several rules, the first one in :func:`validate`'s
order is reported. The rules live by concern:

* ``choices``: enumerated values, the model families, the positive-integer keys;
* ``model``: the transformer, the chosen MLP, megatron's MoE, the Triton kernels' limits
  (``omnimoe_kernels.limits`` defines them once, for the kernels and for these rules);
* ``layout``: the parallel layout and how the global batch splits over it;
* ``data``: data sources and preparation, and :func:`validate_against_data`, the rules that
  compare the config with the data (tokenizer vocabulary, a prepared dataset's sample length and
  validation split), run as soon as those facts exist (the CLI's pre-check, and right after
  data preparation, before any model work);
* ``engine``: DeepSpeed, the device, the throughput levers (Liger, ``trainer.compile``,
  ``trainer.cuda_graphs``);
* ``training``: optimizer and schedule, checkpoints, time limit and bad steps, the profiled
  step, names.

``overrides`` holds the rules on the command line's overrides as typed, which the CLI's
pre-check runs before composition converts them (strict bools, a group given ``null``, an empty
mapping over a preset); ``config_files`` holds the strict-bool rule for the YAML files a run
composes (ours and a user's own, through ``hydra.searchpath``).
"""

from __future__ import annotations

import os

from omnimoe_kernels.limits import (
    EXPERTS_MAX_HIDDEN,
    EXPERTS_MAX_NUM,
    EXPERTS_MAX_PAIRS,
    ROUTER_MAX_TOP_K,
)
from omnimoe_train.config import RootConfig
from omnimoe_train.validation.choices import (
    ATOMIC_EXPERT_MLPS,
    CHOICES,
    MEGATRON_MOE_MLPS,
    MLPS,
    POSITIVE_INTEGERS,
    PRODUCT_KEY_MLPS,
)
from omnimoe_train.validation.data import (
    MANIFEST_NAME,
    DataFacts,
    data_facts_before_preparation,
    dataset_facts,
    tokenizer_facts,
    validate_against_data,
    validate_data,
    validate_data_paths,
)
from omnimoe_train.validation.engine import (
    validate_cuda_graphs,
    validate_deepspeed,
    validate_device,
    validate_expert_backend,
    validate_throughput_levers,
)
from omnimoe_train.validation.errors import ConfigError, config_value, require
from omnimoe_train.validation.layout import (
    data_parallel_size,
    layout_from_config,
    validate_batch_split,
    validate_ep_overlap,
    validate_parallel_layout,
)
from omnimoe_train.validation.model import (
    validate_kernel_limits,
    validate_mlp,
    validate_transformer,
)
from omnimoe_train.validation.training import (
    WANDB_TAG_MAX_CHARS,
    validate_checkpoint,
    validate_names,
    validate_optim,
    validate_output_folder,
    validate_profile_step,
    validate_resume_path,
    validate_robustness,
    validate_seed,
)

__all__ = [
    "ATOMIC_EXPERT_MLPS",
    "CHOICES",
    "EXPERTS_MAX_HIDDEN",
    "EXPERTS_MAX_NUM",
    "EXPERTS_MAX_PAIRS",
    "MANIFEST_NAME",
    "MEGATRON_MOE_MLPS",
    "MLPS",
    "PRODUCT_KEY_MLPS",
    "ROUTER_MAX_TOP_K",
    "WANDB_TAG_MAX_CHARS",
    "ConfigError",
    "DataFacts",
    "data_facts_before_preparation",
    "data_parallel_size",
    "dataset_facts",
    "layout_from_config",
    "tokenizer_facts",
    "validate",
    "validate_against_data",
    "validate_data_paths",
    "validate_output_folder",
    "validate_resume_path",
    "world_size_from_env",
]


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def validate(
    cfg: RootConfig,
    world_size: int | None = None,
    *,
    this_machine: bool = True,
    batch_rules: bool = True,
) -> None:
    """Check every cross-field rule; raise :class:`ConfigError` on the first violation.

    ``this_machine=False`` leaves out the rules about the machine the check runs on (a visible
    CUDA device, an installed package): ``omnimoe-params`` describes a config meant for another
    machine. ``batch_rules=False`` leaves out how the global batch splits into micro-batches over
    the data-parallel ranks (``layout.validate_batch_split``): counting parameters needs no batch,
    and ``omnimoe-params`` checks a layout against the smallest world that fits it."""
    world_size = world_size_from_env() if world_size is None else world_size
    for key, allowed in CHOICES.items():
        value = config_value(cfg, key)
        require(value in allowed, key, f"must be one of {', '.join(allowed)} (got {value!r})")
    for key in POSITIVE_INTEGERS:
        value = config_value(cfg, key)
        require(value >= 1, key, f"must be a positive integer (got {value})")

    m, p, d, t = cfg.model, cfg.parallel, cfg.data, cfg.trainer
    validate_transformer(m)
    validate_ep_overlap(p)
    validate_mlp(m, p)
    if m.mlp in PRODUCT_KEY_MLPS and m.expert_backend != "torch":
        validate_kernel_limits(m, d, p.ep)
    if t.engine == "deepspeed":
        validate_deepspeed(p, cfg.deepspeed, this_machine, t)
    validate_parallel_layout(cfg, world_size)
    if batch_rules:
        validate_batch_split(d, p, world_size)
    validate_data(d)
    validate_optim(cfg.optim, t.max_steps)
    validate_checkpoint(cfg.checkpoint)
    validate_robustness(t)
    validate_seed(t)
    validate_profile_step(t)
    validate_names(d, cfg.checkpoint, cfg.logging.wandb)
    if this_machine:
        validate_device(t.device)
        validate_expert_backend(m, t)
    validate_throughput_levers(m, p, t, this_machine)
    validate_cuda_graphs(m, p, t, this_machine)
