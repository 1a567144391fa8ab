"""Per-expert pair counts off expert-sorted ids, in one pass: the usage statistics' counts.

The OmniMoE backward sorts the P = T * K expert ids anyway (``experts_autograd.expert_order``);
in sorted order each expert's pairs are one run, so its count is ``end - start`` of that run.
``_run_bounds_kernel`` reads the sorted ids once and, at the first pair of each run, adds
``-start`` to the expert's counter, at the last pair ``+ end``: two additions per expert that
occurs, whatever the order they land in (integers, exact in float64 below 2^53), so the result is
bitwise repeatable. Measured against the alternatives in ``benchmarks/bench_expert_stats.py``: a
scatter of P ones (``ExpertStats.update``, contended atomics) and ``torch.searchsorted`` of the
N + 1 run bounds (N binary searches of ~20 dependent loads each, latency-bound).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096  # sorted ids per program


@triton.jit
def _run_bounds_kernel(e_ptr, usage_ptr, P, N, BLOCK: tl.constexpr):
    """Grid (ceil(P / BLOCK),). e_ptr: (P,) expert ids ascending (N = "no expert", not counted)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = i < P
    e = tl.load(e_ptr + i, mask=live, other=N)
    # -1 never equals an id: position 0 starts a run, position P - 1 ends one.
    prev = tl.load(e_ptr + i - 1, mask=live & (i > 0), other=-1)
    after = tl.load(e_ptr + i + 1, mask=(i + 1) < P, other=-1)
    real = live & (e < N)
    value_ty = usage_ptr.dtype.element_ty
    tl.atomic_add(usage_ptr + e, (-i).to(value_ty), mask=real & (e != prev), sem="relaxed")
    tl.atomic_add(usage_ptr + e, (i + 1).to(value_ty), mask=real & (e != after), sem="relaxed")


def add_pair_counts(usage_N: torch.Tensor, e_P: torch.Tensor) -> None:
    """Add to ``usage_N`` (N,) each expert's number of pairs in ``e_P`` (P,): int32 expert ids
    sorted ascending, ids N ("no expert") not counted. One Triton launch, no host sync; exact and
    bitwise repeatable for float64 or int64 counters (see the module docstring).

    Raises:
        ValueError: ``usage_N`` not a contiguous float64 / int64 vector on e_P's device, or
            ``e_P`` not a contiguous int32 vector.
    """
    if usage_N.dim() != 1 or usage_N.dtype not in (torch.float64, torch.int64):
        raise ValueError(
            f"usage_N must be a float64 or int64 (N,) vector, got {usage_N.dtype} "
            f"{tuple(usage_N.shape)}"
        )
    if e_P.dim() != 1 or e_P.dtype != torch.int32:
        raise ValueError(f"e_P must be an int32 (P,) vector, got {e_P.dtype} {tuple(e_P.shape)}")
    if usage_N.device != e_P.device or not (usage_N.is_contiguous() and e_P.is_contiguous()):
        raise ValueError("usage_N and e_P must be contiguous and on one device")
    P = e_P.numel()
    if P:
        _run_bounds_kernel[(triton.cdiv(P, BLOCK),)](
            e_P, usage_N, P, usage_N.shape[0], BLOCK=BLOCK, num_warps=8
        )
