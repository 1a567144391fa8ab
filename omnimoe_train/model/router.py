"""Routers of the atomic-expert layer: the Cartesian product router (O(sqrt(N)) scoring of
N = n*n atomic experts) and the dense-router ablation of the paper's Table 3.

Shape suffixes: T tokens, D hidden, n router half (sqrt(N)), N experts, K top-k.

Two gates map a token to row and column scores (n each); each is normalised by BatchNorm without
affine parameters (the reference code's choice: it keeps both halves on one scale so neither
dominates the sum) and turned into log-probabilities. The score of expert (i, j) is
``row_i + col_j`` -- the log-probability under the product distribution -- and the K best of
all n*n sums are found exactly by ``omnimoe_kernels.cartesian_topk``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

import omnimoe_kernels
from omnimoe_train.model import router_gates


class Routing(NamedTuple):
    # A named tuple (not a dataclass) so that hooks which walk a module's outputs -- ZeRO-3's
    # re-gather of the router's gates before its backward -- find the tensors.
    weights_TK: torch.Tensor  # fp32 routing weights of the K selected experts
    indices_TK: torch.Tensor  # int64 expert ids i*n + j
    entropy_T: torch.Tensor  # entropy (nats) of each token's full n*n routing distribution
    # No expert id twice in a token's row (exact top-K over distinct experts guarantees it): the
    # expert kernels' dense weight-gradient path then skips merging repeats.
    distinct_ids: bool = False
    # Each token's K ids in ascending order (both routers sort them): under the expert-parallel
    # ``rows`` layout a token's pairs on a rank, whose experts are one contiguous id block, are
    # then one run of its slots, and the combine kernels walk only that run.
    ascending_ids: bool = False


def square_side(count: int, name: str) -> int:
    """``n`` with ``n * n == count``: the side of a Cartesian grid of ``count`` experts or slots.
    Raises ``ValueError`` naming ``name`` when ``count`` is not a perfect square."""
    n = math.isqrt(count)
    if n * n != count:
        raise ValueError(f"{name}={count} is not a perfect square")
    return n


def selected_weights(scores_TK: torch.Tensor, mode: str) -> torch.Tensor:
    """Routing weights ``weights_TK`` of the K selected experts from their log-probability
    scores: ``softmax`` renormalises over the K (paper Eq. 2), ``exp`` keeps the probability
    itself (the reference code)."""
    if mode == "softmax":
        return torch.softmax(scores_TK, dim=-1)
    return scores_TK.exp()


class GateNorm(nn.Module):
    """BatchNorm1d(affine=False) over tokens, always computed in fp32.

    Written out (rather than nn.BatchNorm1d) so the running statistics stay fp32 whatever the
    model's parameter dtype, and so a batch of zero tokens is a no-op instead of an error.

    ``stats_group`` (set under sequence parallelism, where each TP rank holds a slice of the
    sequence): the batch mean and variance are summed over that group, differentiably, so they
    are those of the whole micro-batch, exactly as one process computes them. Data-parallel
    ranks still normalise over their own micro-batch (as the reference code does per batch).

    Running statistics: one process applies the EMA once per training micro-batch, in order.
    With ``pending`` set to a list (the engine does), each training forward records its
    micro-batch's (mean, unbiased variance) there instead, and :func:`apply_running_stats`
    applies the records of the whole data-parallel group at the end of the step in global
    micro-batch order: every replica ends the step with the running statistics one process
    computes from the same global batch (megatron's DDP syncs parameters, not buffers).
    """

    def __init__(self, n: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.register_buffer("running_mean", torch.zeros(n, dtype=torch.float32))
        self.register_buffer("running_var", torch.ones(n, dtype=torch.float32))
        self.stats_group: ProcessGroup | None = None
        self.pending: list[torch.Tensor] | None = None  # (2, n) records; None = apply at once

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.stats_group is None:
            return t
        # Backward all-reduces too: each rank's loss depends on every rank's tokens via the stats.
        return dist_nn.all_reduce(t, group=self.stats_group)

    def uses_batch_stats(self, num_tokens: int) -> bool:
        """Whether a forward of ``num_tokens`` local tokens normalises with batch statistics."""
        # Every rank of the group holds the same number of tokens (an equal slice of the sequence).
        group_size = 1 if self.stats_group is None else dist.get_world_size(self.stats_group)
        return self.training and num_tokens * group_size > 1

    @torch.no_grad()
    def record(self, stats_2n: torch.Tensor) -> None:
        """Feed one training micro-batch's (mean, unbiased variance) to the running averages."""
        if self.pending is not None:
            self.pending.append(stats_2n)
        else:
            self.running_mean.lerp_(stats_2n[0], self.momentum)
            self.running_var.lerp_(stats_2n[1], self.momentum)

    def forward(self, z_Tn: torch.Tensor) -> torch.Tensor:
        group_size = 1 if self.stats_group is None else dist.get_world_size(self.stats_group)
        tokens = z_Tn.shape[0] * group_size
        if self.uses_batch_stats(z_Tn.shape[0]):
            mean_n = self._sum(z_Tn.sum(0)) / tokens
            var_n = self._sum((z_Tn - mean_n).square().sum(0)) / tokens
            self.record(torch.stack([mean_n.detach(), var_n.detach() * (tokens / (tokens - 1))]))
        else:
            mean_n, var_n = self.running_mean, self.running_var
        return (z_Tn - mean_n) * torch.rsqrt(var_n + self.eps)


class GateNormSnapshot:
    """A copy of every router BatchNorm statistic in some modules, to undo a step's forward.

    A skipped (bad) step must leave the model as it was, and its forward has already moved the
    running statistics (possibly to NaN). ``save`` before the forward, ``restore`` to undo it:
    a few n-vectors per layer, copied on the device. Used by every engine.
    """

    def __init__(self, modules: list[nn.Module]) -> None:
        self.buffers = [
            buf
            for module in modules
            for m in module.modules()
            if isinstance(m, GateNorm)
            for buf in (m.running_mean, m.running_var)
        ]
        self.saved = [buf.detach().clone() for buf in self.buffers]

    @torch.no_grad()
    def save(self) -> None:
        for saved, buf in zip(self.saved, self.buffers, strict=True):
            saved.copy_(buf)

    @torch.no_grad()
    def restore(self) -> None:
        for saved, buf in zip(self.saved, self.buffers, strict=True):
            buf.copy_(saved)


@torch.no_grad()
def apply_running_stats(norms: list[GateNorm], group: ProcessGroup | None) -> None:
    """Apply the step's recorded batch statistics of ``norms`` (this rank's GateNorms, in module
    order) on every rank of the data-parallel ``group``, as one process would.

    Contract (the data loader's): data-parallel rank r runs global micro-batches r*m .. r*m+m-1
    of each step (the contiguous r-th slice of the global batch), so the records gathered from
    the group in rank order are the global micro-batch order. Every rank of the group holds the
    same gates (same pipeline stage) with the same number m of records; under sequence
    parallelism the records are already those of the whole micro-batch (summed over TP), so
    the TP ranks of a replica gather identical records. Cost: one all-gather of 2 * n floats
    per gate per micro-batch, then one ``_foreach_lerp_`` per global micro-batch and buffer
    (the arithmetic of the immediate ``lerp_``, in the same order); no host synchronisation.
    """
    norms = [g for g in norms if g.pending]
    if not norms:
        return
    local = torch.cat([torch.stack(g.pending).flatten() for g in norms])
    if group is not None and dist.get_world_size(group) > 1:
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, local, group=group)
    else:
        gathered = [local]
    per_gate, offset = [], 0  # per gate: (dp * m, 2, n) records in global micro-batch order
    for g in norms:
        m, n = len(g.pending), g.running_mean.numel()
        parts = [buf[offset : offset + m * 2 * n].view(m, 2, n) for buf in gathered]
        per_gate.append(torch.cat(parts))
        offset += m * 2 * n
        g.pending.clear()
    momentum = norms[0].momentum
    if any(g.momentum != momentum for g in norms):
        raise ValueError("apply_running_stats: every GateNorm must have the same momentum")
    for j in range(per_gate[0].shape[0]):
        torch._foreach_lerp_([g.running_mean for g in norms], [r[j, 0] for r in per_gate], momentum)
        torch._foreach_lerp_([g.running_var for g in norms], [r[j, 1] for r in per_gate], momentum)


