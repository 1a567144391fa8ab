"""Product-key memory (Lample et al. 2019, "Large Memory Layers with Product Keys") as a
megatron-core MLP.

    y = SwiGLU_shared(x) + sum_h sum_{i in top-k_h(x)} w_hi * values[i]

Shape suffixes: S sequence, B batch, T = S*B tokens, D hidden, N memory slots, K = H*k.
The multi-head product-key top-k with query BatchNorm is ``product_keys.ProductKeyRouter`` (each
head has its own sub-keys, as in PKM; the search is our exact Cartesian top-K kernel). The value
lookup is a weighted sum of K rows of the [N, D] value table: ``torch.nn.functional.embedding_bag``
with per-sample weights, PyTorch's fused gather-and-reduce (its backward scatters into the table
without a [T, K, D] intermediate). The atomic-expert kernel does not fit here: it multiplies each
row by ``silu(u . x)``, which a memory value has no counterpart of.

The shared SwiGLU branch is kept (as in OmniMoE and our PEER) so active parameters can be matched;
``model.shared_expert=false`` leaves the memory alone. Under sequence parallelism each TP rank
routes its own slice of tokens, so the router and the value table are marked
``sequence_parallel`` (megatron's ``finalize_model_grads`` sums their grads over TP, as it does for
its own router) and the query BatchNorm statistics are summed over the TP group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from omnimoe_train.model.expert_stats import ExpertStats
from omnimoe_train.model.product_keys import ProductKeyRouter
from omnimoe_train.model.routed_mlp import RoutedMLP, tp_group_of
from omnimoe_train.model.router import GateNorm, Routing


@dataclass(frozen=True)
class PKMSettings:
    num_slots: int  # N = n*n memory values
    top_k: int  # values read per token, over all heads
    heads: int = 4
    key_dim: int = 256
    shared_expert: bool = True
    backend: str = "auto"


class PKMMLP(RoutedMLP):
    """Shared SwiGLU + a product-key memory of N value rows."""

    settings: PKMSettings

    def __init__(
        self,
        config: TransformerConfig,
        settings: PKMSettings,
        pg_collection: ProcessGroupCollection | None = None,
    ) -> None:
        super().__init__(config, settings, pg_collection)
        self.router = ProductKeyRouter(
            config.hidden_size,
            settings.num_slots,
            settings.top_k // settings.heads,
            settings.heads,
            settings.key_dim,
            shared_keys=False,
            backend=settings.backend,
            init_std=config.init_method_std,
        )
        # Values write the residual stream (like an fc2 column): the depth-scaled output init.
        self.values_ND = nn.Parameter(
            torch.empty(settings.num_slots, config.hidden_size, dtype=config.params_dtype)
        )
        config.output_layer_init_method(self.values_ND)
        self.stats = ExpertStats(settings.num_slots)
        if config.sequence_parallel and config.tensor_model_parallel_size > 1:
            for param in [*self.router.parameters(), self.values_ND]:
                param.sequence_parallel = True
            for module in self.router.modules():
                if isinstance(module, GateNorm):
                    module.stats_group = tp_group_of(pg_collection)

    def parameter_roles(self) -> dict[str, tuple[str, float, float]]:
        """Local parameter name -> (component, fraction a token reads, reads per token)."""
        reads = self.router.reads_per_token()
        roles = {
            f"router.{n}": ("router", 1.0, reads[n]) for n, _ in self.router.named_parameters()
        }
        roles["values_ND"] = ("memory values", self.settings.top_k / self.settings.num_slots, 1.0)
        return roles | self.shared_roles()

    def routed(
        self,
        x_TD: torch.Tensor,
        routing: Routing,
        early: object = None,
        usage_N: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The weighted sum of each token's K value rows (``early``: always None, the value
        table is not sharded; ``usage_N``: always None, the frame counts usage)."""
        # fp32 lookup: the K-term sum accumulates in fp32, and CUDA's embedding_bag has no bf16
        # backward for per-sample weights (the cast costs one pass over the [N, D] table).
        values_ND = self.values_ND.to(torch.promote_types(self.values_ND.dtype, torch.float32))
        return F.embedding_bag(
            routing.indices_TK,
            values_ND,
            per_sample_weights=routing.weights_TK.to(values_ND.dtype),
            mode="sum",
        ).to(x_TD.dtype)
