"""The parallel layout of a run and its validation, done before any process group exists.

Groups (megatron-core ``initialize_model_parallel`` with expert_tensor_parallel_size = 1, the
default order tp-cp-ep-dp-pp):
    TP   tensor parallel: attention / shared-MLP weights split over tp ranks
    PP   pipeline stages (vpp interleaved chunks per stage)
    DP   data parallel, dp = world_size / (tp * pp): dense params are reduced over it
    EP   expert parallel, ep consecutive ranks of one pipeline stage (it may span TP ranks):
         the atomic-expert tables are sharded over it (rows or dim)
    EDP  expert data parallel, world_size / (ep * pp) ranks holding the same table shard:
         table gradients are reduced over EDP only (megatron's expert params, allreduce=False)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

EXPERT_TABLE_SHARDINGS = ("rows", "dim", "auto")


class LayoutError(ValueError):
    """A parallel-layout rule is broken; ``str()`` is one line naming the key and the rule."""

    def __init__(self, key: str, rule: str) -> None:
        self.key, self.rule = key, rule
        super().__init__(f"invalid parallel layout: {key}: {rule}")


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    ep: int = 1
    sequence_parallel: bool = False
    expert_table_sharding: str = "auto"
    distributed_optimizer: bool = True

    @property
    def dp(self) -> int:
        """Data-parallel size of the dense part (exact once validated)."""
        return self.world_size // (self.tp * self.pp)

    @property
    def expert_dp(self) -> int:
        """Ranks holding the same table shard: the group table gradients are reduced over."""
        return self.world_size // (self.ep * self.pp)


def sharding_modes_allowed(
    layout: ParallelLayout, *, num_experts: int, hidden_size: int
) -> tuple[str, ...]:
    """The table shardings whose divisibility rules this layout meets (for ``auto``)."""
    n = math.isqrt(num_experts)
    allowed = []
    if n % layout.ep == 0:
        allowed.append("rows")
    if hidden_size % layout.ep == 0:
        allowed.append("dim")
    return tuple(allowed)


def _check(ok: bool, key: str, rule: str) -> None:
    if not ok:
        raise LayoutError(key, rule)


def validate_layout(
    layout: ParallelLayout,
    *,
    num_layers: int,
    num_heads: int,
    num_query_groups: int,
    num_experts: int,
    hidden_size: int,
) -> None:
    """Raise ``LayoutError`` for the first broken rule; pure arithmetic, no process groups."""
    lo = layout
    for key in ("world_size", "tp", "pp", "ep"):
        value = getattr(lo, key)
        _check(
            isinstance(value, int) and value >= 1, key, f"must be a positive integer, got {value!r}"
        )
    model_parallel = lo.tp * lo.pp
    _check(
        lo.world_size % model_parallel == 0,
        "world_size",
        f"world_size={lo.world_size} must be divisible by tp*pp={lo.tp}*{lo.pp}={model_parallel}",
    )
    _check(
        num_heads % lo.tp == 0,
        "tp",
        f"num_attention_heads={num_heads} must be divisible by tp={lo.tp}",
    )
    _check(
        num_query_groups % lo.tp == 0,
        "tp",
        f"num_query_groups={num_query_groups} must be divisible by tp={lo.tp}",
    )
    if lo.vpp is not None:
        _check(
            isinstance(lo.vpp, int) and lo.vpp >= 1 and lo.pp > 1,
            "vpp",
            f"virtual pipeline size {lo.vpp!r} needs pp > 1 (pp={lo.pp}) and must be >= 1",
        )
    stages = lo.pp * (lo.vpp or 1)
    _check(
        num_layers % stages == 0,
        "pp",
        f"num_layers={num_layers} must be divisible by pp*vpp={stages}",
    )
    _check(
        lo.tp == 1 or lo.ep == 1 or lo.sequence_parallel,
        "sequence_parallel",
        f"tp={lo.tp} > 1 with ep={lo.ep} > 1 needs sequence_parallel=true (megatron requires it "
        "for MoE; without it the TP ranks of one EP group would dispatch the same tokens twice)",
    )
    _check(
        lo.tp > 1 or not lo.sequence_parallel,
        "sequence_parallel",
        "sequence_parallel=true needs tp > 1 (it splits the sequence over the TP ranks)",
    )
    # megatron-core: world_size % (expert_tensor_parallel_size * ep * pp) == 0. With ETP = 1 this
    # is ep | world_size / pp = tp * dp: the EP group may span TP ranks (their tokens differ under
    # sequence parallelism), so ep need not divide dp.
    _check(
        lo.world_size % (lo.ep * lo.pp) == 0,
        "ep",
        f"ep={lo.ep} must divide world_size/pp = tp*dp = {lo.world_size // lo.pp} "
        f"(megatron: world_size % (expert_tensor_parallel_size=1 * ep * pp) == 0)",
    )
    n = math.isqrt(num_experts)
    _check(
        n * n == num_experts,
        "num_experts",
        f"num_experts={num_experts} must be a perfect square n*n (Cartesian router)",
    )
    _check(lo.ep <= n, "ep", f"ep={lo.ep} must be <= n = sqrt(num_experts) = {n}")
    _check(
        lo.expert_table_sharding in EXPERT_TABLE_SHARDINGS,
        "expert_table_sharding",
        f"{lo.expert_table_sharding!r} must be one of {EXPERT_TABLE_SHARDINGS}",
    )
    allowed = sharding_modes_allowed(lo, num_experts=num_experts, hidden_size=hidden_size)
    rules = {
        "rows": f"rows sharding needs n = sqrt(num_experts) = {n} divisible by ep={lo.ep}",
        "dim": f"dim sharding needs hidden_size={hidden_size} divisible by ep={lo.ep}",
    }
    if lo.expert_table_sharding in rules:
        mode = lo.expert_table_sharding
        _check(mode in allowed, "ep", rules[mode])
    else:
        _check(
            bool(allowed), "ep", f"auto sharding: neither mode fits ({'; '.join(rules.values())})"
        )
