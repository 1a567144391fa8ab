"""GShard and DeepSeekMoE baselines on megatron-core's own MoE layer (not re-implemented).

``model.mlp=gshard``: top-2 of E SwiGLU experts, softmax over the two selected logits (GShard's
renormalised top-2 gates), the switch/GShard load-balancing loss, dropless.
``model.mlp=deepseekmoe``: fine-grained routed experts (top-k of E narrow experts, softmax over all
E before the top-k, DeepSeekMoE's unnormalised gates) plus always-active shared experts; the
expert-level balance loss is megatron's ``aux_loss`` (the same f_i * P_i form).

What megatron provides: ``MoELayer`` with its ``TopKRouter`` (gating, top-k, aux loss attached to
the routing probabilities through ``MoEAuxLossAutoScaler``, whose backward scale megatron's
pipeline schedule sets to 1 / micro-batches because ``num_moe_experts`` is set in the
TransformerConfig), the ``alltoall`` token dispatcher and expert parallelism over ``parallel.ep``
(E / ep experts per rank; their parameters are megatron expert parameters, ``allreduce=False``,
reduced over the expert-data-parallel group by its DDP), ``SequentialMLP`` experts (the local spec;
``GroupedMLP`` needs TransformerEngine, which this project does not require) and
``SharedExpertMLP``. The aux loss values are recorded per layer in megatron's MoE metrics tracker;
``expert_stats.collect_aux_loss`` reads them for ``metrics.jsonl``.

What is ours: :class:`TrackedTopKRouter`, megatron's router plus the per-expert selection counts
and the router entropy our other variants report (``expert_stats``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_config import TransformerConfig

from omnimoe_train.config import ModelConfig, ParallelConfig
from omnimoe_train.model.expert_stats import ExpertStats
from omnimoe_train.validation import MEGATRON_MOE_MLPS


def transformer_config_fields(m: ModelConfig, p: ParallelConfig) -> dict[str, Any]:
    """megatron TransformerConfig MoE fields for ``m.mlp``; empty for the other variants."""
    if m.mlp not in MEGATRON_MOE_MLPS:
        return {}
    deepseek = m.mlp == "deepseekmoe"
    return dict(
        num_moe_experts=m.moe_num_experts,
        moe_router_topk=m.moe_top_k,
        moe_ffn_hidden_size=m.moe_ffn_hidden_size or m.ffn_hidden_size,
        moe_shared_expert_intermediate_size=m.moe_shared_ffn_hidden_size if deepseek else None,
        # Top-1 also needs the softmax over all E first (Switch): over one logit it is constant.
        moe_router_pre_softmax=deepseek or m.moe_top_k == 1,
        moe_router_score_function="softmax",
        moe_router_load_balancing_type="aux_loss" if m.moe_aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=m.moe_aux_loss_coeff,
        moe_router_dtype="fp32",  # routing decided in fp32 even in a bf16 model (as ours)
        moe_token_dispatcher_type="alltoall",
        expert_model_parallel_size=p.ep,
        expert_tensor_parallel_size=1,  # as for the OmniMoE tables: experts never TP-split
    )


class TrackedTopKRouter(TopKRouter):
    """megatron's ``TopKRouter`` that also counts selections per expert and the router entropy.

    ``routing`` is megatron's, unchanged; in training, its ``routing_map`` [T, E] gives the
    counts, and the entropy is that of the softmax over all E logits (the full routing
    distribution, as reported for the other variants).
    """

    def __init__(
        self,
        config: TransformerConfig,
        pg_collection: ProcessGroupCollection | None = None,
        is_mtp_layer: bool = False,
    ) -> None:
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)
        self.stats = ExpertStats(config.num_moe_experts)

    def routing(
        self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        if self.training:  # evaluation batches stay out of the usage statistics
            with torch.no_grad():
                logp_TE = torch.log_softmax(logits.reshape(-1, self.num_experts).float(), -1)
                entropy_T = -(logp_TE.exp() * logp_TE).sum(-1)
                self.stats.update_counts(routing_map.sum(0), entropy_T)
        return probs, routing_map


def moe_layer_spec(num_experts: int) -> functools.partial:
    """megatron's local MoE layer builder (SequentialMLP experts, SharedExpertMLP) with our router.

    The experts, shared experts and dispatcher are sized by the config fields above; the builder
    has the signature TransformerLayer calls for its ``mlp``.
    """
    spec = get_moe_module_spec_for_backend(LocalSpecProvider(), num_experts=num_experts)
    submodules = dataclasses.replace(spec.keywords["submodules"], router=TrackedTopKRouter)
    return functools.partial(spec.func, *spec.args, **{**spec.keywords, "submodules": submodules})


def moe_parameter_roles(layer: MoELayer) -> dict[str, tuple[str, float, float]]:
    """Local parameter name -> (component, fraction a token reads, reads per token)."""
    cfg = layer.config
    sparse = cfg.moe_router_topk / cfg.num_moe_experts
    roles = {}
    for name, _ in layer.named_parameters():
        if name.startswith("experts."):
            roles[name] = ("routed experts", sparse, 1.0)
        elif name.startswith("shared_experts."):
            roles[name] = ("shared experts", 1.0, 1.0)
        else:
            roles[name] = ("router", 1.0, 1.0)
    return roles