class CartesianRouter(nn.Module):
    """Routes each token to K of N = n*n atomic experts with O(n) gate work."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        *,
        norm: str = "batchnorm",
        weights: str = "softmax",
        backend: str = "auto",
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        n = square_side(num_experts, "num_experts")
        self.n, self.top_k, self.weights, self.backend = n, top_k, weights, backend
        # Router parameters stay fp32 even in a bf16 model: top-k over near-equal bf16 sums
        # would be decided by rounding.
        self.row_gate_nD = nn.Parameter(torch.empty(n, hidden_size, dtype=torch.float32))
        self.col_gate_nD = nn.Parameter(torch.empty(n, hidden_size, dtype=torch.float32))
        nn.init.normal_(self.row_gate_nD, std=init_std)
        nn.init.normal_(self.col_gate_nD, std=init_std)
        make_norm = (lambda: GateNorm(n)) if norm == "batchnorm" else nn.Identity
        self.row_norm, self.col_norm = make_norm(), make_norm()
        self.fused = True  # one autograd node for the gates (``router_gates``); False: PyTorch ops

    def forward(self, x_TD: torch.Tensor) -> Routing:
        (rows_Tn, cols_Tn), entropy_T = gate_log_probs(
            x_TD,
            [self.row_gate_nD, self.col_gate_nD],
            [self.row_norm, self.col_norm],
            self.fused,
            backend=self.backend,
        )
        scores_TK, indices_TK = omnimoe_kernels.cartesian_topk(
            rows_Tn, cols_Tn, self.top_k, backend=self.backend
        )
        weights_TK = selected_weights(scores_TK, self.weights)
        return Routing(weights_TK, indices_TK, entropy_T, distinct_ids=True, ascending_ids=True)


def gate_log_probs(
    x_TD: torch.Tensor,
    gates: list[torch.Tensor],
    norms: list[nn.Module],
    fused: bool = True,
    *,
    backend: str = "auto",
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``log_softmax(norm_g(x @ gate_g^T))`` for each gate g, and the entropy.

    Returns ``[logp_Tn]`` (one (T, n) tensor per gate) and ``entropy_T`` (nats, no gradient) of
    the product distribution: H(p_1 x ... x p_G) = sum_g H(p_g). fp32 (or fp64 in tests)
    whatever the model dtype; the gates too, since DeepSpeed's bf16 mode stores every parameter
    (these included) in bf16 and keeps fp32 master copies. ``fused`` (the default) runs
    :func:`omnimoe_train.model.router_gates.gate_log_probs`, one autograd node; ``False`` runs
    the same arithmetic as separate PyTorch ops (the reference the tests compare against).
    ``backend`` picks the fused node's implementation (its Triton kernels or its PyTorch ops).
    """
    gate_norms = [m for m in norms if isinstance(m, GateNorm)]
    if fused and (not gate_norms or len(gate_norms) == len(norms)):
        stats: str | tuple[torch.Tensor, torch.Tensor] | None = None
        group, eps = None, 1e-5
        if gate_norms:
            first = gate_norms[0]
            group, eps = first.stats_group, first.eps
            if first.uses_batch_stats(x_TD.shape[0]):
                stats = "batch"
            else:
                stats = (
                    torch.cat([m.running_mean for m in gate_norms]),
                    torch.cat([m.running_var for m in gate_norms]),
                )
        logp, entropy_T, stats_2H = router_gates.gate_log_probs(
            x_TD, gates, stats=stats, eps=eps, group=group, backend=backend
        )
        if stats_2H is not None:
            for m, part in zip(gate_norms, stats_2H.chunk(len(gate_norms), dim=1), strict=True):
                m.record(part.contiguous())
        return logp, entropy_T
    dtype = torch.promote_types(gates[0].dtype, torch.float32)
    x_TD = x_TD.to(dtype)
    logp = [
        F.log_softmax(norm(x_TD @ gate.to(dtype).t()), dim=-1)
        for gate, norm in zip(gates, norms, strict=True)
    ]
    with torch.no_grad():
        entropy_T = sum(-(lp.exp() * lp).sum(-1) for lp in logp)
    return logp, entropy_T


