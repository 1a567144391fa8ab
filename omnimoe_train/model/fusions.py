"""Throughput levers that need neither TransformerEngine nor apex (docs/throughput.md).

What megatron-core 0.19 offers without them, and what each key turns on:

* ``model.fused_swiglu`` -> ``bias_activation_fusion``: megatron's ``SwiGLUFunction``
  (``megatron.core.fusions.fused_bias_swiglu``), an autograd function whose forward and
  backward are ``torch.compile``'d (``megatron.core.jit.jit_fuser``); it keeps only the fc1
  output for the backward. Used by the dense MLP and by a routed MLP's shared branch.
* ``model.fused_cross_entropy=megatron`` -> ``cross_entropy_loss_fusion`` with
  ``cross_entropy_fusion_impl="native"``: megatron's vocab-parallel cross-entropy with its
  element-wise steps ``torch.compile``'d (``megatron.core.fusions.fused_cross_entropy``).
* ``model.fused_cross_entropy=liger``: Liger-Kernel's fused linear cross-entropy
  (``liger_kernel.ops.fused_linear_cross_entropy``, Triton) replaces the output layer and the
  loss through GPTModel's ``output_processor`` hook: the [T, V] logits are made chunk by chunk
  and never stored. Not vocab-parallel, so tensor parallel size 1 only.
* ``trainer.compile=layers``: ``torch.compile`` of every transformer layer (RMSNorm, QKV, RoPE,
  SDPA, SwiGLU, residual adds fuse); a routed MLP's router and expert kernels run eagerly
  (``RoutedMLP.routed_part`` is ``torch.compiler.disable``'d).

Not usable here: ``apply_rope_fusion`` (megatron refuses it without TE >= 1.4),
``gradient_accumulation_fusion`` (apex's ``fused_weight_gradient_mlp_cuda``),
``persist_layer_norm`` (apex's FastLayerNorm; our RMSNorm is ``F.rms_norm``),
``masked_softmax_fusion`` (apex/megatron CUDA softmax; ``SDPAttention`` already runs PyTorch's
flash / memory-efficient kernels). ``bias_dropout_fusion`` is pure ``torch.compile`` but with no
bias and no dropout it only compiles one residual add, which ``trainer.compile`` covers.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from megatron.core.models.gpt.gpt_model import GPTModel
from torch import nn

from omnimoe_train.config import ModelConfig

FUSED_CROSS_ENTROPY = ("none", "megatron", "liger")
COMPILE_MODES = ("none", "layers")


def fused_swiglu_enabled(fused_swiglu: bool | None, cuda_graphs: str, mlp: str) -> bool:
    """``model.fused_swiglu``: as set, or (null) on exactly for the OmniMoE MLP's shared branch
    replayed from CUDA graphs, where it was measured to pay. a80m on one H200, 2026-12-01:
    OmniMoE +7% graphed (three calls), +8% under compile + graphs; the dense MLP +-0 graphed,
    -5% under compile + graphs (0.5 GiB less peak memory both ways), and eager its compiled call
    made the host-bound dense step 0.70x (docs/throughput.md). The other MLPs: not measured."""
    if fused_swiglu is not None:
        return fused_swiglu
    return cuda_graphs != "none" and mlp == "omnimoe"


def transformer_config_fusions(m: ModelConfig, cuda_graphs: str) -> dict[str, Any]:
    """The TransformerConfig fields of ``model.fused_swiglu`` (resolved against ``model.mlp``
    and ``trainer.cuda_graphs``) and ``model.fused_cross_entropy``."""
    return {
        "bias_activation_fusion": fused_swiglu_enabled(m.fused_swiglu, cuda_graphs, m.mlp),
        "cross_entropy_loss_fusion": m.fused_cross_entropy == "megatron",
        "cross_entropy_fusion_impl": "native",
    }


def liger_output_processor(
    *,
    hidden_states: torch.Tensor,
    output_layer: nn.Module,
    output_weight: torch.Tensor | None,
    labels: torch.Tensor | None,
    runtime_gather_output: bool | None = None,
    **_: Any,
) -> torch.Tensor:
    """GPTModel ``output_processor``: per-token cross-entropy [B, S] (float32) of the output
    layer applied to ``hidden_states`` [S, B, D] against ``labels`` [B, S], through
    ``LigerFusedLinearCrossEntropyFunction`` (reduction ``none``; the logits exist only one
    chunk of tokens at a time). ``output_weight`` [V, D] is the tied embedding, or None for
    the output layer's own weight. Without labels: the logits [B, S, V], as GPTModel returns.
    """
    if labels is None:
        logits, _ = output_layer(
            hidden_states, weight=output_weight, runtime_gather_output=runtime_gather_output
        )
        return logits.transpose(0, 1).contiguous()
    from liger_kernel.ops.fused_linear_cross_entropy import (
        LigerFusedLinearCrossEntropyFunction,
    )

    weight_VD = output_weight if output_weight is not None else output_layer.weight
    S, B, D = hidden_states.shape
    # Tokens in [S, B] order (the hidden states' own, no copy); the labels follow them.
    loss_T = LigerFusedLinearCrossEntropyFunction.apply(
        hidden_states.reshape(S * B, D), weight_VD, labels.t().reshape(S * B), None, None,
        -100, 0.0, 0.0, "none",
    )[0]  # fmt: skip
    return loss_T.view(S, B).t().contiguous()


class LigerLossGPTModel(GPTModel):
    """megatron's GPTModel whose loss is :func:`liger_output_processor` unless the caller
    passes its own ``output_processor`` (the engines call it unchanged)."""

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        kwargs.setdefault("output_processor", liger_output_processor)
        return super().forward(*args, **kwargs)


def compile_layers(model: nn.Module, backend: str = "inductor") -> int:
    """``torch.compile`` every transformer layer of ``model`` (a GPTModel stage) and its final
    norm in place (``nn.Module.compile``: parameters, hooks and state-dict keys unchanged).
    ``backend`` is torch.compile's (``aot_eager`` checks graph capture without a compiler).
    Returns the number of modules compiled."""
    decoder = getattr(model, "decoder", None)
    if decoder is None:
        return 0
    modules = list(decoder.layers)
    if getattr(decoder, "final_layernorm", None) is not None:
        modules.append(decoder.final_layernorm)
    # Layers share their code: with parameters as graph inputs (dynamo's inlining of nn modules)
    # one graph serves them all, but guards still count per module instance.
    dynamo_config = torch._dynamo.config
    dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, 4 * len(modules))
    # megatron's RowParallelLinear passes tp_group=None, so every call warns (a deprecation,
    # with keyword arguments dynamo cannot reorder): a graph break inside each layer. Newer torch
    # can skip such calls while tracing; older torch keeps the break (correct, less fused).
    ignored = getattr(dynamo_config, "ignore_logging_functions", None)
    if ignored is not None:
        ignored.add(warnings.warn)
    for module in modules:
        module.compile(backend=backend)
    return len(modules)
