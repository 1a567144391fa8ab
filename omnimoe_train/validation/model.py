"""Model rules: the transformer's shape, the chosen ``model.mlp`` and its ablation switches,
megatron's MoE layer, and the limits of the Triton kernels (``omnimoe_kernels.limits`` defines
them once, for the kernels and for these rules)."""

from __future__ import annotations

import math

from omnimoe_kernels.limits import (
    EXPERTS_MAX_HIDDEN,
    EXPERTS_MAX_NUM,
    EXPERTS_MAX_PAIRS,
    ROUTER_MAX_TOP_K,
)
from omnimoe_train.config import DataConfig, ModelConfig, ParallelConfig
from omnimoe_train.validation.choices import (
    ATOMIC_EXPERT_MLPS,
    MEGATRON_MOE_MLPS,
    PRODUCT_KEY_MLPS,
)
from omnimoe_train.validation.errors import require


def query_groups(m: ModelConfig) -> int:
    """Attention's key/value groups: ``model.num_query_groups``, null meaning one per head (0 is
    not null: megatron would divide by it, so the rule below must see it)."""
    return m.num_attention_heads if m.num_query_groups is None else m.num_query_groups


def validate_transformer(m: ModelConfig) -> None:
    """Attention heads, query groups, RoPE and the vocabulary."""
    require(
        m.hidden_size % m.num_attention_heads == 0,
        "model.hidden_size",
        f"must be divisible by model.num_attention_heads ({m.hidden_size} % {m.num_attention_heads} != 0)",
    )
    groups = query_groups(m)
    require(
        groups >= 1 and m.num_attention_heads % groups == 0,
        "model.num_query_groups",
        f"must divide model.num_attention_heads={m.num_attention_heads} (got {groups})",
    )
    require(
        (m.hidden_size // m.num_attention_heads) % 2 == 0,
        "model.hidden_size",
        "head dimension (hidden_size / num_attention_heads) must be even for RoPE",
    )
    if m.vocab_size is not None:
        require(m.vocab_size >= 2, "model.vocab_size", f"must be >= 2 (got {m.vocab_size})")
    # Outside these, torch refuses the init (a traceback at model build) or every loss is NaN
    # (RoPE's 1 / base^(2i/d), RMSNorm's 1 / sqrt(mean + eps)).
    for key, value, bound in (
        ("model.init_std", m.init_std, "> 0"),
        ("model.rope_base", m.rope_base, "> 0"),
        ("model.norm_eps", m.norm_eps, ">= 0"),
    ):
        ok = value > 0 if bound == "> 0" else value >= 0
        require(math.isfinite(value) and ok, key, f"must be a finite number {bound} (got {value})")


def validate_mlp(m: ModelConfig, p: ParallelConfig) -> None:
    """Rules of the chosen ``model.mlp`` and its ablation switches."""
    require(
        m.router == "cartesian" or m.mlp == "omnimoe",
        "model.router",
        f"router=dense is an ablation of model.mlp=omnimoe (got model.mlp={m.mlp})",
    )
    require(
        m.execution == "expert" or m.mlp in ATOMIC_EXPERT_MLPS,
        "model.execution",
        f"execution=token needs atomic experts (model.mlp=omnimoe or peer; got {m.mlp})",
    )
    require(
        m.execution == "expert" or p.ep == 1,
        "model.execution",
        f"execution=token gathers from whole local tables: needs parallel.ep=1 (got {p.ep})",
    )
    if m.mlp in PRODUCT_KEY_MLPS:
        n = math.isqrt(m.num_experts) if m.num_experts > 0 else 0
        require(
            m.num_experts > 0 and n * n == m.num_experts,
            "model.num_experts",
            f"must be a perfect square n*n for the "
            f"{'Cartesian' if m.mlp == 'omnimoe' else 'product-key'} router (got {m.num_experts})",
        )
        require(
            1 <= m.top_k <= m.num_experts,
            "model.top_k",
            f"must be in [1, model.num_experts={m.num_experts}] (got {m.top_k})",
        )
    for heads_key, dim_key, mlp in (
        ("model.pkm_heads", "model.pkm_key_dim", "pkm"),
        ("model.peer_heads", "model.peer_key_dim", "peer"),
    ):
        if m.mlp != mlp:
            continue
        heads, key_dim = _model_value(m, heads_key), _model_value(m, dim_key)
        require(heads >= 1, heads_key, f"must be a positive integer (got {heads})")
        require(
            m.top_k % heads == 0,
            "model.top_k",
            f"must be a multiple of {heads_key}={heads} (top_k counts all heads; got {m.top_k})",
        )
        require(
            key_dim >= 2 and key_dim % 2 == 0,
            dim_key,
            f"must be a positive even integer (two half-keys; got {key_dim})",
        )
    segment = m.expert_grad_segment_pairs
    require(
        segment == 0 or segment >= 16,
        "model.expert_grad_segment_pairs",
        f"must be 0 (never split) or at least 16 pairs, one chunk (got {segment})",
    )
    if m.mlp in MEGATRON_MOE_MLPS:
        _validate_megatron_moe(m, p)


def _model_value(m: ModelConfig, dotted: str) -> int:
    return getattr(m, dotted.split(".", 1)[1])


def _validate_megatron_moe(m: ModelConfig, p: ParallelConfig) -> None:
    E = m.moe_num_experts
    require(E >= 1, "model.moe_num_experts", f"must be a positive integer (got {E})")
    require(
        1 <= m.moe_top_k <= E,
        "model.moe_top_k",
        f"must be in [1, model.moe_num_experts={E}] (got {m.moe_top_k})",
    )
    require(
        E % p.ep == 0,
        "model.moe_num_experts",
        f"must be divisible by parallel.ep={p.ep} (megatron places E / ep experts per rank)",
    )
    width = m.moe_ffn_hidden_size
    require(
        width is None or width >= 1,
        "model.moe_ffn_hidden_size",
        f"must be a positive integer or null (= model.ffn_hidden_size; got {width})",
    )
    shared = m.moe_shared_ffn_hidden_size
    if m.mlp == "deepseekmoe":
        require(
            shared is not None and shared >= 1,
            "model.moe_shared_ffn_hidden_size",
            f"deepseekmoe needs shared experts: a positive width (got {shared})",
        )
    else:
        require(
            shared is None,
            "model.moe_shared_ffn_hidden_size",
            f"gshard has no shared experts: must be null (got {shared}; use deepseekmoe)",
        )
    require(
        m.moe_aux_loss_coeff >= 0,
        "model.moe_aux_loss_coeff",
        f"must be >= 0 (got {m.moe_aux_loss_coeff})",
    )
    require(
        p.tp == 1 or p.sequence_parallel,
        "parallel.sequence_parallel",
        f"megatron's MoE layer with tp={p.tp} > 1 needs sequence_parallel=true in training",
    )


def validate_kernel_limits(m: ModelConfig, d: DataConfig, ep: int) -> None:
    """What the Triton kernels support (``auto`` takes them on CUDA; the reference has no
    limits). One expert-kernel call sees the pairs of a whole micro-batch of every rank of the
    expert-parallel group (the dispatch gathers them), hence the factor ``ep``
    (``parallel.ep``)."""
    torch_only = "; model.expert_backend=torch has no such limit"
    # PKM and PEER search top_k / heads per head; the dense-router ablation uses torch.topk.
    heads = {"pkm": m.pkm_heads, "peer": m.peer_heads}.get(m.mlp, 1)
    if m.router == "cartesian":
        require(
            m.top_k // heads <= ROUTER_MAX_TOP_K,
            "model.top_k",
            f"per head must be <= {ROUTER_MAX_TOP_K}, the Triton router's limit "
            f"(got {m.top_k // heads}){torch_only}",
        )
    if m.mlp not in ATOMIC_EXPERT_MLPS:
        return  # PKM reads its values with embedding_bag, not the expert kernels
    require(
        m.num_experts <= EXPERTS_MAX_NUM,
        "model.num_experts",
        f"must be <= {EXPERTS_MAX_NUM}, the Triton expert kernels' limit "
        f"(got {m.num_experts}){torch_only}",
    )
    # The kernels see hidden_size / ep columns under dim sharding: the full width is the bound.
    require(
        m.hidden_size <= EXPERTS_MAX_HIDDEN,
        "model.hidden_size",
        f"must be <= {EXPERTS_MAX_HIDDEN}, the Triton expert kernels' limit "
        f"(got {m.hidden_size}){torch_only}",
    )
    pairs = d.micro_batch_size * d.seq_len * m.top_k * ep
    require(
        pairs <= EXPERTS_MAX_PAIRS,
        "data.micro_batch_size",
        f"micro_batch_size * seq_len * model.top_k * parallel.ep = {pairs} token-expert pairs in "
        f"one expert-kernel call, above the Triton kernels' limit {EXPERTS_MAX_PAIRS}{torch_only}",
    )
