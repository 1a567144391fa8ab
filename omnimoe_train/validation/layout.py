"""Parallel layout rules and how the global batch splits over the layout.

The layout rules are those that can be checked from the config and the launcher's world size,
before any process group exists (``omnimoe_train.parallel.layout`` holds them; here they get
config keys). The batch rules are megatron's: global = micro-batch * data-parallel size *
micro-batches per step.
"""

from __future__ import annotations

from omnimoe_train.config import DataConfig, ModelConfig, ParallelConfig, RootConfig
from omnimoe_train.parallel.layout import LayoutError, ParallelLayout, validate_layout
from omnimoe_train.validation.choices import ATOMIC_EXPERT_MLPS
from omnimoe_train.validation.errors import ConfigError, require
from omnimoe_train.validation.model import query_groups


def data_parallel_size(p: ParallelConfig, world_size: int) -> int:
    """Ranks that hold the same model shard: ``world_size / (tp * pp)``."""
    return world_size // (p.tp * p.pp)


def validate_ep_overlap(p: ParallelConfig) -> None:
    # A typed schema rejects other values on the command line; configs built in code are not.
    require(
        p.ep_overlap is None or isinstance(p.ep_overlap, bool),
        "parallel.ep_overlap",
        f"must be true, false or null (got {p.ep_overlap!r})",
    )


def layout_from_config(cfg: RootConfig, world_size: int) -> ParallelLayout:
    p = cfg.parallel
    return ParallelLayout(
        world_size=world_size,
        tp=p.tp,
        pp=p.pp,
        vpp=p.vpp,
        ep=p.ep,
        sequence_parallel=p.sequence_parallel,
        expert_table_sharding=p.expert_table_sharding,
        distributed_optimizer=p.distributed_optimizer,
    )


def validate_parallel_layout(cfg: RootConfig, world_size: int) -> None:
    """``parallel.layout.validate_layout`` with the model's sizes; its ``LayoutError`` becomes
    a :class:`ConfigError` naming the config key."""
    m: ModelConfig = cfg.model
    try:
        validate_layout(
            layout_from_config(cfg, world_size),
            num_layers=m.num_layers,
            num_heads=m.num_attention_heads,
            num_query_groups=query_groups(m),
            # Only atomic-expert tables are sharded by these rules; the other variants have none
            # (megatron's MoE checks its own): any square count >= ep passes the expert rules.
            num_experts=m.num_experts
            if m.mlp in ATOMIC_EXPERT_MLPS
            else max(cfg.parallel.ep, 1) ** 2,
            hidden_size=m.hidden_size,
        )
    except LayoutError as exc:
        if exc.key == "world_size" and world_size >= 1:
            raise _model_parallel_error(cfg.parallel, world_size) from None
        prefix = {"world_size": "", "num_experts": "model."}.get(exc.key, "parallel.")
        key = prefix + exc.key
        raise ConfigError(key, f"invalid parallel layout: {exc.rule}") from None


def _model_parallel_error(p: ParallelConfig, world_size: int) -> ConfigError:
    """tp * pp does not divide the world size. The world size is the launcher's (the number of
    processes), not a config key: the error names the parallel key the user set (``parallel.tp``,
    else ``parallel.pp``), the rule with both values, and the two ways to meet it."""
    size = p.tp * p.pp
    set_keys = [key for key, value in (("parallel.tp", p.tp), ("parallel.pp", p.pp)) if value > 1]
    return ConfigError(
        set_keys[0],
        f"invalid parallel layout: parallel.tp*parallel.pp = {p.tp}*{p.pp} = {size} must divide "
        f"the world size (the number of processes: {world_size}); start a multiple of {size} "
        f"processes or lower {' or '.join(set_keys)}",
    )


def validate_batch_split(d: DataConfig, p: ParallelConfig, world_size: int) -> None:
    """The global batch is a whole number of micro-batches on every data-parallel rank (and,
    with the interleaved schedule, of groups of ``parallel.pp`` micro-batches)."""
    dp = data_parallel_size(p, world_size)
    require(
        d.global_batch_size % (d.micro_batch_size * dp) == 0,
        "data.global_batch_size",
        f"must be a multiple of data.micro_batch_size * data-parallel size "
        f"({d.micro_batch_size} * {dp}) (got {d.global_batch_size}); "
        + _batch_fix(d.global_batch_size, d.micro_batch_size, dp),
    )
    if p.vpp is not None:
        # megatron's interleaved schedule runs micro-batches in groups of pp per model chunk.
        num_microbatches = d.global_batch_size // (d.micro_batch_size * dp)
        require(
            num_microbatches % p.pp == 0,
            "data.global_batch_size",
            f"with parallel.vpp the micro-batches per step ({num_microbatches} = global_batch_size "
            f"/ (micro_batch_size * dp={dp})) must be a multiple of parallel.pp={p.pp}",
        )


def _batch_fix(global_batch: int, micro_batch: int, dp: int) -> str:
    """The overrides that satisfy global = micro * dp * accumulation: the next larger global
    batch, or the largest smaller micro-batch that divides it."""
    step = micro_batch * dp
    fixes = [f"data.global_batch_size={-(-global_batch // step) * step}"]
    if global_batch % dp == 0:
        micro = max(m for m in range(1, micro_batch + 1) if (global_batch // dp) % m == 0)
        fixes.append(f"data.micro_batch_size={micro}")
    return "set " + " or ".join(fixes)
