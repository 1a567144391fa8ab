"""OmniMoE ops: exact Cartesian top-k routing and expert-centric atomic experts.

Imported as ``omnimoe_kernels`` (the folder is ``kernels/``; that name is taken on PyPI).

``backend`` selects the implementation: ``"torch"`` (the reference in ``reference.py``),
``"triton"``, or ``"auto"``: Triton for CUDA tensors, or for CPU tensors when
``TRITON_INTERPRET=1`` is set (so CI exercises the very same kernels), else the reference.

Importing the package does not import torch (the reference is loaded on first use): the
configuration validation reads ``limits`` before a run, and a usage error should not wait for
torch to load.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from omnimoe_kernels.limits import (
    EXPERTS_MAX_HIDDEN,
    EXPERTS_MAX_NUM,
    EXPERTS_MAX_PAIRS,
    GATES_MAX_SCORES,
    ROUTER_MAX_TOP_K,
)

if TYPE_CHECKING:
    import torch

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
    """Exact top-k of ``rows[i] + cols[j]`` over the n x n grid -> (scores_TK, indices_TK).

    ``rows_Tn``, ``cols_Tn``: (T, n) router log-probabilities; ``k`` in [1, n*n] (Triton: at
    most ``ROUTER_MAX_TOP_K``). For ANY values, NaN and +-inf included, the k int64 ids of a
    token are distinct, in [0, n*n) and ascending, and both backends return the same ids: the
    order is defined in ``reference.cartesian_topk_reference`` (NaN ranks as -inf, +inf as the
    largest finite value, ties by the lowest id). Scores are the input sums (NaN stays NaN).
    No host synchronisation. Raises ValueError for shapes that differ or k out of range.
    """
    if resolve_backend(backend, rows_Tn.device) == "triton":
        from omnimoe_kernels.triton_ops import cartesian_topk_triton

        return cartesian_topk_triton(rows_Tn, cols_Tn, k)
    from omnimoe_kernels.reference import cartesian_topk_reference

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
    grad_path: str = "auto",
    distinct_ids: bool = False,
    pair_ranges: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    sort_forward: bool = False,
    valid_ids: bool = False,
    usage_N: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y_t = sum_k w_tk * silu(up[e_tk] . x_t) * down[e_tk]`` with autograd.

    ``x_TD`` (T, D); ``up_ND``, ``down_ND`` (N, D); ``weights_TK`` (T, K); ``indices_TK`` (T, K)
    int32/int64 expert ids. Contract: every id is in [0, N] (repeats are allowed: a token may
    list an expert twice, a padded slot may carry weight 0); the id N means "no expert": the
    pair adds nothing and gets zero gradients (the expert-parallel rows layout marks the
    pairs of another rank's experts so). The ids are not range-checked on
    the device (that costs a host sync per call): ``cartesian_topk`` guarantees the range for
    every input, and the expert-parallel dispatch maps ids to local ones in their shard's range.
    Triton limits: N <= ``EXPERTS_MAX_NUM``, D <= ``EXPERTS_MAX_HIDDEN``, T * K <=
    ``EXPERTS_MAX_PAIRS`` (checked from the shapes). Non-finite x, weights or tables give
    non-finite outputs for the tokens that use them; in the Triton backward a non-finite x or
    dy row also reaches the weight gradients of other experts (0 * inf in the one-hot product
    or GEMM): with ``grad_path`` "pairs", every expert of its experts' 16-expert blocks, with
    or without pairs (``experts_grad.GRAD_SCHEDULE`` "experts", the default; "runs": the
    experts reduced in its 16-pair chunk); with "dense", every expert. The reference keeps it
    to that token's experts: a step with non-finite activations is lost either way.

    ``grad_path`` (Triton backend; the reference ignores it): how the backward forms the table
    gradients, "pairs" (the segmented pair kernel), "dense" (two GEMMs over a scattered (T, N)
    coefficient matrix, bounded memory) or "auto" (a cost model per call from T, N, D, K, dtype
    and device: ``experts_dense_grad.choose_grad_path``). Both are exact to the same ~16-bit
    coefficient class and bitwise repeatable. ``distinct_ids``: the caller promises no id < N
    appears twice in a token's row (the routers' top-K guarantees it), so the dense path skips
    merging repeats (same values; with repeats the promise would lose all but one of them).
    ``sort_forward`` (Triton): the forward walks the pairs in expert order even for tables that
    fit in L2, for pair lists that are mostly the "no expert" id N (the expert-parallel rows
    layout: the skipped pairs sort last and cost nothing); same values. ``valid_ids``
    (Triton): the caller promises no "no expert" id N appears (the routers' ids, on one GPU or
    with the tables replicated), so the expert sort's keys stay 16-bit up to N = 65,536; same
    values. ``usage_N``: an (N,) counter (float64: ``ExpertStats.counts_N``) that gets each
    expert's number of pairs (ids < N) added once per call: by the Triton backward, from the
    expert sort it runs anyway (a forward without a backward adds nothing), or by the
    reference's forward.

    ``pair_ranges`` = (start_T, count_T, order_T), three int32 (T,) tensors on x's device:
    token t's pairs that can use a table row are its slots [start_t, start_t + count_t) (ids
    N, "no expert", may still appear inside), and order_T is a permutation of 0..T-1 (the
    order tokens are tiled in; sorted by count, a tile's tokens walk about as many slots).
    Contract: every slot outside its token's range holds the id N, and order_T is a
    permutation -- as in the expert-parallel ``rows`` layout, where a rank's experts are one
    contiguous id block and the routers' ids ascend, so a token's pairs on a rank are one run
    of its slots (``rows_routing``). The Triton backend's combines (y
    forward, dx backward) then read only the ranges, so their cost follows the real pairs, and
    the results equal those without the ranges (to fp32 summation order). Nothing checks the
    values (that is a host sync): a call that breaks the contract drops the pairs outside the
    ranges from y and dx, and a token missing from order_T gets no row of y or dx. The
    reference backend ignores the ranges. Raises ValueError for an unknown ``grad_path``, or
    ``pair_ranges`` that are not three int32 (T,) tensors on x's device.
    """
    from omnimoe_kernels.experts_dense_grad import GRAD_PATHS

    if grad_path not in GRAD_PATHS:
        raise ValueError(f"grad_path={grad_path!r} must be one of {GRAD_PATHS}")
    if pair_ranges is not None:
        _check_pair_ranges(pair_ranges, x_TD)
    if resolve_backend(backend, x_TD.device) == "triton":
        from omnimoe_kernels.triton_ops import atomic_experts_triton

        return atomic_experts_triton(
            x_TD, up_ND, down_ND, weights_TK, indices_TK,
            deterministic=deterministic, grad_path=grad_path, distinct_ids=distinct_ids,
            pair_ranges=pair_ranges, sort_forward=sort_forward, valid_ids=valid_ids,
            usage_N=usage_N,
        )  # fmt: skip
    from omnimoe_kernels.reference import atomic_experts_reference

    if usage_N is not None:
        ids = indices_TK.reshape(-1)
        ids = ids[ids < usage_N.shape[0]]  # not the "no expert" id N (a host sync: reference)
        usage_N.index_add_(0, ids, ids.new_ones(ids.shape, dtype=usage_N.dtype))
    # The slots outside the ranges hold "no expert" ids, which the reference skips anyway.
    return atomic_experts_reference(x_TD, up_ND, down_ND, weights_TK, indices_TK)


