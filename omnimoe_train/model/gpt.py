"""Build the GPT decoder on megatron-core: RMSNorm, RoPE, causal attention, and the MLP chosen
by ``model.mlp``, plugged in via the layer spec: ``omnimoe`` (``omnimoe_layer``), the ``dense``
SwiGLU baseline (megatron's MLP), ``gshard`` / ``deepseekmoe`` (megatron's MoE layer,
``moe_megatron``), ``pkm`` (``pkm``) and ``peer`` (``peer``).

Only *what* the model is lives here; how it is parallelised (process groups, DDP, pipeline
stages) is applied by ``distributed.py`` and the trainer.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from omnimoe_kernels import experts_dense_grad, experts_grad_blocks
from omnimoe_train.config import ModelConfig, RootConfig
from omnimoe_train.model.attention import SDPAttention
from omnimoe_train.model.fusions import (
    LigerLossGPTModel,
    compile_layers,
    transformer_config_fusions,
)
from omnimoe_train.model.init import SeededTransformerLayer
from omnimoe_train.model.moe_megatron import (
    MEGATRON_MOE_MLPS,
    moe_layer_spec,
    transformer_config_fields,
)
from omnimoe_train.model.omnimoe_layer import OmniMoEMLP, OmniMoESettings
from omnimoe_train.model.peer import PEERMLP, PEERSettings
from omnimoe_train.model.pkm import PKMMLP, PKMSettings


def omnimoe_settings(m: ModelConfig, table_sharding: str = "none") -> OmniMoESettings:
    return OmniMoESettings(
        num_experts=m.num_experts,
        top_k=m.top_k,
        shared_expert=m.shared_expert,
        router=m.router,
        execution=m.execution,
        router_norm=m.router_norm,
        router_weights=m.router_weights,
        backend=m.expert_backend,
        deterministic=m.deterministic,
        table_sharding=table_sharding,
    )


def mlp_builder(m: ModelConfig, table_sharding: str = "none"):  # noqa: ANN201
    """The ``mlp`` submodule builder of ``model.mlp`` (None keeps megatron's dense SwiGLU MLP);
    ``table_sharding`` (none, rows, dim): the expert-parallel shard of atomic-expert tables."""
    if m.mlp == "omnimoe":
        return OmniMoEMLP.spec(omnimoe_settings(m, table_sharding))
    if m.mlp == "peer":
        fields = dataclasses.asdict(omnimoe_settings(m, table_sharding))
        return PEERMLP.spec(PEERSettings(**fields, heads=m.peer_heads, key_dim=m.peer_key_dim))
    if m.mlp == "pkm":
        return PKMMLP.spec(
            PKMSettings(
                num_slots=m.num_experts,
                top_k=m.top_k,
                heads=m.pkm_heads,
                key_dim=m.pkm_key_dim,
                shared_expert=m.shared_expert,
                backend=m.expert_backend,
            )
        )
    if m.mlp in MEGATRON_MOE_MLPS:
        return moe_layer_spec(m.moe_num_experts)
    return None


def transformer_config(cfg: RootConfig, *, bf16: bool) -> TransformerConfig:
    m, p = cfg.model, cfg.parallel
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=m.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_eps,
        gated_linear_unit=True,  # SwiGLU
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_std,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp,
        sequence_parallel=p.sequence_parallel,
        use_cpu_initialization=True,
        perform_initialization=True,
        # These fused paths need apex / TransformerEngine (model/fusions.py says why each);
        # the ones that do not are the model.fused_* keys.
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        **transformer_config_fusions(m, cfg.trainer.cuda_graphs),
        **transformer_config_fields(m, p),  # megatron's MoE settings (gshard, deepseekmoe)
    )


class RMSNorm(nn.Module):
    """RMSNorm that supports sequence parallelism (megatron's torch-norm wrapper refuses it).

    Under sequence parallelism each TP rank normalises a slice of the sequence, so the weight's
    grad is partial: ``sequence_parallel = True`` makes megatron's finalize_model_grads
    all-reduce it over the TP group. Same parameter name (``weight``) and maths as
    ``torch.nn.RMSNorm``.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def layer_spec(cfg: RootConfig, table_sharding: str = "none") -> ModuleSpec:
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    submodules = dataclasses.replace(
        spec.submodules, input_layernorm=RMSNorm, pre_mlp_layernorm=RMSNorm
    )
    attention = submodules.self_attention
    attention.submodules = dataclasses.replace(attention.submodules, core_attention=SDPAttention)
    mlp = mlp_builder(cfg.model, table_sharding)
    if mlp is not None:
        submodules = dataclasses.replace(submodules, mlp=mlp)
    # Each layer draws its weights from (seed, global layer number): the same in every layout.
    return ModuleSpec(
        module=SeededTransformerLayer,
        params={"init_seed": cfg.trainer.seed},
        submodules=submodules,
    )


def build_model(
    cfg: RootConfig,
    tconfig: TransformerConfig,
    *,
    vocab_size: int,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    table_sharding: str = "none",
) -> GPTModel:
    """This stage's (or virtual chunk's) part of the GPT; ``table_sharding`` (none, rows, dim)
    says which expert-parallel shard of the atomic-expert tables each layer holds."""
    # The weight-gradient path is chosen inside the kernels (also under expert parallelism):
    # a forced choice is process-wide, set here for every model built (a sweep's next job
    # resets it).
    experts_dense_grad.FORCE_GRAD_PATH = (
        None if cfg.model.expert_grad_path == "auto" else cfg.model.expert_grad_path
    )
    experts_dense_grad.DENSE_COEF = cfg.model.expert_grad_coef
    experts_grad_blocks.SEGMENT_PAIRS = cfg.model.expert_grad_segment_pairs
    # A block spec (not a layer spec) so the final norm is ours too; this stage's layers only.
    num_layers = get_num_layers_to_build(tconfig, vp_stage=vp_stage)
    block = TransformerBlockSubmodules(
        layer_specs=[layer_spec(cfg, table_sharding)] * num_layers, layer_norm=RMSNorm
    )
    gpt_class = LigerLossGPTModel if cfg.model.fused_cross_entropy == "liger" else GPTModel
    model = gpt_class(
        config=tconfig,
        transformer_layer_spec=block,
        vocab_size=vocab_size,
        max_sequence_length=cfg.data.seq_len,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=cfg.model.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(cfg.model.rope_base),
        vp_stage=vp_stage,
    )
    if cfg.trainer.compile == "layers":
        compile_layers(model)
    return model


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """Pad so the vocab splits evenly over TP ranks in multiples of ``multiple`` (Megatron's rule)."""
    step = multiple * tp
    return ((vocab_size + step - 1) // step) * step
