"""The router gate scores on the Triton kernels of ``router_gates``, as one autograd node.

Shape suffixes: T tokens, D hidden, G gates (2 for the Cartesian router, 1 for the dense one),
n scores per gate, H = G * n.

    forward:  z_TH = x_TD W_HD^T (fp32 result, cuBLAS); [batch statistics:
              ``column_partials`` + ``column_stats``]; ``gates_forward`` (normalise in place ->
              zh, log-softmax per gate, entropy)
    backward: ``gates_backward`` (dzh, and its per-program column sums for batch statistics);
              [the partials summed by ``torch.sum`` (a fixed-order reduction) and
              ``batchnorm_backward``]; dx = dz W, dW = dz^T x (fp32 results, cuBLAS)

The GEMMs (``omnimoe_kernels.gate_gemms``): with a bf16 x, bf16 tensor-core GEMMs with fp32
accumulation on the fp32 operands split exactly into three bf16 pieces each (fp32 accuracy
for z and dW, dx well inside its bf16 rounding; the exactness argument is in that module);
with fp32 x, or ``gate_gemms.GATE_GEMM = "fp32"``, fp32 SGEMMs on fp32 copies of x (bitwise
the node as before). Both are run-to-run deterministic.

Saved for the backward: x as given, W (fp32), zh (T, H) fp32 and rstd (H,): not y (the
softmax is recomputed from zh), one T x H fp32 matrix less per layer than the PyTorch node.

With a statistics group (sequence parallelism) the sums over tokens are all-reduced between
the kernels: S, then M2 forward (three ``column_stats`` phases), the two backward column sums
once, as the PyTorch path (``omnimoe_train.model.router_gates``) does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from omnimoe_kernels import gate_gemms
from omnimoe_kernels.gate_outputs import gate_outputs
from omnimoe_kernels.limits import GATES_MAX_SCORES
from omnimoe_kernels.router_gates import (
    batchnorm_backward,
    column_partials,
    column_stats,
    gates_backward,
    gates_forward,
)

Stats = str | tuple[torch.Tensor, torch.Tensor] | None


def _batch_stats(
    z_TH: torch.Tensor, eps: float, group: ProcessGroup | None, tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean_H, rstd_H, stats_2H = (mean, unbiased variance)) of z over the group's tokens."""
    T, H = z_TH.shape
    part = column_partials(z_TH)
    sum_H = torch.empty(H, dtype=torch.float32, device=z_TH.device)
    m2_H = torch.empty_like(sum_H)
    if group is None:
        return column_stats(z_TH, part, T, tokens, eps, "all", sum_H, m2_H)
    column_stats(z_TH, part, T, tokens, eps, "sum", sum_H, m2_H)
    dist.all_reduce(sum_H, group=group)
    column_stats(z_TH, part, T, tokens, eps, "m2", sum_H, m2_H)
    dist.all_reduce(m2_H, group=group)
    return column_stats(z_TH, part, T, tokens, eps, "finish", sum_H, m2_H)


