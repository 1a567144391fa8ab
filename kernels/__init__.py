"""OmniMoE ops: exact Cartesian top-k routing and expert-centric atomic experts.

Imported as ``omnimoe_kernels`` (the folder is ``kernels/``; that name is taken on PyPI).

``backend`` selects the implementation: ``"torch"`` (the reference in ``reference.py``),
``"triton"``, or ``"auto"``: Triton for CUDA tensors, or for CPU tensors when
``TRITON_INTERPRET=1`` is set (so CI exercises the very same kernels), else the reference.
"""

from __future__ import annotations

import os

import torch

from omnimoe_kernels.reference import (
    atomic_experts_gather,
    atomic_experts_reference,
    cartesian_topk_reference,
)

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``auto`` to a concrete backend for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} must be one of {BACKENDS}")
    if backend != "auto":
        return backend
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return "triton"
    return "torch"


def cartesian_topk(
    rows_Tn: torch.Tensor, cols_Tn: torch.Tensor, k: int, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of ``rows[i] + cols[j]`` over the n x n grid -> (scores_TK, indices_TK)."""
    if resolve_backend(backend, rows_Tn.device) == "triton":
        from omnimoe_kernels.triton_ops import cartesian_topk_triton

        return cartesian_topk_triton(rows_Tn, cols_Tn, k)
    return cartesian_topk_reference(rows_Tn, cols_Tn, k)


def atomic_experts(
    x_TD: torch.Tensor,
    up_ND: torch.Tensor,
    down_ND: torch.Tensor,
    weights_TK: torch.Tensor,
    indices_TK: torch.Tensor,
    *,
    backend: str = "auto",
    deterministic: bool = False,
) -> torch.Tensor:
    """``y_t = sum_k w_tk * silu(up[e_tk] . x_t) * down[e_tk]`` with autograd."""
    if resolve_backend(backend, x_TD.device) == "triton":
        from omnimoe_kernels.triton_ops import atomic_experts_triton

        return atomic_experts_triton(
            x_TD, up_ND, down_ND, weights_TK, indices_TK, deterministic=deterministic
        )
    return atomic_experts_reference(x_TD, up_ND, down_ND, weights_TK, indices_TK)


__all__ = [
    "BACKENDS",
    "atomic_experts",
    "atomic_experts_gather",
    "atomic_experts_reference",
    "cartesian_topk",
    "cartesian_topk_reference",
    "resolve_backend",
]
