"""The outputs of a router gate-scores autograd node, shared by its two implementations.

Its own module (torch only, no Triton): ``omnimoe_train.model.router_gates`` (the PyTorch
node) imports it without loading Triton, which the kernel tests must import only after
choosing the interpreter.
"""

from __future__ import annotations

import torch


def gate_outputs(
    ctx,  # noqa: ANN001
    logp_per_gate: tuple[torch.Tensor, ...],
    entropy_T: torch.Tensor,
    batch_stats: torch.Tensor | None,
) -> tuple[torch.Tensor, ...]:
    """The outputs of a gate-scores autograd node, in the order ``gate_log_probs`` unpacks:
    each gate's (T, n) log-probabilities, the entropy and (batch statistics only) the
    statistics, the last two marked non-differentiable. Shared by the Triton node here and the
    PyTorch node (``omnimoe_train.model.router_gates``)."""
    ctx.mark_non_differentiable(entropy_T)
    outputs = (*logp_per_gate, entropy_T)
    if batch_stats is not None:
        ctx.mark_non_differentiable(batch_stats)
        outputs = (*outputs, batch_stats)
    return outputs