class GateLogProbs(torch.autograd.Function):
    """Outputs: G contiguous (T, n) log-probabilities, entropy_T, and for batch statistics
    stats_2H (the last two without gradient). See :func:`gate_log_probs_triton`."""

    @staticmethod
    def forward(ctx, x_TD, stats: Stats, eps: float, group, group_size: int, *gates_nD):
        w_HD = torch.cat([g.float() for g in gates_nD])
        # fp32 even under autocast; a fresh (T, H) tensor: the kernels write zh into it.
        split = gate_gemms.use_split(x_TD, w_HD.shape[0])
        if split:
            z_TH = gate_gemms.gate_scores(x_TD, w_HD)
        else:
            with torch.autocast(x_TD.device.type, enabled=False):
                z_TH = x_TD.float() @ w_HD.t()
        tokens = x_TD.shape[0] * group_size
        num_gates = len(gates_nD)
        batch_stats = rstd_H = None
        if stats == "batch":
            mean_H, rstd_H, batch_stats = _batch_stats(z_TH, eps, group, tokens)
        elif stats is not None:
            mean_H = stats[0].float().contiguous()
            rstd_H = torch.rsqrt(stats[1].float() + eps)
        else:
            mean_H = None
        y_GTn, entropy_T = gates_forward(z_TH, num_gates, mean_H, rstd_H)
        ctx.save_for_backward(x_TD, w_HD, z_TH, rstd_H)
        ctx.batch, ctx.group, ctx.tokens = stats == "batch", group, tokens
        ctx.split = split  # the backward's GEMMs follow the forward's, whatever GATE_GEMM is now
        ctx.gate_shapes = [(g.shape, g.dtype) for g in gates_nD]
        # y_GTn[g] is a contiguous (T, n) view: what the top-K kernel reads without a copy.
        return gate_outputs(ctx, y_GTn.unbind(0), entropy_T, batch_stats)

    @staticmethod
    def backward(ctx, *grads):
        x_TD, w_HD, zh_TH, rstd_H = ctx.saved_tensors
        num_gates = len(ctx.gate_shapes)
        dys = [g.float() for g in grads[:num_gates]]  # autograd materialises unused ones
        dz_TH, part = gates_backward(zh_TH, dys, None if ctx.batch else rstd_H, ctx.batch)
        if ctx.batch:
            sums_2H = part.sum(0)
            if ctx.group is not None:
                dist.all_reduce(sums_2H, group=ctx.group)
            batchnorm_backward(dz_TH, zh_TH, sums_2H, rstd_H, ctx.tokens)
        if ctx.split:
            dx_TD, dw_HD = gate_gemms.gate_grads(dz_TH, x_TD, w_HD, ctx.needs_input_grad[0])
            dx_TD = None if dx_TD is None else dx_TD.to(x_TD.dtype)
        else:
            dx_TD = (dz_TH @ w_HD).to(x_TD.dtype) if ctx.needs_input_grad[0] else None
            dw_HD = dz_TH.t() @ x_TD.float()
        sizes = [shape[0] for shape, _ in ctx.gate_shapes]
        dgates = [
            dw.to(dtype).view(shape)
            for dw, (shape, dtype) in zip(dw_HD.split(sizes), ctx.gate_shapes, strict=True)
        ]
        return (dx_TD, None, None, None, None, *dgates)


def supports(x_TD: torch.Tensor, gates: list[torch.Tensor]) -> bool:
    """Whether the kernels take this call: fp32 arithmetic (gates of at most fp32), one or
    two gates of at most ``GATES_MAX_SCORES`` scores, at least one token."""
    dtype = torch.promote_types(gates[0].dtype, torch.float32)
    return (
        dtype == torch.float32
        and 1 <= len(gates) <= 2
        and gates[0].shape[0] <= GATES_MAX_SCORES
        and x_TD.shape[0] > 0
    )


def gate_log_probs_triton(
    x_TD: torch.Tensor,
    gates: list[torch.Tensor],
    *,
    stats: Stats,
    eps: float = 1e-5,
    group: ProcessGroup | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """``log_softmax(norm(x @ W_g^T))`` per gate g, the entropy and the batch statistics.

    ``x_TD`` (T, D), any float dtype (bf16: split-bf16 GEMMs, ``gate_gemms``; else cast to
    fp32 for fp32 GEMMs; dx comes back in its dtype);
    ``gates``: G in {1, 2} tensors (n, D) of fp32 or narrower, n <= ``GATES_MAX_SCORES``, equal
    shapes. ``stats``: "batch" (normalise with this micro-batch's mean and biased variance,
    summed over ``group``), ``(running_mean_H, running_var_H)`` (H = G*n) or None (no norm).
    Returns ([logp_Tn] per gate, contiguous; entropy_T in nats, no gradient; stats_2H = (mean,
    unbiased variance) for batch statistics, no gradient, else None): the contract and
    arithmetic of ``omnimoe_train.model.router_gates.gate_log_probs``. No host synchronisation.
    Raises ValueError for calls ``supports`` refuses.
    """
    if not supports(x_TD, gates) or len({tuple(g.shape) for g in gates}) != 1:
        raise ValueError(
            f"gate kernels: need 1-2 equal fp32 gates of n <= {GATES_MAX_SCORES} and T >= 1, "
            f"got x {tuple(x_TD.shape)}, gates {[(tuple(g.shape), g.dtype) for g in gates]}"
        )
    group_size = 1 if group is None else dist.get_world_size(group)
    out = GateLogProbs.apply(x_TD, stats, eps, group, group_size, *gates)
    num_gates = len(gates)
    batch_stats = out[num_gates + 1] if len(out) > num_gates + 1 else None
    return list(out[:num_gates]), out[num_gates], batch_stats
