"""PEER (He 2024, "Mixture of A Million Experts") as a megatron-core MLP.

    y = SwiGLU_shared(x) + sum_h sum_{e in top-k_h(x)} g_he * silu(u_e . x) * v_e

A PEER expert is a single neuron with a down vector u_e and an up vector v_e; ``g_h`` is the
softmax over head h's k product-key scores. That is exactly an OmniMoE atomic expert, so the
layer *is* :class:`OmniMoEMLP` with a different router: H query heads with shared product keys
(``product_keys.ProductKeyRouter``), whose H*k selections are executed by our atomic-expert
kernels (or the token-centric gather, ``model.execution=token``, which is how PEER's reference
code runs). Everything else -- the shared SwiGLU branch (kept so that active parameters can be
matched with OmniMoE; ``model.shared_expert=false`` gives PEER's pure layer), expert-parallel
table sharding, statistics -- is inherited.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from omnimoe_train.model.omnimoe_layer import OmniMoEMLP, OmniMoESettings
from omnimoe_train.model.product_keys import ProductKeyRouter


@dataclass(frozen=True)
class PEERSettings(OmniMoESettings):
    heads: int = 8  # query heads; top_k = heads * (experts per head)
    key_dim: int = 128  # query width per head (two half-keys of key_dim / 2)


class PEERMLP(OmniMoEMLP):
    """Shared SwiGLU + N single-neuron experts retrieved by multi-head product keys."""

    settings: PEERSettings

    def build_router(self, hidden_size: int, init_std: float) -> nn.Module:
        s = self.settings
        return ProductKeyRouter(
            hidden_size,
            s.num_experts,
            s.top_k // s.heads,
            s.heads,
            s.key_dim,
            shared_keys=True,
            backend=s.backend,
            init_std=init_std,
        )

    def parameter_roles(self) -> dict[str, tuple[str, float, float]]:
        roles = super().parameter_roles()
        for name, reads in self.router.reads_per_token().items():
            roles[f"router.{name}"] = ("router", 1.0, reads)
        return roles
