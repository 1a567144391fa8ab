"""The OmniMoE MLP as a megatron-core module, plugged into GPT through the layer spec.

    y = SwiGLU_shared(x) + sum_k w_k * silu(U[e_k] . x) * V[e_k]

The paper's Table 3 ablations are settings of the same module: ``shared_expert=False``,
``router="dense"`` (one gate over all N, ``router.DenseRouter``) and ``execution="token"`` (each
token gathers its K rows, ``omnimoe_kernels.atomic_experts_gather``, instead of the
expert-centric kernels). PEER (``peer.py``) is this module with a multi-head product-key router.

Shape suffixes: S sequence, B batch, T = S*B tokens, D hidden, N experts, K top-k.
The shared branch and the forward frame are ``routed_mlp.RoutedMLP``'s; the router and the
expert tables are plain parameters. With ep > 1 (``settings.table_sharding`` rows or dim) the
layer holds only this rank's shard of U and V (the ``_ND`` names are kept so checkpoint keys do
not depend on the layout), drawn as the matching slice of the full tables
(``model.init.init_table_shard``), and ``parallel.setup.apply_parallelism`` attaches an
``ExpertParallel`` dispatch that the forward calls instead of the local kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedStateDict, ShardedTensor
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

import omnimoe_kernels
from omnimoe_train.model.expert_stats import ExpertStats
from omnimoe_train.model.init import draw_seed, init_table_shard
from omnimoe_train.model.routed_mlp import RoutedMLP
from omnimoe_train.model.router import CartesianRouter, DenseRouter, Routing

if TYPE_CHECKING:  # the model does not import the dispatch; parallel.setup attaches it
    from omnimoe_train.parallel.expert_parallel import ExpertParallel
    from omnimoe_train.parallel.overlap import PendingExchange, TokensInFlight


@dataclass(frozen=True)
class OmniMoESettings:
    num_experts: int
    top_k: int
    shared_expert: bool = True
    router: str = "cartesian"  # cartesian | dense (Table 3 ablation)
    execution: str = "expert"  # expert | token (Table 3 ablation: per-token gather)
    router_norm: str = "batchnorm"
    router_weights: str = "softmax"
    backend: str = "auto"
    deterministic: bool = False
    table_sharding: str = "none"  # none | rows | dim: which EP shard of U, V this rank holds


def table_shard(mode: str, num_experts: int, hidden: int) -> tuple[tuple[int, int], ...]:
    """(rows, cols) ranges of the (N, D) tables this rank holds: all of them for ``none``, its
    expert-id block for ``rows``, its column block for ``dim`` (expert-parallel rank and size
    from megatron's parallel state)."""
    rows, cols = (0, num_experts), (0, hidden)
    if mode == "none":
        return rows, cols
    if mode not in ("rows", "dim"):
        raise ValueError(f"table_sharding={mode!r} must be none, rows or dim")
    from megatron.core import parallel_state

    rank = parallel_state.get_expert_model_parallel_rank()
    size = parallel_state.get_expert_model_parallel_world_size()
    if mode == "rows":
        return (rank * num_experts // size, (rank + 1) * num_experts // size), cols
    return rows, (rank * hidden // size, (rank + 1) * hidden // size)


class OmniMoEMLP(RoutedMLP):
    """Shared SwiGLU branch + N atomic experts chosen by a Cartesian product router."""

    settings: OmniMoESettings

    def __init__(
        self,
        config: TransformerConfig,
        settings: OmniMoESettings,
        pg_collection: ProcessGroupCollection | None = None,
    ) -> None:
        super().__init__(config, settings, pg_collection)
        D, N = config.hidden_size, settings.num_experts
        self.router = self.build_router(D, config.init_method_std)
        # U reads the token (like an fc1 row); V writes the residual stream (like an fc2 column),
        # so V takes the depth-scaled output init.
        rows, cols = table_shard(settings.table_sharding, N, D)
        shape = (rows[1] - rows[0], cols[1] - cols[0])
        self.up_ND = nn.Parameter(torch.empty(shape, dtype=config.params_dtype))
        self.down_ND = nn.Parameter(torch.empty(shape, dtype=config.params_dtype))
        up_seed, down_seed = draw_seed(), draw_seed()
        init_table_shard(self.up_ND, (N, D), config.init_method, up_seed, rows, cols)
        init_table_shard(
            self.down_ND, (N, D), config.output_layer_init_method, down_seed, rows, cols
        )
        self.stats = ExpertStats(N)
        # Set by parallel.setup when the tables are sharded over the expert-parallel group.
        self.expert_parallel: ExpertParallel | None = None

    def build_router(self, hidden_size: int, init_std: float) -> nn.Module:
        """The module that maps ``x_TD`` to a ``Routing`` (subclasses bring their own)."""
        s = self.settings
        options = {"norm": s.router_norm, "weights": s.router_weights, "init_std": init_std}
        if s.router == "dense":
            return DenseRouter(hidden_size, s.num_experts, s.top_k, **options)
        return CartesianRouter(hidden_size, s.num_experts, s.top_k, backend=s.backend, **options)

    def parameter_roles(self) -> dict[str, tuple[str, float, float]]:
        """Local parameter name -> (component, fraction a token reads, reads per token).

        Used by ``model.accounting``: a token reads K of the N rows of U and V; the router gates
        and the shared branch are read whole, once.
        """
        sparse = self.settings.top_k / self.settings.num_experts
        roles = {name: ("router", 1.0, 1.0) for name, _ in self.router.named_parameters("router")}
        roles |= {"up_ND": ("atomic experts", sparse, 1.0)}
        roles |= {"down_ND": ("atomic experts", sparse, 1.0)}
        return roles | self.shared_roles()

    def sharded_state_dict(
        self,
        prefix: str = "",
        sharded_offsets: tuple[tuple[int, int, int], ...] = (),
        metadata: dict | None = None,
    ) -> ShardedStateDict:
        """megatron's default (shared MLP TP-sharded, router + BatchNorm buffers replicated),
        with the expert tables described as the global ``[N, D]`` tensors they are shards of.

        ep = 1: replicated (megatron's default). ep > 1, ``rows``: this rank holds rows
        ``r*N/P..(r+1)*N/P`` (axis 0); ``dim``: columns ``r*D/P..(r+1)*D/P`` (axis 1), P the
        expert-parallel size, r the rank in it. The expert-data-parallel replicas of a shard
        (same r) differ in ``replica_id``. So a checkpoint loads under either mode and any ep.
        """
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        mode = self.settings.table_sharding  # the shard held: see table_shard
        if mode == "none":
            return state
        axis = len(sharded_offsets) + (0 if mode == "rows" else 1)
        shard = (
            axis,
            parallel_state.get_expert_model_parallel_rank(),
            parallel_state.get_expert_model_parallel_world_size(),
        )
        replica_id = (0, 0, parallel_state.get_expert_data_parallel_rank())
        tables = (self.up_ND, self.down_ND)
        for name, entry in list(state.items()):
            if isinstance(entry, ShardedTensor) and any(entry.data is t for t in tables):
                state[name] = ShardedTensor.from_rank_offsets(
                    entry.key,
                    entry.data,
                    *sharded_offsets,
                    shard,
                    replica_id=replica_id,
                    prepend_axis_num=len(sharded_offsets),
                )
        return state

    def start_routed(self, x_TD: torch.Tensor) -> TokensInFlight | None:
        """With sharded tables and ``parallel.ep_overlap``: the token exchange, issued before
        routing (the tokens do not depend on it)."""
        return self.expert_parallel.start(x_TD) if self.expert_parallel is not None else None

    def counts_in_routed(self, x_TD: torch.Tensor) -> bool:
        """The local Triton kernel with a backward to come counts usage off its expert sort
        (the frame's scatter of T * K ones cost 1% of the a80m step: docs/benchmarks.md)."""
        return (
            self.expert_parallel is None
            and self.settings.execution == "expert"
            and omnimoe_kernels.resolve_backend(self.settings.backend, x_TD.device) == "triton"
            and torch.is_grad_enabled()
            and self.up_ND.requires_grad
        )

    def routed(
        self,
        x_TD: torch.Tensor,
        routing: Routing,
        early: TokensInFlight | None = None,
        usage_N: torch.Tensor | None = None,
    ) -> torch.Tensor | PendingExchange:
        """The atomic experts' sum: the local kernel (expert- or token-centric), or the
        expert-parallel dispatch when the tables are sharded (with ``early``, the overlapped
        one: the output comes back in flight). ``usage_N``: see ``counts_in_routed``."""
        if self.expert_parallel is None and self.settings.execution == "token":
            return omnimoe_kernels.atomic_experts_gather(
                x_TD, self.up_ND, self.down_ND, routing.weights_TK, routing.indices_TK
            )
        if self.expert_parallel is None:
            return omnimoe_kernels.atomic_experts(
                x_TD,
                self.up_ND,
                self.down_ND,
                routing.weights_TK,
                routing.indices_TK,
                backend=self.settings.backend,
                deterministic=self.settings.deterministic,
                distinct_ids=routing.distinct_ids,
                valid_ids=True,  # the routers emit ids < N only; "no expert" is EP's
                usage_N=usage_N,
            )
        return self.expert_parallel(
            x_TD,
            self.up_ND,
            self.down_ND,
            routing.weights_TK,
            routing.indices_TK,
            record=self.training,
            early=early,
            distinct_ids=routing.distinct_ids,
            ascending_ids=routing.ascending_ids,
        )
