"""The router's gate scores as one autograd node: ``log_softmax(norm(x @ W^T))`` per gate.

Shape suffixes: T tokens, D hidden, G gates (2 for the Cartesian router, 1 for the dense one),
n scores per gate.

Why our own backward: written as PyTorch ops (fp32 cast, two GEMMs, BatchNorm's batch mean and
variance, log-softmax) the router gates are ~25 kernels forward and ~50 autograd nodes backward
per layer, on tensors of only T x 2n floats, and on the GPU machines we measure on each launch
costs tens of microseconds of host time. Here the G gates share one GEMM each way and BatchNorm
and log-softmax are differentiated in closed form (about 20 kernels forward, 15 backward),
with the same arithmetic as the module path in :class:`omnimoe_train.model.router.GateNorm`.
Measured at a80m (T = 16,384, d = 768, n = 76, one H200, ``benchmarks/profile_layer.py``):
2.17 ms forward + backward against 2.41 ms as PyTorch ops -- a small gain; TF32 GEMMs were
tried and bought nothing (2.15 ms), so the remaining time is neither the GEMMs nor launches
alone (see docs/benchmarks.md).

    z = x W^T,  mu = mean_T z,  var = mean_T (z - mu)^2,  zh = (z - mu) / sqrt(var + eps),
    y = log_softmax_n(zh)
    dzh = dy - softmax(zh) * sum_n dy
    dz  = (dzh - mean_T dzh - zh * mean_T(dzh * zh)) / sqrt(var + eps)     (batch statistics)
    dz  = dzh / sqrt(running_var + eps)                                     (running statistics)
    dx  = dz W,  dW = dz^T x

With a statistics group (sequence parallelism) the T-means run over the whole group: the sums
are all-reduced forward and backward, as ``GateNorm`` does with a differentiable all-reduce.
The entropy of each token's product distribution is computed in the same pass.

On the GPU (``backend`` resolving to Triton) the same arithmetic runs on our own kernels,
``omnimoe_kernels.router_gates``: 6 launches forward and 7 backward (fp32 GEMMs and casts
included) instead of ~20 and ~15, zh is saved instead of y (softmax recomputed), and with bf16
activations the GEMMs run on bf16 tensor cores with the fp32 operands split exactly into bf16
pieces (``omnimoe_kernels.gate_gemms``: fp32 accuracy for the scores and dW; 7 launches
forward and 9 backward). This
PyTorch node stays the path for float64 (the tests' reference), CPU runs and G > 2.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

import omnimoe_kernels
from omnimoe_kernels.gate_outputs import gate_outputs


def _group_sum(t: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(t, group=group)
    return t


class _GateLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, stats, eps, group, group_size, *gates_nD):
        # stats: "batch" | (running_mean_H, running_var_H) | None (no norm)
        dtype = torch.promote_types(gates_nD[0].dtype, torch.float32)
        x32_TD = x_TD.to(dtype)
        w_HD = torch.cat([g.to(dtype) for g in gates_nD])  # H = G * n
        z_TH = x32_TD @ w_HD.t()
        num_gates, tokens = len(gates_nD), x_TD.shape[0] * group_size
        batch_stats = None
        if stats == "batch":
            mean_H = _group_sum(z_TH.sum(0), group) / tokens
            var_H = _group_sum((z_TH - mean_H).square().sum(0), group) / tokens
            rstd_H = torch.rsqrt(var_H + eps)
            z_TH = (z_TH - mean_H) * rstd_H
            batch_stats = torch.stack([mean_H, var_H * (tokens / max(tokens - 1, 1))])
        elif stats is not None:
            running_mean_H, running_var_H = stats
            rstd_H = torch.rsqrt(running_var_H + eps)
            z_TH = (z_TH - running_mean_H) * rstd_H
        else:
            rstd_H = None
        y_TGn = torch.log_softmax(z_TH.view(x_TD.shape[0], num_gates, -1), dim=-1)
        entropy_T = -(y_TGn.exp() * y_TGn).sum((1, 2))
        ctx.save_for_backward(x_TD, w_HD, z_TH, y_TGn, rstd_H)
        ctx.batch, ctx.group, ctx.tokens = stats == "batch", group, tokens
        ctx.gate_shapes = [(g.shape, g.dtype) for g in gates_nD]
        # One contiguous (T, n) tensor per gate: what the top-K kernel reads without a copy.
        per_gate = tuple(y.contiguous() for y in y_TGn.unbind(1))
        return gate_outputs(ctx, per_gate, entropy_T, batch_stats)

    @staticmethod
    def backward(ctx, *grads):
        x_TD, w_HD, zh_TH, y_TGn, rstd_H = ctx.saved_tensors
        dys = grads[: len(ctx.gate_shapes)]
        dy_TGn = torch.stack(
            [torch.zeros_like(y_TGn[:, 0]) if g is None else g for g in dys], dim=1
        )
        dzh_TGn = dy_TGn - y_TGn.exp() * dy_TGn.sum(-1, keepdim=True)
        dz_TH = dzh_TGn.reshape(zh_TH.shape)
        if ctx.batch:
            sums_2H = _group_sum(torch.stack([dz_TH.sum(0), (dz_TH * zh_TH).sum(0)]), ctx.group)
            means_2H = sums_2H / ctx.tokens
            dz_TH = (dz_TH - means_2H[0] - zh_TH * means_2H[1]) * rstd_H
        elif rstd_H is not None:
            dz_TH = dz_TH * rstd_H
        dx_TD = None
        if ctx.needs_input_grad[0]:
            dx_TD = (dz_TH @ w_HD).to(x_TD.dtype)
        dw_HD = dz_TH.t() @ x_TD.to(dz_TH.dtype)
        sizes = [shape[0] for shape, _ in ctx.gate_shapes]
        dgates = [
            dw.to(dtype).view(shape)
            for dw, (shape, dtype) in zip(dw_HD.split(sizes), ctx.gate_shapes, strict=True)
        ]
        return (dx_TD, None, None, None, None, *dgates)


def gate_log_probs(
    x_TD: torch.Tensor,
    gates: list[torch.Tensor],
    *,
    stats: str | tuple[torch.Tensor, torch.Tensor] | None,
    eps: float = 1e-5,
    group: ProcessGroup | None = None,
    backend: str = "auto",
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """Log-probabilities of every gate, their entropy and the batch statistics, in one node.

    ``x_TD`` (any float dtype) and ``gates`` (G tensors of shape (n, D), fp32 or wider; the
    computation runs in ``promote_types(gate dtype, fp32)``). ``stats``: ``"batch"`` to normalise
    with this micro-batch's mean and (biased) variance, summed over ``group`` if given; a
    ``(running_mean_H, running_var_H)`` pair (H = G*n, gates concatenated) for evaluation; or
    ``None`` for no normalisation. Returns ``[logp_Tn]`` (per gate, log-softmax over its n
    scores, contiguous), ``entropy_T`` (nats, sum over the gates: the entropy of the product distribution;
    no gradient) and, for batch statistics, ``stats_2H`` = (mean, unbiased variance) to feed
    the running averages (no gradient); otherwise ``None``. Numerically this is
    ``GateNorm`` + ``F.log_softmax`` applied per gate (see the module docstring).

    ``backend`` (``omnimoe_kernels.resolve_backend``): where it resolves to ``"triton"`` (CUDA
    tensors, or ``TRITON_INTERPRET=1``) and the kernels take the call (fp32 arithmetic, one or
    two gates of at most ``GATES_MAX_SCORES`` scores, T >= 1:
    ``omnimoe_kernels.router_gates_autograd.supports``), the Triton kernels of
    ``omnimoe_kernels.router_gates`` run it (same contract, fewer launches, y not saved);
    otherwise the PyTorch node below (float64 in the tests, G > 2, no tokens).
    """
    sizes = {g.shape[0] for g in gates}
    if len(sizes) != 1:
        raise ValueError(f"gates must have equal sizes, got {[tuple(g.shape) for g in gates]}")
    if omnimoe_kernels.resolve_backend(backend, x_TD.device) == "triton":
        from omnimoe_kernels import router_gates_autograd

        if router_gates_autograd.supports(x_TD, gates):
            return router_gates_autograd.gate_log_probs_triton(
                x_TD, gates, stats=stats, eps=eps, group=group
            )
    group_size = 1 if group is None else dist.get_world_size(group)
    out = _GateLogProbs.apply(x_TD, stats, eps, group, group_size, *gates)
    num_gates = len(gates)
    batch_stats = out[num_gates + 1] if len(out) > num_gates + 1 else None
    return list(out[:num_gates]), out[num_gates], batch_stats