class DenseRouter(nn.Module):
    """Ablation (paper Table 3, "dense router"): one gate scores all N experts, exact top-K.

    ``logp_TN = log_softmax(norm(x @ gate^T))``; the K largest are selected by ``torch.topk`` over
    the materialised [T, N] scores (O(N) per token, the cost the Cartesian factorisation avoids).
    Weights and entropy follow :class:`CartesianRouter` (softmax over the K scores, or exp), so
    with ``gate[i*n + j] = row_gate[i] + col_gate[j]`` and no norm it routes exactly as the
    Cartesian router does. Indices are returned in ascending expert-id order, like the kernel.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        *,
        norm: str = "batchnorm",
        weights: str = "softmax",
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.top_k, self.weights = top_k, weights
        # fp32 for the same reason as the Cartesian gates.
        self.gate_ND = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32))
        nn.init.normal_(self.gate_ND, std=init_std)
        self.norm = GateNorm(num_experts) if norm == "batchnorm" else nn.Identity()
        self.fused = True

    def forward(self, x_TD: torch.Tensor) -> Routing:
        (logp_TN,), entropy_T = gate_log_probs(x_TD, [self.gate_ND], [self.norm], self.fused)
        scores_TK, indices_TK = torch.topk(logp_TN, self.top_k, dim=-1)
        indices_TK, order_TK = indices_TK.sort(dim=-1)
        scores_TK = scores_TK.gather(-1, order_TK)
        weights_TK = selected_weights(scores_TK, self.weights)
        return Routing(weights_TK, indices_TK, entropy_T, distinct_ids=True, ascending_ids=True)