def _check_pair_ranges(pair_ranges: tuple, x_TD: torch.Tensor) -> None:
    """ValueError unless ``pair_ranges`` is three int32 (T,) tensors on x's device (shapes
    only: the values are the caller's contract, checking them would sync with the host)."""
    import torch

    names = ("start_T", "count_T", "order_T")
    if not isinstance(pair_ranges, (tuple, list)) or len(pair_ranges) != 3:
        raise ValueError(f"pair_ranges must be the 3 tensors {names}")
    for name, t in zip(names, pair_ranges):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.shape != x_TD.shape[:1]:
            got = (tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"pair_ranges {name} must be int32 ({x_TD.shape[0]},), got {got}")
        if t.device != x_TD.device:
            raise ValueError(f"pair_ranges {name} is on {t.device}, x on {x_TD.device}")


def __getattr__(name: str) -> Any:
    """The reference functions, imported (with torch) on first access."""
    if name in (
        "atomic_experts_gather",
        "atomic_experts_reference",
        "cartesian_topk_reference",
        "gate_log_probs_reference",
    ):
        from omnimoe_kernels import reference

        return getattr(reference, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BACKENDS",
    "EXPERTS_MAX_HIDDEN",
    "EXPERTS_MAX_NUM",
    "EXPERTS_MAX_PAIRS",
    "GATES_MAX_SCORES",
    "ROUTER_MAX_TOP_K",
    "atomic_experts",
    "atomic_experts_gather",
    "atomic_experts_reference",
    "cartesian_topk",
    "cartesian_topk_reference",
    "gate_log_probs_reference",
    "resolve_backend",
]
