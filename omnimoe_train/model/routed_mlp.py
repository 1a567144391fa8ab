"""The frame of every routed MLP here (OmniMoE, PEER, PKM) as a megatron-core module:

    y = SwiGLU_shared(x) + routed(x)

Shape suffixes: S sequence, B batch, T = S*B tokens, D hidden, K top-k.
The optional shared branch is megatron's tensor-parallel SwiGLU ``MLP`` (``shared_expert``
setting); the routed part is the subclass's: it builds ``router`` (``x_TD`` -> ``Routing``) and
``stats`` (``ExpertStats``) and implements :meth:`RoutedMLP.routed`. The layer-spec builder, the
forward frame (route, count usage while training, add the shared branch) and the shared branch's
accounting roles are written once here, so the variants cannot drift apart in them.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from typing import Any, Self

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from omnimoe_train.model.expert_stats import ExpertStats
from omnimoe_train.model.router import Routing
from omnimoe_train.parallel.overlap import PendingExchange


def shared_mlp_submodules() -> MLPSubmodules:
    return MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)


def tp_group_of(pg_collection: ProcessGroupCollection | None) -> Any:
    """The tensor-parallel group of ``pg_collection`` (None: megatron's global one)."""
    return pg_collection.tp if pg_collection is not None else None


class RoutedMLP(MegatronModule, ABC):
    """Shared SwiGLU branch (if ``settings.shared_expert``) + the subclass's routed part.

    ``settings`` is the subclass's frozen settings dataclass; it needs a ``shared_expert`` field.
    """

    router: nn.Module
    stats: ExpertStats

    def __init__(
        self,
        config: TransformerConfig,
        settings: Any,
        pg_collection: ProcessGroupCollection | None = None,
    ) -> None:
        super().__init__(config=config)
        self.settings = settings
        # Built before the subclass's router and tables: the RNG stream draws in this order.
        self.shared = (
            MLP(config, shared_mlp_submodules(), tp_group=tp_group_of(pg_collection))
            if settings.shared_expert
            else None
        )

    @classmethod
    def as_mlp_submodule(
        cls,
        settings: Any,
        config: TransformerConfig,
        pg_collection: ProcessGroupCollection | None = None,
        is_mtp_layer: bool = False,
        name: str | None = None,
    ) -> Self:
        """Builder with the signature TransformerLayer calls for its ``mlp`` submodule."""
        del is_mtp_layer, name
        return cls(config, settings, pg_collection)

    @classmethod
    def spec(cls, settings: Any) -> functools.partial:
        return functools.partial(cls.as_mlp_submodule, settings)

    def shared_roles(self) -> dict[str, tuple[str, float, float]]:
        """``parameter_roles`` entries of the shared branch: read whole, once per token."""
        if self.shared is None:
            return {}
        return {n: ("shared MLP", 1.0, 1.0) for n, _ in self.shared.named_parameters("shared")}

    @abstractmethod
    def routed(
        self,
        x_TD: torch.Tensor,
        routing: Routing,
        early: Any = None,
        usage_N: torch.Tensor | None = None,
    ) -> torch.Tensor | PendingExchange:
        """The routed part's output ``y_TD`` for tokens ``x_TD`` and their ``routing``, or that
        output still in flight (``PendingExchange``: the forward computes the shared branch
        before finishing it). ``early``: what ``start_routed`` returned. ``usage_N``: the
        usage counter the call must add the routing's per-expert counts to (only when
        ``counts_in_routed`` said so; else None)."""

    def counts_in_routed(self, x_TD: torch.Tensor) -> bool:
        """Whether ``routed`` adds the usage counts itself for these tokens (OmniMoE's kernel
        reads them off the expert sort its backward runs anyway); False: the forward frame
        scatters them (``ExpertStats.update``)."""
        del x_TD
        return False

    def start_routed(self, x_TD: torch.Tensor) -> Any:
        """Called before routing: work of the routed part that does not need the routing
        (expert parallelism's token exchange); its result goes to ``routed``. None here."""
        del x_TD
        return None

    # Under ``trainer.compile`` the routed part runs eagerly (a graph break): its Triton kernels,
    # sorts and statistics have data-dependent shapes that dynamo would recompile or break on
    # anyway, while the shared SwiGLU around it is plain dense work that compiles well.
    @torch.compiler.disable
    def routed_part(self, hidden_SBD: torch.Tensor) -> torch.Tensor | PendingExchange:
        """Route ``hidden_SBD`` [S, B, D], count usage while training, return the routed
        part's output [S, B, D], or [T, D] still in flight between expert-parallel ranks
        (``parallel.ep_overlap``: ``finish_routed`` after the shared branch)."""
        S, B, D = hidden_SBD.shape
        x_TD = hidden_SBD.reshape(S * B, D)
        early = self.start_routed(x_TD)
        routing = self.router(x_TD)
        usage_N = None
        if self.training:  # evaluation batches stay out of the usage statistics
            if self.counts_in_routed(x_TD):
                usage_N = self.stats.counter()
                self.stats.add_entropy(routing.entropy_T)
            else:
                self.stats.update(routing.indices_TK, routing.entropy_T)
        routed = self.routed(x_TD, routing, early, usage_N)
        return routed if isinstance(routed, PendingExchange) else routed.view(S, B, D)

    @torch.compiler.disable
    def finish_routed(self, routed: PendingExchange, shape: torch.Size) -> torch.Tensor:
        """Wait for the routed output in flight; [S, B, D]."""
        return routed.finish().view(shape)

    def forward(
        self, hidden_SBD: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, None]:
        routed = self.routed_part(hidden_SBD)
        # While the routed output may still travel between ranks, the shared branch is computed
        # (and, in the backward, its backward runs while the gradient travels: parallel.overlap).
        shared_SBD = self.shared(hidden_SBD)[0] if self.shared is not None else None
        if isinstance(routed, torch.Tensor):
            y_SBD = routed
        else:
            y_SBD = self.finish_routed(routed, hidden_SBD.shape)
        if shared_SBD is not None:
            y_SBD = y_SBD + shared_SBD
        return y_SBD, None
