"""Parameter and FLOP accounting of a model config, from the model itself built on the meta device.

The model is built exactly as the trainer builds it (same layer spec, megatron modules) for a
world-1 layout on ``torch.device("meta")``: parameters get shapes but no storage, so a 6.4B model
costs nothing to "build", and no process group is needed (megatron's layers only ask a group for
its size and rank while they are constructed; a stand-in answers 1 and 0). Every parameter is then
given a role:

- *component*: embedding, output layer, attention, norms, and the MLP's own parts (shared MLP,
  router, atomic experts, routed experts, memory values ...), declared by each MLP module's
  ``parameter_roles()`` (megatron's layers get theirs here);
- *fraction*: the share of its entries one token reads (K / N for a table of N expert rows of
  which a token uses K; 1 for dense weights);
- *reads*: how often one token's forward multiplies by each entry it reads (1; PEER's product
  keys, shared by its H heads: H; norms: 0, they are not matrix products).

Definitions (the ones ``omnimoe-params`` prints and the trainer's ``tflops`` / ``mfu`` use):

- ``total_params``: every parameter, the tied embedding once.
- ``active_params``: parameters a token uses, without the input embedding and the output layer
  (the paper's scale names count them so: A80M's tied 128,256 x 768 embedding alone is 98.5M).
- ``active_matmul_params``: multiply-accumulates of one token's forward through weights,
  i.e. sum(params x fraction x reads), the output layer included.
- ``flops_per_token``: training FLOPs per token, ``6 x active_matmul_params`` (forward 2, backward
  4 per multiply-accumulate) ``+ 12 x layers x heads x head_dim x seq_len`` for the attention
  scores and their weighted sum (PaLM's MFU convention, Chowdhery et al. 2022, App. B: no
  discount for the causal mask).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from torch import nn

from omnimoe_train.config import DataConfig, ModelConfig, RootConfig
from omnimoe_train.model.gpt import RMSNorm, layer_spec, transformer_config
from omnimoe_train.model.moe_megatron import moe_parameter_roles

EMBEDDING_COMPONENTS = ("embedding", "output layer")


@dataclass
class ComponentCount:
    name: str
    total: int  # parameters
    active: float  # parameters one token uses
    macs: float  # multiply-accumulates per token in the forward pass


@dataclass
class Accounting:
    components: list[ComponentCount]
    total_params: int
    active_params: int
    embedding_params: int
    active_matmul_params: int
    attention_flops_per_token: float
    flops_per_token: float

    def summary(self) -> dict[str, float | int]:
        return {
            "total_params": self.total_params,
            "active_params": self.active_params,
            "flops_per_token": self.flops_per_token,
            "embedding_params": self.embedding_params,
            "active_matmul_params": self.active_matmul_params,
            "attention_flops_per_token": self.attention_flops_per_token,
        }


class _OneRank:
    """Stands in for each process group of a world-1 layout while the model is constructed."""

    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0


def _world1_groups() -> ProcessGroupCollection:
    groups = ProcessGroupCollection()
    for f in dataclasses.fields(groups):
        setattr(groups, f.name, _OneRank())
    return groups


def build_meta_model(m: ModelConfig, *, seq_len: int, vocab_size: int) -> GPTModel:
    """The whole model (all layers, world-1 layout) with meta parameters, as ``gpt.build_model``
    builds a world-1 model. CUDA-only megatron calls need ``megatron_cpu`` on a CPU machine."""
    from omnimoe_train.megatron_cpu import apply_cpu_patches

    apply_cpu_patches()  # no-op when a GPU is present
    cfg = RootConfig(model=m, data=DataConfig(seq_len=seq_len))
    tconfig = transformer_config(cfg, bf16=False)
    tconfig.perform_initialization = False
    # The layers reseed the global CPU generator as they are built (model.init): restore it, so
    # counting inside a run leaves the run's random stream where it was.
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        block = TransformerBlockSubmodules(
            layer_specs=[layer_spec(cfg)] * m.num_layers, layer_norm=RMSNorm
        )
        return GPTModel(
            config=tconfig,
            transformer_layer_spec=block,
            vocab_size=vocab_size,
            max_sequence_length=seq_len,
            share_embeddings_and_output_weights=m.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=int(m.rope_base),
            pg_collection=_world1_groups(),
        )


def _mlp_roles(mlp: nn.Module) -> dict[str, tuple[str, float, float]]:
    if hasattr(mlp, "parameter_roles"):
        return mlp.parameter_roles()
    if isinstance(mlp, MoELayer):
        return moe_parameter_roles(mlp)
    return {name: ("MLP", 1.0, 1.0) for name, _ in mlp.named_parameters()}  # megatron's dense MLP


def parameter_roles(model: GPTModel) -> dict[str, tuple[str, float, float]]:
    """Full parameter name -> (component, fraction a token reads, reads per token)."""
    roles: dict[str, tuple[str, float, float]] = {}
    tied = model.share_embeddings_and_output_weights
    for name, _ in model.named_parameters():
        if name == "embedding.word_embeddings.weight":
            # Tied: the same matrix is also the output layer, one matmul per token.
            roles[name] = ("embedding", 0.0, 1.0 if tied else 0.0)
        elif name == "output_layer.weight":
            roles[name] = ("output layer", 0.0, 1.0)
        elif ".self_attention." in name:
            roles[name] = ("attention", 1.0, 1.0)
        elif name.endswith("layernorm.weight"):
            roles[name] = ("norms", 1.0, 0.0)
    for index, layer in enumerate(model.decoder.layers):
        prefix = f"decoder.layers.{index}.mlp."
        roles |= {prefix + n: role for n, role in _mlp_roles(layer.mlp).items()}
    unknown = [n for n, _ in model.named_parameters() if n not in roles]
    if unknown:
        raise ValueError(f"accounting has no role for parameters {unknown[:3]}")
    return roles


def count(model: GPTModel, *, seq_len: int) -> Accounting:
    """Component table and totals of a (meta or real, world-1) model; see the module docstring."""
    roles = parameter_roles(model)
    components: dict[str, ComponentCount] = {}
    for name, param in model.named_parameters():
        component, fraction, reads = roles[name]
        c = components.setdefault(component, ComponentCount(component, 0, 0.0, 0.0))
        numel = param.numel()
        c.total += numel
        if component in EMBEDDING_COMPONENTS:
            c.macs += numel * reads  # the output projection reads the whole matrix per token
        else:
            c.active += numel * fraction
            c.macs += numel * fraction * reads
    tc = model.config
    attention = 12.0 * tc.num_layers * tc.num_attention_heads * tc.kv_channels * seq_len
    macs = sum(c.macs for c in components.values())
    return Accounting(
        components=list(components.values()),
        total_params=sum(c.total for c in components.values()),
        active_params=round(sum(c.active for c in components.values())),
        embedding_params=sum(
            c.total for c in components.values() if c.name in EMBEDDING_COMPONENTS
        ),
        active_matmul_params=round(macs),
        attention_flops_per_token=attention,
        flops_per_token=6.0 * macs + attention,
    )


def model_accounting(m: ModelConfig, *, seq_len: int, vocab_size: int) -> Accounting:
    """Accounting of ``m`` at ``seq_len`` with a ``vocab_size``-row embedding, built on meta."""
    return count(build_meta_model(m, seq_len=seq_len, vocab_size=vocab_size), seq_len=seq_len)
